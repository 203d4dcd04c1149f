"""Stages *group by page* and *dedupe*: the cap, boilerplate join, exact and near duplicates."""

from __future__ import annotations

import io

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageDraw

from schemas.ids import cluster_id, hamming
from schemas.records import BoilerplateHit, ImageRecord, PageGroup
from transforms.dedupe import Dedupe, DedupeConfig, dedupe_page
from transforms.group import BOILERPLATE, CAPPED, KEEP, CapEntry, GroupByPage, GroupConfig, cap_key, decide_page
from transforms.normalize import NormalizeConfig, normalize_image, url_host


def image(image_id: str, phash: str = "0000000000000000", *, page: str = "https://a.example/p",
          size: int = 300, url: str | None = None, source: str | None = None) -> ImageRecord:
    return ImageRecord(image_id=image_id, record_id=f"r-{image_id}-{source}", source=source or f"f:{image_id}",
                       page_url=page, domain=url_host(page), image_url=url or f"https://a.example/{image_id}.jpg",
                       text=None, image=b"", width=size, height=size, phash=phash, source_width=size,
                       source_height=size, source_format="JPEG")


def test_hamming() -> None:
    assert hamming("0000000000000000", "0000000000000000") == 0
    assert hamming("0000000000000000", "000000000000000f") == 4
    assert hamming("ffffffffffffffff", "0000000000000000") == 64


def _decide(images: list[ImageRecord], hits: list[BoilerplateHit], cap: int) -> dict[str, tuple]:
    entries = [CapEntry(cap_key(im), im.phash) for im in images]
    return {key[0]: (d.fate, d.n_page_images) for key, d in decide_page(entries, hits, cap)}


def test_cap_keeps_smallest_ids_and_boilerplate_takes_no_place() -> None:
    images = [image(f"{i:02d}", phash=f"{i:016x}") for i in (7, 3, 9, 1, 5)]
    logo = image("00", phash="ffffffffffffffff")  # the smallest id: it would take a place if it counted
    fates = _decide(images + [logo], [BoilerplateHit("ffffffffffffffff", 40)], 3)
    assert fates == {"00": (BOILERPLATE, 6), "01": (KEEP, 6), "03": (KEEP, 6), "05": (KEEP, 6),
                     "07": (CAPPED, 6), "09": (CAPPED, 6)}


def test_cap_choice_does_not_depend_on_order() -> None:
    images = [image(f"{i:02d}", phash=f"{i:016x}") for i in range(10)]
    assert _decide(images, [], 4) == _decide(list(reversed(images)), [], 4)


def test_dedupe_keeps_best_original_of_duplicates() -> None:
    config = DedupeConfig(near_duplicate_max_distance=5)
    big = image("aa", "00000000000000ff", size=900)
    small_copy = image("bb", "00000000000000fe", size=300)          # 1 bit away: near duplicate
    other = image("cc", "ff00ff00ff00ff00", size=300)                # far away: kept
    exact = image("cc", "ff00ff00ff00ff00", size=300, url="https://a.example/zoom/cc.jpg")
    logo = image("dd", "123456789abcdef0")
    group = PageGroup("https://a.example/p", "a.example", (small_copy, exact, other, big, logo), 5)
    kept, removed = dedupe_page(group, config)
    assert [(im.image_id, im.image_url) for im in kept] == [("aa", big.image_url), ("cc", other.image_url),
                                                            ("dd", logo.image_url)]
    # Removals come in quality order: most source pixels first, then image id, then image URL.
    assert [(im.image_id, im.image_url, reason) for im, reason, _ in removed] == [
        ("bb", small_copy.image_url, "duplicate_near"), ("cc", exact.image_url, "duplicate_exact")]
    details = {reason: detail for _, reason, detail in removed}
    assert "distance 1 <= 5" in details["duplicate_near"]


def test_near_duplicate_threshold_is_inclusive() -> None:
    a, b = image("a1", "0000000000000000"), image("b1", "000000000000001f")  # 5 bits apart
    group = PageGroup("p", "d", (a, b), 2)
    assert len(dedupe_page(group, DedupeConfig(near_duplicate_max_distance=5))[0]) == 1
    assert len(dedupe_page(group, DedupeConfig(near_duplicate_max_distance=4))[0]) == 2


