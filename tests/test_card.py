"""The dataset card: every column documented, a valid Hugging Face header, licences stated or said unknown."""

from __future__ import annotations

import yaml

from pipeline.card import EXAMPLE_FIELDS, CardConfig, dataset_card, schema_fields
from schemas.parquet import EXAMPLES_SCHEMA

MANIFEST = {
    "version": "0.1.0", "created": "2026-01-01T00:00:00+00:00", "profile": "local", "runner": "DataflowRunner",
    "config_hash": "abc", "config": {"embed": {"model": "ViT-L-14", "pretrained": "datacomp_xl_s13b_b90k"},
                                     "synth": {"model": {"name": "stable-diffusion-v1-5/stable-diffusion-v1-5"}}},
    "candidates": {"input": 8, "examples": 2, "rejected": {"blurry": 6}, "keep_rate": 0.25},
    "funnel": [{"step": "input candidates", "unit": "candidates", "count": 8},
               {"step": "examples", "unit": "examples", "count": 2, "rejected": {"blurry": 6}}],
    "phases": {"assemble": {"rejects_by_stage": {"target_filter": {"blurry": 6}},
                            "stats": {"target_filter": {"mode": "fixed", "bounds": {"min_sharpness": 25.0}}}}},
}


def test_every_column_of_the_examples_is_documented() -> None:
    names = [name for name, _ in schema_fields(EXAMPLES_SCHEMA)]
    assert set(names) == set(EXAMPLE_FIELDS), set(names) ^ set(EXAMPLE_FIELDS)
    assert "target.source_image_id" in names and "demos.caption" in names


def test_card_header_is_valid_and_licences_are_unknown_unless_told() -> None:
    card = dataset_card(MANIFEST, CardConfig(), present={"examples/*.parquet", "manifest.json"})
    header = yaml.safe_load(card.split("---")[1])
    assert header["license"] == "unknown" and header["configs"][0]["data_files"] == "examples/*.parquet"
    assert "licences of the input images and texts are **unknown**" in card
    assert "tiny random" not in card  # real models: no demo banner
    assert "`candidates/*.parquet`" not in card and "`examples/*.parquet`" in card  # only what the output holds
    assert "| input candidates | 8 | candidates |" in card and "| examples | 2 | examples | blurry 6 |" in card
    assert "| target_filter | min_sharpness | 25 |" in card
    told = dataset_card(MANIFEST, CardConfig(license="cc-by-4.0", license_note="Photos by the authors."))
    assert yaml.safe_load(told.split("---")[1])["license"] == "cc-by-4.0" and "Photos by the authors." in told


def test_card_states_the_floors_that_bound_a_run_and_the_responsible_data_checks() -> None:
    """A run whose every cluster and render was poor: the calibrated bounds stood on their floors and nothing was
    kept; the card says so, with the people, NSFW and semantic-dedup settings."""
    from pipeline.config import build_config, to_dict
    from transforms.cluster_filter import calibration_stats
    from transforms.settings import ClusterFilterConfig, TargetFilterConfig
    from transforms.target_filter import Bounds, calibrate, filter_stats

    cluster_filter = calibration_stats([0.3, 0.4, 0.5, 0.6], 10, 0.75, ClusterFilterConfig(target_keep_rate=0.5),
                                       calibrated=0.45, n_kept=0)
    calibration = calibrate([0] * 1001, [0.3, 0.5], [0.05, 0.2], 14, 0.25, Bounds(0.7, 0.25), below_floors=14)
    target_filter = filter_stats(calibration, [], 14, TargetFilterConfig())
    manifest = {**MANIFEST, "config": to_dict(build_config("local")),
                "phases": {"clusters": {"stats": {"cluster_filter": cluster_filter}},
                           "assemble": {**MANIFEST["phases"]["assemble"], "stats": {"target_filter": target_filter}}}}
    card = dataset_card(manifest, CardConfig())
    assert "| cluster_filter | floor (coherence_threshold) | 0.75 |" in card
    assert "| target_filter | floor (min_subject_sim) | 0.7 |" in card
    assert ("Cluster filter: the floor cluster_filter.coherence_threshold 0.75 bound the threshold (the calibrated one "
            "was 0.4500); 0 clusters kept of the 5 requested, 5 short.") in card
    assert "Target filter: the floor target_filter.min_subject_sim 0.7 bound it" in card
    assert "14 candidates passing the absolute checks are under a floor" in card
    assert "0 kept of the 4 requested, 4 short (limited by the floors)" in card
    assert "| safety | people.policy | drop |" in card and "| semantic_dedup | image_threshold | 0.95 |" in card
    assert "| safety, nsfw_targets | nsfw.buttocks_exposed | 0.7 |" in card
    assert "- **People**: faces were detected with NudeNet" in card and "docs/safety.md" in card
    # A run without the detector says what was not checked.
    off = {**manifest, "config": to_dict(build_config("local", overrides=["detector.enabled=false"]))}
    assert "not checked (detector.enabled false)" in dataset_card(off, CardConfig())
