"""The safety and semantic-dedup stages at their places in the phase-1 graph, on the bundled sample with the demo
profile: read -> normalize -> group -> dedupe -> **safety** -> embed -> cluster filter -> cross-page ->
**semantic dedup**. Every input record is kept or rejected with a reason (the stages are not yet wired into
pipeline/run.py; this is the graph the integrator builds)."""

from __future__ import annotations

import pickle
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from pipeline.config import build_config
from tests.clip_helpers import counters
from tests.conftest import SAMPLE
from transforms.cluster_filter import ClusterFilter
from transforms.cross_page import CrossPageDedupe
from transforms.dedupe import Dedupe, FindBoilerplate
from transforms.embed import Embed
from transforms.group import GroupByPage
from transforms.models.detectors import DetectorConfig
from transforms.normalize import Normalize
from transforms.read import ReadPairs, expand_inputs
from transforms.safety import NsfwConfig, PeopleConfig, Safety
from transforms.semantic_dedup import SemanticDedup, SemanticDedupConfig


def save_to(path: Path):
    def save(actual: list) -> None:
        path.write_bytes(pickle.dumps(list(actual)))
    return save


@pytest.mark.slow
def test_sample_through_phase1_with_the_new_stages(tmp_path: Path) -> None:
    config = build_config("demo")
    min_images = config.group.min_images
    with TestPipeline() as p:
        records, read_rejects = p | "Read" >> ReadPairs(expand_inputs([str(SAMPLE)]), config.read)
        images, normalize_rejects = records | "Normalize" >> Normalize(config.normalize)
        boilerplate = images | "FindBoilerplate" >> FindBoilerplate(config.dedupe)
        pages, group_rejects = (images, boilerplate) | "GroupByPage" >> GroupByPage(config.group)
        clusters, dedupe_rejects = pages | "Dedupe" >> Dedupe(config.dedupe, min_images)
        clusters, safety_rejects = clusters | "Safety" >> Safety(DetectorConfig(), PeopleConfig(), NsfwConfig(),
                                                                 config.normalize, min_images)
        clusters, embed_rejects = clusters | "Embed" >> Embed(config.embed, min_images)
        clusters, filter_rejects = clusters | "ClusterFilter" >> ClusterFilter(config.cluster_filter, min_images,
                                                                               str(tmp_path))
        clusters, cross_rejects = clusters | "CrossPageDedupe" >> CrossPageDedupe(config.cross_page)
        clusters, semantic_rejects = clusters | "SemanticDedup" >> SemanticDedup(SemanticDedupConfig(), min_images)
        rejects = (read_rejects, normalize_rejects, group_rejects, dedupe_rejects, safety_rejects, embed_rejects,
                   filter_rejects, cross_rejects, semantic_rejects) | "CollectRejects" >> beam.Flatten()
        assert_that(clusters | "KeptImages" >> beam.Map(lambda c: [(im.face_count, im.nsfw_score, im.faces_blurred)
                                                                   for im in c.images]),
                    save_to(tmp_path / "kept.pickle"), label="SaveKept")
        assert_that(rejects | "RejectRows" >> beam.Map(lambda r: (r.stage, r.reason, r.n_images)),
                    save_to(tmp_path / "rejects.pickle"), label="SaveRejects")
    kept = pickle.loads((tmp_path / "kept.pickle").read_bytes())
    rejects = pickle.loads((tmp_path / "rejects.pickle").read_bytes())
    n_input = counters(p.result, "read")["records"]
    assert sum(len(c) for c in kept) + sum(n for _, _, n in rejects) == n_input
    # No person and nothing explicit in the DreamBench sample: the safety stage keeps everything, unchanged.
    assert not [r for r in rejects if r[0] == "safety"]
    assert all(faces == 0 and blurred == 0 and score < 0.7 for c in kept for faces, score, blurred in c)
    safety = counters(p.result, "safety")
    assert safety.get("faces", 0) == 0 and safety["images_checked"] == sum(
        v for k, v in safety.items() if k.startswith("nsfw_score_bin_"))
    # Semantic dedup ran on the kept clusters with the tiny CLIP (its decisions mean nothing, its accounting does).
    semantic = counters(p.result, "semantic_dedup")
    assert semantic["cluster_items"] >= 1 and semantic["image_items"] >= 3
    assert {reason for stage, reason, _ in rejects if stage == "semantic_dedup"} <= {
        "semantic_duplicate_image", "semantic_duplicate_cluster", "cluster_too_small"}
