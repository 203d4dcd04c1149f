"""Phase 1 end to end on the bundled sample: exact clusters, every reject reason, reconciling counts.

The sample's ``expected`` column says what each record was planted as (``scripts/build_sample.py``);
these tests hold the pipeline to it, then check that the multi-process runner and the other input
formats give the same output.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import build_config, to_dict
from schemas.ids import cluster_id
from schemas.parquet import CLUSTERS_SCHEMA, REJECTS_SCHEMA, SCHEMA_VERSION, check_schema_version
from tests.conftest import SAMPLE, PhaseOutput, read_rows, run_command_line, run_pipeline
from tests.formats import write_jsonl, write_webdataset
from transforms.normalize import NormalizeConfig, normalize_image

# Phase 1 without model stages: what the `expected` column describes. (tests/test_phase1_models.py
# runs the sample with them; tests/test_responsible_graph.py with the detector and semantic dedup.)
NO_MODELS: tuple[str, ...] = ("--set", "embed.enabled=false", "--set", "cluster_filter.enabled=false",
                              "--set", "cross_page.enabled=false", "--set", "semantic_dedup.enabled=false",
                              "--set", "detector.enabled=false", "--set", "caption.enabled=false",
                              "--set", "subject.enabled=false", "--set", "prompts.enabled=false")
GALLERY_CAP = 32


def _sources_by_page(clusters: list[dict]) -> dict[str, list[str]]:
    return {c["page_url"]: sorted(im["source"] for im in c["images"]) for c in clusters}


def _row_source(i: int) -> str:
    return f"{SAMPLE}:{i}"


@pytest.fixture(scope="module")
def phase1(tmp_path_factory: pytest.TempPathFactory) -> PhaseOutput:
    return run_pipeline([SAMPLE], tmp_path_factory.mktemp("phase1"), "--profile", "demo", *NO_MODELS)


def test_every_record_meets_its_planted_fate(phase1: PhaseOutput, sample_rows: list[dict]) -> None:
    clusters, rejects = phase1.clusters(), phase1.rejects()
    page_of_source = {im["source"]: c["page_url"] for c in clusters for im in c["images"]}
    reason_of_source = {r["source"]: r["reason"] for r in rejects if r["source"]}
    assert len(reason_of_source) == sum(1 for r in rejects if r["source"]), "one reject row per record"
    too_small_pages = {r["page_url"]: r["n_images"] for r in rejects if r["reason"] == "cluster_too_small"}

    gallery_kept, gallery_capped = [], []
    for i, row in enumerate(sample_rows):
        source, expected = _row_source(i), row["expected"]
        if expected == "kept":
            assert page_of_source.get(source) == row["expected_page"], row["note"]
        elif expected == "gallery":
            assert (source in page_of_source) != (source in reason_of_source), row["note"]
            (gallery_kept if source in page_of_source else gallery_capped).append(row)
            if source in reason_of_source:
                assert reason_of_source[source] == "page_cap"
        elif expected == "cluster_too_small":
            assert source not in page_of_source and source not in reason_of_source, row["note"]
            assert row["expected_page"] in too_small_pages, row["note"]
        else:
            assert reason_of_source.get(source) == expected, row["note"]

    # The cap keeps the images with the smallest ids, whatever their order in the input.
    assert len(gallery_kept) == GALLERY_CAP and len(gallery_capped) == 2
    config = NormalizeConfig()
    kept_ids = {normalize_image(r["image"], config).image_id for r in gallery_kept}
    capped_ids = {normalize_image(r["image"], config).image_id for r in gallery_capped}
    assert max(kept_ids) < min(capped_ids)


def test_every_input_record_is_traced_to_one_fate(phase1: PhaseOutput) -> None:
    """Not only counted: every input record id is a kept image, a record reject, or a member of one whole-cluster
    reject row -- exactly once (identical rows share an id, so ids are compared as a multiset)."""
    from transforms.read import read_parquet

    inputs = collections.Counter(record.record_id for record in read_parquet(str(SAMPLE), batch_rows=64))
    fates: collections.Counter[str] = collections.Counter()
    for cluster in phase1.clusters():
        fates.update(im["record_id"] for im in cluster["images"])
    for row in phase1.rejects():
        if row["record_ids"]:  # a whole-cluster row: its members
            assert len(row["record_ids"]) == len(row["image_ids"]) == row["n_images"], row
            fates.update(row["record_ids"])
        else:
            assert row["n_images"] == 1
            fates[row["id"]] += 1
    assert fates == inputs


def test_exact_expected_clusters(phase1: PhaseOutput, sample_rows: list[dict]) -> None:
    clusters = phase1.clusters()
    expected: dict[str, list[str]] = collections.defaultdict(list)
    for i, row in enumerate(sample_rows):
        if row["expected"] == "kept":
            expected[row["expected_page"]].append(_row_source(i))
    actual = _sources_by_page(clusters)
    gallery = "https://blog.example.org/gallery/all-products"
    assert len(actual.pop(gallery)) == GALLERY_CAP
    assert actual == {page: sorted(sources) for page, sources in expected.items()}
    assert len(clusters) == 33

    for cluster in clusters:
        ids = [im["image_id"] for im in cluster["images"]]
        assert cluster["cluster_id"] == cluster_id(cluster["page_url"], ids)
        assert ids == sorted(ids)
        assert cluster["stats"]["n_images"] == len(ids) >= 3
        assert cluster["domain"] == cluster["page_url"].split("/")[2]
        for im in cluster["images"]:
            assert max(im["width"], im["height"]) <= 768 and min(im["width"], im["height"]) >= 256
            assert len(im["phash"]) == 16 and im["image"]["bytes"][:2] == b"\xff\xd8"  # JPEG
        assert cluster["subject"] is None and cluster["prompts"] == []


def test_manifest_counts_reconcile(phase1: PhaseOutput, sample_rows: list[dict]) -> None:
    manifest = json.loads((phase1.output / "manifest.json").read_text())
    records = manifest["records"]
    expected_reasons = collections.Counter(r["expected"] for r in sample_rows)
    kept = expected_reasons.pop("kept") + GALLERY_CAP
    expected_reasons.pop("gallery")
    expected_reasons["page_cap"] = 2
    assert records == {"input": len(sample_rows), "kept": kept, "rejected": dict(sorted(expected_reasons.items())),
                       "reconciled": True}
    assert records["input"] == records["kept"] + sum(records["rejected"].values())
    assert manifest["clusters"] == {"written": 33, "rejected": {"cluster_too_small": 2}}

    phase = manifest["phases"]["clusters"]
    counters = phase["counters"]
    assert counters["read"] == {"files": 1, "records": len(sample_rows), "splits": 1}
    # Every reject reason is also a Beam counter with the same count.
    for reason, n in records["rejected"].items():
        stage = next(s for s, reasons in phase["rejects_by_stage"].items() if reason in reasons)
        assert counters[stage][reason] == n, reason
    assert counters["dedupe"]["images_kept"] == kept
    assert manifest["config"] == to_dict(build_config("demo", None, NO_MODELS[1::2] if NO_MODELS else ()))
    assert manifest["profile"] == "demo" and manifest["schema_version"] == SCHEMA_VERSION == 2
    assert manifest["versions"]["apache-beam"] and manifest["inputs"]["formats"] == {"parquet": 1}
    assert phase["wall_seconds"] > 0


def test_outputs_carry_their_schema(phase1: PhaseOutput) -> None:
    for folder, name, schema in (("clusters", "clusters", CLUSTERS_SCHEMA), ("rejects", "rejects", REJECTS_SCHEMA)):
        paths = sorted((phase1.output / folder).glob("*.parquet"))
        assert paths
        for path in paths:
            written = pq.read_schema(path)
            check_schema_version(written, name, str(path))
            assert written.names == schema.names
    assert not list(phase1.output.glob("*/beam-temp-*"))


def _comparable(output: PhaseOutput, *, keep_source: bool = True) -> tuple[list[Any], list[Any]]:
    clusters = sorted(output.clusters(), key=lambda c: c["cluster_id"])
    rejects = output.rejects()
    if not keep_source:
        for cluster in clusters:
            for im in cluster["images"]:
                im.pop("source")
        rejects = [{k: v for k, v in r.items() if k not in ("source", "id")} for r in rejects]
    rejects.sort(key=lambda r: json.dumps(r, sort_keys=True, default=str))
    return clusters, rejects


@pytest.mark.slow
def test_multi_process_runner_gives_the_same_output(sample_phase1: PhaseOutput, tmp_path) -> None:
    """The demo profile, every phase-1 stage and model on (CLIP, NudeNet, semantic dedup, the offline model stages),
    on two SDK worker processes -- chosen by the ``workers`` section, as for a large input, from the command line:
    the in-process run's clusters (embeddings and all), rejects and statistics, and a console as quiet as its own."""
    out = tmp_path / "multi"
    console = run_command_line("run", "--profile", "demo", "--input", str(SAMPLE), "--output", str(out),
                               "--phases", "clusters", "--set", "workers.min_records=100",
                               "--set", "workers.processes=2")
    assert console.returncode == 0, console.stderr[-4000:]
    multi = PhaseOutput(out, json.loads((out / "manifest.json").read_text(encoding="utf-8")), console)
    assert multi.manifest["phases"]["clusters"]["execution"] == {
        "mode": "multi_processing", "workers": 2, "reason": "at least 100 records (workers.min_records)"}
    assert sample_phase1.manifest["phases"]["clusters"]["execution"]["mode"] == "in_memory"
    assert "Phase clusters finished in" in console.stdout and "(DirectRunner, 2 worker processes)" in console.stdout
    # The workers' progress reaches the console as the launching process's own lines do; their harness's start-up
    # lines, their libraries' noise and Beam's relay format do not (the start-up lines are in OUT/workers.log).
    assert "read: 282 records from" in console.stderr and "transforms.read:" in console.stderr
    assert console.stderr.count("random weights: its similarities mean nothing") == 2  # once per worker
    for noise in ("initialized randomly", "no CLIP weights found", "semi_persistent_directory", "Worker: ",
                  "sdk_worker", "Traceback", "apitools"):
        assert noise not in console.stderr, noise
    assert "semi_persistent_directory" in (out / "workers.log").read_text()  # the harness start-up lines
    assert "read: 282 records from" in (out / "run.log").read_text()
    assert _comparable(multi) == _comparable(sample_phase1)
    assert multi.manifest["records"] == sample_phase1.manifest["records"]
    expected, actual = sample_phase1.manifest["phases"]["clusters"], multi.manifest["phases"]["clusters"]
    assert actual["stats"] == expected["stats"]  # the calibrated coherence threshold
    for stage in ("safety", "semantic_dedup", "embed"):
        assert actual["counters"][stage] == expected["counters"][stage], stage


