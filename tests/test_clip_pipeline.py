"""Phase 1 end to end on the bundled sample with the CLIP stages on (demo profile: tiny-random model)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import build_config
from tests.conftest import SAMPLE, PhaseOutput, run_pipeline
from transforms.models.clip import model_id

CLIP_STAGES = {"embed", "cluster_filter", "cross_page", "semantic_dedup", "decontaminate"}


def test_demo_run_embeds_scores_and_calibrates(sample_phase1: PhaseOutput) -> None:
    manifest = sample_phase1.manifest
    assert manifest["records"]["reconciled"]
    clusters = sample_phase1.clusters()
    assert clusters
    for cluster in clusters:
        stats = cluster["stats"]
        assert stats["n_images"] == len(cluster["images"]) >= 3
        assert stats["mean_sim"] is not None and stats["min_sim"] <= stats["mean_sim"] <= 1.0 + 1e-6
        vectors = np.array([image["embedding"] for image in cluster["images"]], dtype=np.float32)
        assert vectors.shape == (len(cluster["images"]), 64)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)  # stored as float16
        coherence = [image["coherence"] for image in cluster["images"]]
        assert np.mean(coherence) == pytest.approx(stats["mean_sim"], abs=1e-4)
        assert cluster["provenance"]["embed_model"] == model_id(build_config("demo").embed)  # phase 3 reuses them

    calibration = manifest["phases"]["clusters"]["stats"]["cluster_filter"]
    assert calibration["mode"] == "target_keep_rate" and calibration["target_keep_rate"] == 0.75
    threshold = calibration["coherence_threshold"]
    assert all(c["stats"]["mean_sim"] >= threshold - 1e-6 for c in clusters)
    incoherent = [r for r in sample_phase1.rejects() if r["reason"] == "incoherent_cluster"]
    assert incoherent and all(f"< coherence threshold {threshold:.4f}" in r["detail"] for r in incoherent)
    scored = calibration["clusters_scored"]
    kept_by_filter = scored - len(incoherent)
    assert kept_by_filter == round(0.75 * scored)
    counters = manifest["phases"]["clusters"]["counters"]
    assert counters["embed"]["images"] == sum(c["stats"]["n_images"] for c in clusters) + sum(
        r["n_images"] for r in sample_phase1.rejects() if r["stage"] in CLIP_STAGES - {"embed"})
    # Whole-cluster drops are counted as clusters too.
    assert manifest["clusters"]["rejected"]["incoherent_cluster"] == len(incoherent)


@pytest.mark.slow
def test_clip_stages_switch_off(tmp_path) -> None:
    out = run_pipeline([SAMPLE], tmp_path, "--profile", "demo", "--set", "embed.enabled=false",
                       "--set", "cluster_filter.enabled=false", "--set", "cross_page.enabled=false",
                       "--set", "semantic_dedup.enabled=false", "--set", "detector.enabled=false")
    assert out.manifest["records"]["reconciled"]
    assert not [r for r in out.rejects() if r["stage"] in CLIP_STAGES]
    assert all(im["embedding"] is None and im["coherence"] is None for c in out.clusters() for im in c["images"])
    assert "cluster_filter" not in out.manifest["phases"]["clusters"]["stats"]
    assert "embed" not in out.manifest["phases"]["clusters"]["counters"]


def test_embeddings_need_not_be_stored(tmp_path) -> None:
    out = run_pipeline([SAMPLE], tmp_path, "--profile", "demo", "--set", "detector.enabled=false",
                       "--set", "embed.store_embeddings=false",
                       "--set", "cluster_filter.target_keep_rate=1.0")
    clusters = out.clusters()
    assert clusters and all(im["embedding"] is None for c in clusters for im in c["images"])
    assert all(c["provenance"]["embed_model"] is None for c in clusters)  # nothing stored to reuse in phase 3
    assert all(im["coherence"] is not None for c in clusters for im in c["images"])  # the scores stay
    # Every scored cluster is kept at a keep rate of 1; the teapot's second shop is still a duplicate.
    assert not [r for r in out.rejects() if r["reason"] == "incoherent_cluster"]
    assert len([r for r in out.rejects() if r["reason"] == "duplicate_cluster"]) == 1
    assert out.manifest["records"]["reconciled"]
