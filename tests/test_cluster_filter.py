"""Stage *cluster filter*: coherence math on hand-made embeddings, outliers, thresholds and calibration."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import ConfigError, build_config
from pipeline.console import cluster_filter_note
from tests.clip_helpers import equicorrelated, orthonormal, vector_cluster, with_strangers
from tests.clusters import beam_counters
from transforms.cluster_filter import (
    ClusterFilter,
    ClusterFilterConfig,
    coherence,
    score_cluster,
    threshold_for_keep_rate,
)
from transforms.outputs import read_stats, write_stage_extras
from transforms.settings import OutputConfig

# --- the math ---------------------------------------------------------------------------------------------


def test_coherence_of_known_similarities() -> None:
    # Three unit vectors with cos(a, b) = 0.8, cos(a, c) = cos(b, c) = 0: mean 0.8/3, min 0.
    e = orthonormal(3)
    a = e[0]
    b = 0.8 * e[0] + 0.6 * e[1]
    c = e[2]
    scores = coherence(np.stack([a, b, c]))
    np.testing.assert_allclose(scores.per_image, [0.4, 0.4, 0.0], atol=1e-6)
    assert scores.mean_sim == pytest.approx(0.8 / 3)
    assert scores.min_sim == pytest.approx(0.0, abs=1e-6)
    assert scores.mean_sim == pytest.approx(scores.per_image.mean())


def test_coherence_of_identical_and_single_vectors() -> None:
    v = orthonormal(1)[0]
    same = coherence(np.stack([v, v, v]))
    assert same.mean_sim == pytest.approx(1.0) and same.min_sim == pytest.approx(1.0)
    single = coherence(v[None])
    assert (single.mean_sim, single.min_sim, list(single.per_image)) == (1.0, 1.0, [1.0])


def test_planted_outlier_leaves_and_scores_are_recomputed() -> None:
    # Five images of one subject (pairwise 0.9) and one unrelated image (orthogonal to all of them):
    # the subject's images score (4 x 0.9 + 0) / 5 = 0.72, the stranger 0.
    vectors = with_strangers(5, 0.9)
    stranger = vectors[5]
    cluster = vector_cluster("https://shop.example.com/p/1", vectors)
    np.testing.assert_allclose(coherence(vectors).per_image, [0.72] * 5 + [0.0], atol=1e-6)
    scored = score_cluster(cluster, outlier_threshold=0.6)

    assert len(scored.outliers) == 1
    outlier, score = scored.outliers[0]
    np.testing.assert_allclose(outlier.embedding, stranger, atol=1e-6)
    assert score < 0.6
    kept = scored.cluster
    assert kept.stats.n_images == len(kept.images) == 5
    assert kept.stats.mean_sim == pytest.approx(0.9, abs=1e-5)
    assert kept.stats.min_sim == pytest.approx(0.9, abs=1e-5)
    assert all(image.coherence == pytest.approx(0.9, abs=1e-5) for image in kept.images)
    assert kept.cluster_id != cluster.cluster_id  # the id follows the image set


def test_no_outliers_without_a_majority() -> None:
    # Four unrelated products (a blog post mixing them): every image is under the outlier threshold, so
    # none is an outlier of the others; the cluster stays whole and its low mean decides later.
    mixed = vector_cluster("https://blog.example.org/desk", orthonormal(4))
    scored = score_cluster(mixed, outlier_threshold=0.6)
    assert scored.outliers == ()
    assert len(scored.cluster.images) == 4
    assert scored.cluster.stats.mean_sim == pytest.approx(0.0, abs=1e-6)
    # Exactly half under the threshold is not a majority: they leave. Two images of a subject (0.95) and two
    # strangers: the subject's images score 0.95 / 3 = 0.32, so all four are under 0.6 -- a majority, no
    # outlier; with a threshold of 0.2 only the two strangers (0) are under it, and they leave.
    half = vector_cluster("https://x.example/h", with_strangers(2, 0.95, strangers=2))
    assert score_cluster(half, 0.6).outliers == ()
    assert sorted(round(score, 6) for _, score in score_cluster(half, 0.2).outliers) == [0.0, 0.0]


def test_outlier_threshold_none_removes_nothing() -> None:
    cluster = vector_cluster("https://shop.example.com/p/2", with_strangers(3, 0.9))
    assert score_cluster(cluster, None).outliers == ()


# --- the stage ------------------------------------------------------------------------------------------

COHERENT = vector_cluster("https://shop.example.com/p/coherent", equicorrelated(4, 0.85, seed=3))
INCOHERENT = vector_cluster("https://shop.example.com/p/incoherent", equicorrelated(4, 0.5, seed=4))


OUTLIER_5 = vector_cluster("https://shop.example.com/p/outlier5", with_strangers(5, 0.9, seed=5))  # 5 stay
OUTLIER_3 = vector_cluster("https://shop.example.com/p/outlier3", with_strangers(3, 0.95, seed=6))  # 3 < 4 stay


def test_filter_stage_routes_clusters_and_images() -> None:
    config = ClusterFilterConfig(outlier_threshold=0.6, coherence_threshold=0.75)
    with TestPipeline() as p:
        kept, rejects = (p | beam.Create([COHERENT, INCOHERENT, OUTLIER_5, OUTLIER_3])
                         | ClusterFilter(config, min_images=4))
        assert_that(kept | "Kept" >> beam.Map(lambda c: (c.page_url, c.stats.n_images, round(c.stats.mean_sim, 4))),
                    equal_to([("https://shop.example.com/p/coherent", 4, 0.85),
                              ("https://shop.example.com/p/outlier5", 5, 0.9)]), label="KeptClusters")
        assert_that(rejects | "Reasons" >> beam.Map(lambda r: (r.page_url, r.reason, r.n_images, r.stage)),
                    equal_to([("https://shop.example.com/p/incoherent", "incoherent_cluster", 4, "cluster_filter"),
                              ("https://shop.example.com/p/outlier5", "outlier_image", 1, "cluster_filter"),
                              ("https://shop.example.com/p/outlier3", "outlier_image", 1, "cluster_filter"),
                              ("https://shop.example.com/p/outlier3", "cluster_too_small", 3, "cluster_filter")]),
                    label="Rejects")
    assert beam_counters(p.result, "cluster_filter") == {
        "clusters_scored": 3, "clusters": 2, "images_kept": 9, "incoherent_cluster": 4,
        "incoherent_cluster_clusters": 1, "outlier_image": 2, "cluster_too_small": 3, "cluster_too_small_clusters": 1}


def test_missing_embeddings_are_internal_errors_not_drops() -> None:
    broken = COHERENT.replace(images=tuple(im.replace(embedding=None) for im in COHERENT.images))
    with TestPipeline() as p:
        kept, rejects = p | beam.Create([broken]) | ClusterFilter(ClusterFilterConfig(), min_images=3)
        assert_that(kept, equal_to([]), label="NothingKept")
        assert_that(rejects | beam.Map(lambda r: r.reason), equal_to(["internal_error"] * 4), label="OnePerImage")


# --- calibration ----------------------------------------------------------------------------------------


def test_threshold_for_keep_rate_on_exact_quantiles() -> None:
    scores = [0.1 * i for i in range(11)]  # 11 scores -> 11 quantiles are the scores themselves
    assert threshold_for_keep_rate(scores, 0.3, 11) == pytest.approx(0.8)  # keeps 0.8, 0.9, 1.0
    assert threshold_for_keep_rate(scores, 1.0, 11) == pytest.approx(0.0)
    assert threshold_for_keep_rate(scores, 0.01, 11) == pytest.approx(1.0)  # never keeps nothing
    assert threshold_for_keep_rate([], 0.5, 0) is None


@pytest.mark.parametrize("keep_rate", [0.1, 0.37, 0.8])
def test_calibration_keeps_the_requested_share(tmp_path, keep_rate: float) -> None:
    # 150 clusters whose mean similarities spread over 0.2..0.95 (a beta distribution, like real scores).
    rng = np.random.default_rng(7)
    sims = 0.2 + 0.75 * rng.beta(4, 2, size=150)
    clusters = [vector_cluster(f"https://shop{i}.example/p", equicorrelated(3, s, seed=i)) for i, s in enumerate(sims)]
    config = ClusterFilterConfig(outlier_threshold=None, coherence_threshold=None, target_keep_rate=keep_rate)
    with TestPipeline() as p:
        filtered = p | beam.Create(clusters) | ClusterFilter(config, 3)
        write_stage_extras(filtered, "ClusterFilter", str(tmp_path), "clusters", "cluster_filter", OutputConfig())
    result = beam_counters(p.result, "cluster_filter")
    assert abs(result["clusters"] - keep_rate * 150) <= 1
    assert result["clusters"] + result["incoherent_cluster_clusters"] == 150

    stats = read_stats(str(tmp_path), "clusters")["cluster_filter"]
    assert stats["mode"] == "target_keep_rate" and stats["target_keep_rate"] == keep_rate
    assert stats["clusters_scored"] == 150
    expected = np.sort(sims)[150 - round(keep_rate * 150)]
    assert stats["coherence_threshold"] == pytest.approx(expected, abs=1e-5)
    quantiles = stats["mean_sim_quantiles"]
    assert quantiles["p00"] == pytest.approx(sims.min(), abs=1e-5)
    assert quantiles["p100"] == pytest.approx(sims.max(), abs=1e-5)
    assert quantiles["p50"] == pytest.approx(np.median(sims), abs=0.01)
    assert stats["kept"] == result["clusters"] and not stats["floor_bound"] and stats["floor"] is None


@pytest.mark.parametrize("keep_rate", [0.25, 0.8])
def test_a_calibrated_threshold_never_goes_under_its_floor(tmp_path, keep_rate: float) -> None:
    """Keep at most the rate, and only what passes coherence_threshold: 12 poor pages (mean similarity 0.3-0.6) and
    4 coherent ones (0.8-0.9). With keep rate 0.8 the calibrated threshold (~0.4) is under the floor 0.75, which
    keeps the 4 coherent pages only; with 0.25 the calibration alone keeps those 4 and the floor changes nothing."""
    sims = [0.3 + 0.3 * i / 11 for i in range(12)] + [0.8, 0.83, 0.86, 0.9]
    clusters = [vector_cluster(f"https://shop{i}.example/p", equicorrelated(3, s, seed=i)) for i, s in enumerate(sims)]
    config = ClusterFilterConfig(outlier_threshold=None, target_keep_rate=keep_rate)
    with TestPipeline() as p:
        filtered = p | beam.Create(clusters) | ClusterFilter(config, 3)
        write_stage_extras(filtered, "ClusterFilter", str(tmp_path), "clusters", "cluster_filter", OutputConfig())
        assert_that(filtered.output | beam.Map(lambda c: c.page_url),
                    equal_to([c.page_url for c in clusters[12:]]))
    assert beam_counters(p.result, "cluster_filter")["incoherent_cluster_clusters"] == 12
    stats = read_stats(str(tmp_path), "clusters")["cluster_filter"]
    requested = round(keep_rate * 16)
    assert stats["requested"] == requested and stats["kept"] == 4 and stats["floor"] == 0.75
    assert stats["short_of_request"] == max(0, requested - 4)
    if keep_rate == 0.8:
        assert stats["floor_bound"] and stats["coherence_threshold"] == 0.75
        assert stats["calibrated_threshold"] == pytest.approx(sims[16 - requested], abs=1e-4)
        calibrated = stats["calibrated_threshold"]
        assert cluster_filter_note(stats) == (
            "Cluster filter: the floor cluster_filter.coherence_threshold 0.75 bound the threshold (the calibrated one "
            f"was {calibrated:.4f}); 4 clusters kept of the 13 requested, 9 short.")
    else:
        assert not stats["floor_bound"] and stats["coherence_threshold"] == stats["calibrated_threshold"] >= 0.8
        assert cluster_filter_note(stats) is None


def test_a_run_of_poor_pages_keeps_nothing_above_the_floor(tmp_path) -> None:
    sims = [0.3 + 0.3 * i / 9 for i in range(10)]
    clusters = [vector_cluster(f"https://poor{i}.example/p", equicorrelated(3, s, seed=i)) for i, s in enumerate(sims)]
    with TestPipeline() as p:
        filtered = p | beam.Create(clusters) | ClusterFilter(ClusterFilterConfig(target_keep_rate=0.1), 3)
        write_stage_extras(filtered, "ClusterFilter", str(tmp_path), "clusters", "cluster_filter", OutputConfig())
        assert_that(filtered.output, equal_to([]))
        assert_that(filtered.rejects | beam.Map(lambda r: r.reason), equal_to(["incoherent_cluster"] * 10))
    stats = read_stats(str(tmp_path), "clusters")["cluster_filter"]
    assert stats["floor_bound"] and stats["coherence_threshold"] == 0.75
    assert (stats["requested"], stats["kept"], stats["short_of_request"]) == (1, 0, 1)


def test_fixed_threshold_is_recorded_too(tmp_path) -> None:
    with TestPipeline() as p:
        filtered = p | beam.Create([COHERENT, INCOHERENT]) | ClusterFilter(ClusterFilterConfig(), 3)
        write_stage_extras(filtered, "ClusterFilter", str(tmp_path), "clusters", "cluster_filter", OutputConfig())
    stats = read_stats(str(tmp_path), "clusters")["cluster_filter"]
    assert stats["mode"] == "fixed" and stats["coherence_threshold"] == 0.75 and stats["clusters_scored"] == 2


def test_calibration_with_no_clusters_writes_no_threshold(tmp_path) -> None:
    with TestPipeline() as p:
        filtered = (p | beam.Create([], reshuffle=False).with_output_types(object)
                    | ClusterFilter(ClusterFilterConfig(target_keep_rate=0.5), 3))
        write_stage_extras(filtered, "ClusterFilter", str(tmp_path), "clusters", "cluster_filter", OutputConfig())
        assert_that(filtered.output, equal_to([]))
    stats = read_stats(str(tmp_path), "clusters")["cluster_filter"]
    assert stats["coherence_threshold"] is None and stats["clusters_scored"] == 0


# --- configuration ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"outlier_threshold": 1.5}, {"coherence_threshold": -2.0},
                                    {"target_keep_rate": 0.0}, {"target_keep_rate": 1.2}])
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ClusterFilterConfig(**kwargs)


def test_filter_needs_embeddings() -> None:
    with pytest.raises(ConfigError, match="cluster_filter.enabled=false"):
        build_config("demo", overrides=["embed.enabled=false"])
    config = build_config("demo", overrides=["embed.enabled=false", "cluster_filter.enabled=false",
                                             "semantic_dedup.enabled=false"])
    assert not config.embed.enabled and not config.cluster_filter.enabled
