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
