"""Stage *cross-page duplicates*: the same product photos on unrelated pages, found through hash bands."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.records import ClusterStats
from tests.clip_helpers import image_record, make_cluster, photo_cluster, reencode
from tests.clusters import beam_counters
from tests.conftest import SAMPLE, run_pipeline
from transforms.cross_page import (
    CrossPageConfig,
    CrossPageDedupe,
    band_keys,
    band_slices,
    duplicate_verdict,
    sketch,
)

OFF = ["--set", "embed.enabled=false", "--set", "cluster_filter.enabled=false", "--set", "semantic_dedup.enabled=false",
       "--set", "detector.enabled=false"]


def test_band_slices_cover_the_hash() -> None:
    for bands in (1, 4, 6, 7, 64):
        slices = band_slices(bands)
        assert len(slices) == bands
        covered = 0
        for shift, mask in slices:
            assert covered & (mask << shift) == 0
            covered |= mask << shift
        assert covered == (1 << 64) - 1


@pytest.mark.parametrize("bands", [4, 6])
def test_hashes_within_fewer_flips_than_bands_share_a_band(bands: int) -> None:
    # Pigeonhole: d < bands flipped bits leave at least one band untouched.
    rng = np.random.default_rng(bands)
    for _ in range(500):
        h = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        flips = rng.choice(64, size=int(rng.integers(0, bands)), replace=False)
        g = h
        for bit in flips:
            g ^= 1 << int(bit)
        assert band_keys([h], bands) & band_keys([g], bands)


@pytest.fixture(scope="module")
def shops(product_photos: list[bytes]) -> dict:
    """Shop A sells a product with 5 photos; shop B the same photos re-encoded at another size; a blog
    shows one of them among others; a reseller shows 3 of the 5 (a subset)."""
    teapot = product_photos[:5]
    return {
        "a": photo_cluster("https://shop.example.com/products/teapot", teapot),
        "b": photo_cluster("https://store.example.net/p/8812", [reencode(p) for p in teapot]),
        "blog": photo_cluster("https://blog.example.org/desk", [teapot[0], *product_photos[5:8]]),
        "subset": photo_cluster("https://reseller.example/item/3", [reencode(p, 300) for p in teapot[1:4]]),
        "other": photo_cluster("https://shop.example.com/products/other", product_photos[8:12]),
    }


def test_verdict_keeps_the_bigger_then_the_smaller_id(shops: dict) -> None:
    config = CrossPageConfig()
    a, b, blog, subset = (sketch(shops[k]) for k in ("a", "b", "blog", "subset"))
    loser, winner, detail = duplicate_verdict(a, b, config)
    assert {loser, winner} == {a.cluster_id, b.cluster_id}
    assert winner == min(a.cluster_id, b.cluster_id)  # same size, no scores: the smaller id stays
    assert duplicate_verdict(b, a, config)[:2] == (loser, winner)  # symmetric
    assert "5 of its 5 images are near duplicates" in detail
    # All 3 images of the subset are in A: the subset goes, whatever the id order.
    assert duplicate_verdict(subset, a, config)[:2] == (subset.cluster_id, a.cluster_id)
    # One shared image of four is not "mostly".
    assert duplicate_verdict(blog, a, config) is None
    # A higher coherence wins among equal sizes.
    scored_loser = sketch(shops["a"].replace(stats=ClusterStats(5, 5, mean_sim=0.8)))
    scored_winner = sketch(shops["b"].replace(stats=ClusterStats(5, 5, mean_sim=0.9)))
    assert duplicate_verdict(scored_loser, scored_winner, config)[:2] == (scored_loser.cluster_id,
                                                                         scored_winner.cluster_id)


@pytest.mark.parametrize("order", [1, -1])
def test_stage_drops_duplicates_of_unrelated_pages(shops: dict, order: int) -> None:
    clusters = list(shops.values())[::order]
    keep_ab = min(shops["a"].cluster_id, shops["b"].cluster_id)
    drop_ab = max(shops["a"].cluster_id, shops["b"].cluster_id)
    with TestPipeline() as p:
        kept, rejects = p | beam.Create(clusters) | CrossPageDedupe(CrossPageConfig())
        assert_that(kept | "Kept" >> beam.Map(lambda c: c.cluster_id),
                    equal_to([keep_ab, shops["blog"].cluster_id, shops["other"].cluster_id]), label="Kept")
        assert_that(rejects | "Rejects" >> beam.Map(lambda r: (r.id, r.stage, r.reason, r.n_images)),
                    equal_to([(drop_ab, "cross_page", "duplicate_cluster", 5),
                              (shops["subset"].cluster_id, "cross_page", "duplicate_cluster", 3)]), label="Rejects")
    result = beam_counters(p.result, "cross_page")
    assert result["duplicate_cluster_clusters"] == 2 and result["clusters"] == 3
    # Candidates came from shared bands only: far fewer than all 10 pairs' worth of verification.
    assert result["duplicate_pairs"] == 3  # a~b, a~subset, b~subset


def test_hot_band_buckets_are_skipped_and_counted(product_photos: list[bytes]) -> None:
    # Three copies of one page: every band bucket holds 3 clusters > max_bucket_clusters 2.
    page = [image_record(p, "https://x.example/p") for p in product_photos[:3]]
    copies = [make_cluster(f"https://x{i}.example/p", [im.replace(page_url=f"https://x{i}.example/p") for im in page])
              for i in range(3)]
    with TestPipeline() as p:
        kept, _ = p | beam.Create(copies) | CrossPageDedupe(CrossPageConfig(max_bucket_clusters=2))
        assert_that(kept | beam.Map(lambda c: c.page_url), equal_to([c.page_url for c in copies]))
    assert beam_counters(p.result, "cross_page")["hot_buckets"] > 0


def test_sample_teapot_sold_on_two_shops(tmp_path, sample_rows: list[dict]) -> None:
    """Phase 1 on the bundled sample (CLIP stages off but cross-page on): the teapot of shop.example.com and
    its re-encoded copy on store.example.net make one cluster; the blog mixing four products stays."""
    out = run_pipeline([SAMPLE], tmp_path, "--profile", "demo", *OFF)
    duplicates = [r for r in out.rejects() if r["reason"] == "duplicate_cluster"]
    assert len(duplicates) == 1
    teapots = {"https://shop.example.com/products/teapot", "https://store.example.net/p/8812-ceramic-tea-pot"}
    dropped = duplicates[0]
    assert dropped["page_url"] in teapots and dropped["n_images"] == 5 and dropped["stage"] == "cross_page"
    kept_pages = {c["page_url"] for c in out.clusters()}
    assert len(teapots & kept_pages) == 1
    assert (teapots - {dropped["page_url"]}).pop() in dropped["detail"]
    assert "https://blog.example.org/2024/05/my-desk-setup" in kept_pages
    assert out.manifest["records"]["reconciled"]
    assert out.manifest["clusters"]["rejected"]["duplicate_cluster"] == 1
    assert out.manifest["records"]["rejected"]["duplicate_cluster"] == 5


def test_cross_page_can_be_switched_off(tmp_path) -> None:
    out = run_pipeline([SAMPLE], tmp_path, "--profile", "demo", *OFF, "--set", "cross_page.enabled=false")
    assert not [r for r in out.rejects() if r["stage"] == "cross_page"]
    assert out.manifest["records"]["reconciled"]


@pytest.mark.parametrize("kwargs", [{"bands": 0}, {"bands": 65}, {"max_distance": 65}, {"min_shared_fraction": 0},
                                    {"max_bucket_clusters": 1}])
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CrossPageConfig(**kwargs)
