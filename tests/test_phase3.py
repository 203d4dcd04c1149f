"""The three phases end to end on the bundled sample (what `make demo` runs), and trainers reading the result.

The demo's tiny random models make every score meaningless, so what is checked is the machinery: counts that
reconcile from input records to examples, the calibrated keep rate, examples that never show their target's
source, the dataset card, and the shards as trainers read them (the project's reader across 2 ranks x 3
DataLoader workers, and Hugging Face ``datasets``).
"""

from __future__ import annotations

import collections
import io
import os

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.run import run
from schemas.reader import ExamplesDataset, iter_examples, list_shards
from tests.conftest import PhaseOutput, read_rows
from transforms.read import InputFormatError
from transforms.target_filter import ORDER


def test_counts_reconcile_from_input_records_to_examples(demo_run: PhaseOutput, sample_rows: list) -> None:
    manifest, out = demo_run.manifest, demo_run.output
    assert list(manifest["phases"]) == ["clusters", "synthesize", "assemble"]
    records = manifest["records"]
    assert records["input"] == len(sample_rows) and records["reconciled"]
    synth = manifest["phases"]["synthesize"]
    assert synth["clusters"]["input"] == manifest["clusters"]["written"] == len(demo_run.clusters())
    assert synth["clusters"]["reconciled"]
    candidates = manifest["candidates"]
    examples, rejects = read_rows(out, "examples"), demo_run.rejects("assemble")
    assert candidates["input"] == synth["candidates"] == len(read_rows(out, "candidates")) > 0
    assert candidates["input"] == len(examples) + len(rejects) and candidates["reconciled"]
    assert candidates["examples"] == len(examples) > 0
    assert collections.Counter(r["reason"] for r in rejects) == collections.Counter(candidates["rejected"])

    # Each step of the funnel is the previous one less what left before it (units change at clusters and at
    # candidates).
    funnel = manifest["funnel"]
    assert [s["step"] for s in funnel] == ["input records", "images kept in clusters", "clusters written",
                                           "clusters synthesized", "candidates rendered", "candidates scored",
                                           "kept by the target filter", "examples"]
    for previous, step in zip(funnel, funnel[1:], strict=False):
        if "rejected" in step:
            assert previous["count"] - sum(step["rejected"].values()) == step["count"], step
    assert funnel[-1]["count"] == len(examples)


def test_the_target_filter_is_calibrated_on_the_run(demo_run: PhaseOutput) -> None:
    assemble = demo_run.manifest["phases"]["assemble"]
    stats = assemble["stats"]["target_filter"]
    candidates = demo_run.manifest["candidates"]
    assert stats["mode"] == "target_keep_rate" and stats["target_keep_rate"] == 0.25
    assert abs(candidates["kept_by_filter"] - round(0.25 * candidates["scored"])) <= 1
    assert stats["bounds"]["min_side"] == 64 and stats["bounds"]["max_copy_sim"] is None  # the demo profile's
    assert stats["bounds"]["min_subject_sim"] is not None and stats["bounds"]["min_text_sim"] is not None
    assert set(stats["score_quantiles"]) == {"subject_sim", "subject_sim_max", "text_sim", "copy_distance",
                                             "brightness", "contrast", "sharpness", "nsfw_score"}
    # The demo's floors are off (its tiny CLIP's similarities mean nothing): none bound the calibrated bounds.
    assert not stats["calibration"]["floor_bound"] and stats["calibration"]["below_floors"] == 0
    assert candidates["keep_rate"] == pytest.approx(candidates["examples"] / candidates["input"])
    scores = read_rows(demo_run.output, "scores")
    assert len(scores) == candidates["scored"]
    assert {r["decision"] for r in scores} <= {"kept", *ORDER}
    assert sum(r["decision"] == "kept" for r in scores) == candidates["kept_by_filter"]