@pytest.mark.slow
def test_three_input_formats_give_identical_clusters(phase1: PhaseOutput, sample_rows: list[dict], tmp_path) -> None:
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "paths").mkdir()
    jsonl = write_jsonl(sample_rows, str(tmp_path / "jsonl" / "crawl.jsonl"))
    jsonl_gz = write_jsonl(sample_rows, str(tmp_path / "paths" / "crawl.jsonl.gz"), image_mode="path", gz=True)
    tar = write_webdataset(sample_rows, str(tmp_path / "crawl-00000.tar"))
    reference = _comparable(phase1, keep_source=False)
    for name, path in (("jsonl", jsonl), ("jsonl_gz", jsonl_gz), ("webdataset", tar)):
        out = run_pipeline([path], tmp_path / f"out-{name}", "--profile", "demo", *NO_MODELS)
        clusters, rejects = _comparable(out, keep_source=False)
        assert clusters == reference[0], name
        assert [(r["reason"], r["page_url"]) for r in rejects] == [(r["reason"], r["page_url"]) for r in reference[1]]
        assert out.manifest["records"] == phase1.manifest["records"], name


def test_mixed_inputs_and_rerun_replaces_old_output(sample_rows: list[dict], tmp_path) -> None:
    half = len(sample_rows) // 2
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(sample_rows[:half]), tmp_path / "in" / "a.parquet")
    write_jsonl(sample_rows[half:], str(tmp_path / "in" / "b.jsonl"))
    out = tmp_path / "out"
    first = run_pipeline([tmp_path / "in" / "a.parquet", tmp_path / "in" / "b.jsonl"], out,
                         "--set", "output.num_shards=3", *NO_MODELS)
    assert len(list((out / "clusters").glob("*.parquet"))) == 3
    second = run_pipeline([tmp_path / "in" / "*"], out, "--set", "output.num_shards=1", *NO_MODELS)
    assert len(list((out / "clusters").glob("*.parquet"))) == 1
    assert second.manifest["records"] == first.manifest["records"]
    assert second.manifest["records"]["input"] == len(sample_rows) and second.manifest["records"]["reconciled"]
    assert second.manifest["inputs"]["formats"] == {"jsonl": 1, "parquet": 1}