def test_cluster_id_is_a_content_hash() -> None:
    assert cluster_id("p", ["b", "a"]) == cluster_id("p", ["a", "b"])
    assert cluster_id("p", ["a", "b"]) != cluster_id("q", ["a", "b"])
    assert cluster_id("p", ["a", "b"]) != cluster_id("p", ["a", "c"])


@pytest.mark.parametrize("kwargs", [{"near_duplicate_max_distance": -1}, {"near_duplicate_max_distance": 65},
                                    {"boilerplate_max_pages": 0}])
def test_dedupe_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DedupeConfig(**kwargs)


def test_group_config_validation() -> None:
    with pytest.raises(ValueError, match="max_images_per_page"):
        GroupConfig(max_images_per_page=2, min_images=3)


def _normalized(data: bytes, page: str, url: str, source: str) -> ImageRecord:
    n = normalize_image(data, NormalizeConfig())
    return ImageRecord(image_id=n.image_id, record_id=f"r:{source}", source=source, page_url=page,
                       domain=url_host(page), image_url=url, text=None, image=n.image, width=n.width,
                       height=n.height, phash=n.phash, source_width=n.source_width,
                       source_height=n.source_height, source_format=n.source_format)


def test_stages_on_real_photos(product_photos: list[bytes]) -> None:
    """A logo on 4 pages (bound 3), a re-encoded copy, a page left with 2 images."""
    logo = Image.new("RGB", (300, 300), (20, 90, 200))
    ImageDraw.Draw(logo).ellipse((60, 60, 240, 240), fill=(255, 255, 255))  # a flat square would be blank_image
    buffer = io.BytesIO()
    logo.save(buffer, "PNG")
    logo_bytes = buffer.getvalue()
    smaller = io.BytesIO()
    Image.open(io.BytesIO(product_photos[0])).resize((264, 264)).save(smaller, "JPEG", quality=60)

    records = []
    for page in range(4):
        url = f"https://shop.example.com/p/{page}"
        records.append(_normalized(logo_bytes, url, "https://shop.example.com/logo.png", f"logo:{page}"))
        for k in range(3 if page < 3 else 2):
            photo = product_photos[page * 3 + k]
            records.append(_normalized(photo, url, f"https://shop.example.com/{page}/{k}.jpg", f"p{page}:{k}"))
    records.append(_normalized(smaller.getvalue(), "https://shop.example.com/p/0", "https://shop.example.com/0/s.jpg",
                               "p0:small"))

    with TestPipeline() as p:
        images = p | beam.Create(records)
        pages, group_rejects = images | GroupByPage(GroupConfig(), DedupeConfig(boilerplate_max_pages=3))
        clusters, rejects = pages | Dedupe(DedupeConfig(boilerplate_max_pages=3), min_images=3)
        assert_that(clusters | beam.Map(lambda c: (c.page_url, sorted(im.source for im in c.images), c.stats.n_images,
                                                   c.stats.n_page_images)),
                    equal_to([(f"https://shop.example.com/p/{i}", [f"p{i}:{k}" for k in range(3)], 3,
                               5 if i == 0 else 4) for i in range(3)]), label="Clusters")
        assert_that(rejects | beam.Map(lambda r: (r.reason, r.source, r.n_images)),
                    equal_to([("duplicate_near", "p0:small", 1), ("cluster_too_small", None, 2)]),
                    label="Rejects")
        # Boilerplate leaves where pages are grouped, before it could take a place under the cap.
        assert_that(group_rejects | beam.Map(lambda r: (r.stage, r.reason, r.source, r.n_images)),
                    equal_to([("dedupe", "boilerplate", f"logo:{i}", 1) for i in range(4)]), label="GroupRejects")
    counters = {(c.key.metric.namespace, c.key.metric.name): c.committed
                for c in p.result.metrics().query()["counters"]}
    assert counters[("dedupe", "boilerplate_hashes")] == 1
    assert counters[("dedupe", "clusters")] == 3
    assert counters[("dedupe", "cluster_too_small_clusters")] == 1
    assert counters[("group", "pages")] == 4