def test_examples_pair_real_demos_with_a_target_that_is_none_of_them(demo_run: PhaseOutput) -> None:
    clusters = {c["cluster_id"]: c for c in demo_run.clusters()}
    candidates = {c["candidate_id"]: c for c in read_rows(demo_run.output, "candidates")}
    examples = read_rows(demo_run.output, "examples")
    assert len({e["example_id"] for e in examples}) == len(examples)
    for example in examples:
        cluster = clusters[example["cluster_id"]]
        images = {im["image_id"]: im for im in cluster["images"]}
        demo_ids = [d["image_id"] for d in example["demos"]]
        target = example["target"]
        assert len(demo_ids) == 3 == len(set(demo_ids)) and set(demo_ids) <= set(images)
        assert target["source_image_id"] in images and target["source_image_id"] not in demo_ids
        assert all(d["image"] == images[d["image_id"]]["image"] and d["caption"] == images[d["image_id"]]["caption"]
                   for d in example["demos"])
        candidate = candidates[target["candidate_id"]]
        assert target["image"] == candidate["image"] and target["rendered_prompt"] == candidate["prompt"]
        assert "sks" not in target["prompt"] and (example["subject"] or "") in target["prompt"]
        assert example["provenance"]["config_hash"] == demo_run.manifest["config_hash"]
        assert example["provenance"]["clip_model"] == "open_clip:tiny-random/random(seed=0)"
        assert example["provenance"]["prompts_backend"] == "templates"


def test_outputs_card_and_report_are_written(demo_run: PhaseOutput) -> None:
    out = demo_run.output
    assemble = demo_run.manifest["phases"]["assemble"]
    assert assemble["examples"]["files"] >= 2 and assemble["examples"]["row_groups"] > assemble["examples"]["files"]
    assert (out / "README.md").is_file() and (out / "report" / "index.html").is_file()
    assert demo_run.manifest["card"] == str(out / "README.md")
    card = (out / "README.md").read_text()
    assert card.startswith("---\npretty_name:") and "license: other" in card
    assert "data_files: examples/*.parquet" in card
    assert "tiny random-weight models" in card and "`target.source_image_id`" in card
    assert f"| examples | {demo_run.manifest['candidates']['examples']:,} | examples |" in card
    licences = card.split("## Licences")[1]
    assert "DreamBench" in licences and "Creative Commons Attribution 4.0" in licences
    for reason in demo_run.manifest["candidates"]["rejected"]:
        assert f"| assemble | target_filter | {reason} |" in card


# --- trainers reading the real output -------------------------------------------------------------------

def test_the_reader_streams_every_real_example_decoded(demo_run: PhaseOutput) -> None:
    pattern = str(demo_run.output / "examples" / "*.parquet")
    examples = list(iter_examples(pattern))
    assert len(examples) == demo_run.manifest["candidates"]["examples"]
    for example in examples[:3]:
        target = example["target"]["image"]
        assert isinstance(target, Image.Image) and target.size == (example["target"]["width"],
                                                                   example["target"]["height"])
        assert all(d["image"].size == (d["width"], d["height"]) for d in example["demos"])


def test_two_ranks_times_three_workers_read_every_real_example_once(demo_run: PhaseOutput) -> None:
    pattern = str(demo_run.output / "examples" / "*.parquet")
    expected = sorted(r["example_id"] for r in read_rows(demo_run.output, "examples"))
    seen = []
    for rank in range(2):
        dataset = ExamplesDataset(pattern, rank=rank, world_size=2, seed=3,
                                  columns=["example_id", "demos", "target"])
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=3, multiprocessing_context="fork")
        ids = []
        for example in loader:
            assert example["target"]["image"].dtype == torch.uint8 and len(example["demos"]) == 3
            ids.append(example["example_id"])
        assert len(ids) == len(dataset)
        seen += ids
    assert sorted(seen) == expected and len(set(seen)) == len(seen)
    assert len(ExamplesDataset(pattern).units) >= 6  # enough row groups that every reader has work