def test_config_overrides_change_the_outcome(tmp_path) -> None:
    out = run_pipeline([SAMPLE], tmp_path, "--set", "group.min_images=6", "--set", "dedupe.boilerplate_max_pages=40",
                       *NO_MODELS)
    records = out.manifest["records"]
    assert "boilerplate" not in records["rejected"]  # the badge is on 31 pages, the logo on 25
    assert records["reconciled"] and records["rejected"]["cluster_too_small"] > 3
    assert all(c["stats"]["n_images"] >= 6 for c in read_rows(tmp_path, "clusters"))


def test_command_line_run_prints_the_funnel_without_noise(sample_phase1: PhaseOutput) -> None:
    """``icl-pipeline run --profile demo`` on the sample (the session's phase-1 run is that command)."""
    result, out = sample_phase1.console, sample_phase1.output
    assert result is not None and result.returncode == 0, result
    assert "input records" in result.stdout and "counts reconcile: yes" in result.stdout
    assert "boilerplate" in result.stdout and str(out) in result.stdout
    assert "read: 282 records from" in result.stderr  # progress from the workers
    # Quiet: the tiny model announced once by us, not by open_clip; no runner notice; no tracebacks.
    assert result.stderr.count("random weights: its similarities mean nothing") == 1
    for noise in ("initialized randomly", "no CLIP weights found", "Missing pipeline option", "Traceback",
                  "apitools"):
        assert noise not in result.stderr, noise
    assert (out / "manifest.json").exists()
    assert "phase clusters: running" in (out / "run.log").read_text()
    assert "(DirectRunner, in one process)" in result.stdout
    assert "under workers.min_records" in sample_phase1.manifest["phases"]["clusters"]["execution"]["reason"]
    assert not (out / "workers.log").exists()  # no worker process, nothing on its standard error