def test_hugging_face_datasets_gives_pil_images_for_every_image_column(demo_run: PhaseOutput, tmp_path) -> None:
    """examples/, clusters/ and candidates/ load with datasets itself; every image column is its Image feature."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets
    from PIL import Image

    shards = list_shards(str(demo_run.output / "examples" / "*.parquet"))
    first = pq.read_table(shards[0])
    loaded = datasets.load_dataset("parquet", data_files=shards[0], split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == first.num_rows
    assert loaded[0]["example_id"] == first.column("example_id")[0].as_py()
    target = loaded[0]["target"]["image"]
    stored = Image.open(io.BytesIO(first.column("target")[0].as_py()["image"]["bytes"]))
    assert isinstance(target, Image.Image) and target.size == stored.size
    assert target.convert("RGB").tobytes() == stored.convert("RGB").tobytes()
    assert len(loaded[0]["demos"]) == 3 and all(isinstance(d["image"], Image.Image) for d in loaded[0]["demos"])
    assert loaded[0]["scores"]["text_sim"] is not None

    for folder, column in (("clusters", lambda row: row["images"][0]["image"]),
                           ("candidates", lambda row: row["image"])):
        files = sorted(str(p) for p in (demo_run.output / folder).glob("*.parquet"))
        data = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / folder))
        assert isinstance(column(data[0]), Image.Image), folder


# --- phase 3 alone ----------------------------------------------------------------------------------------

def test_phase_three_alone_gives_the_same_examples(demo_run: PhaseOutput, tmp_path) -> None:
    """From the candidates and clusters of another output (``--input``, ``assemble.clusters``): the same examples,
    ids and shards as the run of all three phases (phase 3 on worker processes: the portable-runner test)."""
    out = tmp_path / "again"
    manifest = run(["--phases", "assemble", "--input", str(demo_run.output / "candidates" / "*.parquet"),
                    "--output", str(out), "--profile", "demo",
                    "--set", f"assemble.clusters={demo_run.output / 'clusters' / '*.parquet'}",
                    "--set", "assemble.shard_bytes=400000", "--set", "assemble.row_group_bytes=150000",
                    "--set", "report.enabled=false"])
    assert manifest["candidates"]["reconciled"] and "records" not in manifest
    assert manifest["funnel"][0] == {"step": "input candidates", "unit": "candidates",
                                     "count": demo_run.manifest["candidates"]["input"]}
    assert not (out / "report").exists() and (out / "README.md").exists()

    def shards(root) -> dict:
        return {os.path.basename(p): pq.read_table(p, columns=["example_id"]).column("example_id").to_pylist()
                for p in list_shards(str(root / "examples" / "*.parquet"))}

    assert shards(out) == shards(demo_run.output)
    assert manifest["candidates"]["rejected"] == demo_run.manifest["candidates"]["rejected"]


def test_phase_three_needs_candidates(sample_phase1: PhaseOutput) -> None:
    with pytest.raises(InputFormatError, match="matches no file .*phase assemble reads the synthesize phase's"):
        run(["--phases", "assemble", "--output", str(sample_phase1.output)])


def test_cost_of_synthesis_is_in_the_manifest_card_and_report(demo_run: PhaseOutput) -> None:
    """GPU-seconds per cluster and per kept example, and hours for N, from the run's own seconds."""
    manifest = demo_run.manifest
    run_cost = manifest["cost"]
    seconds = manifest["phases"]["synthesize"]["seconds_per_cluster"]["total"]
    examples = manifest["candidates"]["examples"]
    assert run_cost["seconds_per_cluster"] == round(seconds["mean"], 3) > 0
    assert run_cost["seconds_per_example"] == round(seconds["total"] / examples, 3)
    assert run_cost["hours_per_10000_clusters"] == round(seconds["mean"] * 10_000 / 3600, 2)
    assert run_cost["hours_per_100000_examples"] == round(seconds["total"] / examples * 100_000 / 3600, 2)
    card = (demo_run.output / "README.md").read_text()
    assert f"{run_cost['seconds_per_example']:.2f} per kept example" in card
    report = (demo_run.output / "report" / "index.html").read_text()
    assert "synthesis cost per kept example" in report