def test_command_line_errors_are_clear(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """In-process (each error stops the command before any pipeline is built)."""
    from pipeline.cli import main

    def cli(*args: str) -> tuple[int, str]:
        status = main(list(args))
        return status, capsys.readouterr().err

    bad = tmp_path / "crawl.parquet"
    bad.write_text("not parquet")
    status, err = cli("run", "--input", str(bad), "--output", str(tmp_path / "out"))
    assert status == 2 and f"{bad}: not a readable Parquet file" in err
    status, err = cli("run", "--input", str(SAMPLE), "--output", str(tmp_path / "out"), "--set", "group.min_image=2")
    assert status == 2 and "did you mean 'group.min_images'" in err
    status, err = cli("run", "--input", str(SAMPLE), "--output", str(tmp_path / "out"), "--phases", "assemble,clusters")
    assert status == 2 and "--phases" in err
    status, err = cli("run", "--output", str(tmp_path / "out"))
    assert status == 2 and "needs at least one --input" in err
    status, err = cli("run", "--input", str(SAMPLE), "--output", str(tmp_path / "out"), "--runner", "DaskRunner")
    assert status == 2 and "docs/runners.md" in err


def test_help_documents_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    """In-process (``icl-pipeline`` itself is run as a command by the session's phase-1 run)."""
    from pipeline.cli import main
    from pipeline.config import describe

    def cli(*args: str) -> str:
        assert main(list(args)) == 0
        return capsys.readouterr().out

    top = cli("--help")
    assert "run" in top and "config" in top
    run_help = cli("run", "--help")
    for flag in ("--input", "--output", "--profile", "--config", "--set", "--phases", "--runner",
                 "--direct_num_workers"):
        assert flag in run_help, flag
    keys = cli("config", "--list")
    for doc in describe():
        assert doc.key in keys
        assert doc.help, f"{doc.key} has no help text"
    assert "workers.min_records" in keys
