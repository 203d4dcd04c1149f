"""Phase 2 (synthesize) through Beam: candidates, resume, failure isolation, the GPU step, on CPU.

Real clusters of DreamBench photos from phase 1 on the bundled sample, a tiny random Stable Diffusion
saved to a test directory and loaded through ``from_pretrained``, real Parquet in and out.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Iterator

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipeline.config import ConfigError, build_config
from pipeline.phases import build_synthesize_pipeline
from pipeline.run import UsageError, run
from schemas.parquet import CANDIDATES_SCHEMA, SCHEMA_VERSION, candidate_from_row, candidate_to_row, image_bytes
from tests.conftest import SAMPLE, PhaseOutput, read_rows
from tests.tiny_models import (
    broken_copy,
    one_torch_thread,
    read_clusters,
    with_prompts,
    write_clusters_file,
)
from transforms.read import InputFormatError
from transforms.scene_templates import LIVE_ONLY, template_prompts
from transforms.synthesize import (
    BeamStorage,
    SynthConfig,
    SynthesizeFn,
    cluster_prompts,
    synthesis_hash,
)

PROMPTS = (("a photo of {subject} on a beach", "recontextualization"),
           ("a painting of {subject} in the style of Monet", "stylization"),
           ("a photo of {subject} seen from above", "novel_view"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> list:
    """The sample's clusters from phase 1 without the model stages: no subject, no prompts (the fallback's case)."""
    from tests.test_phase1 import NO_MODELS

    out = tmp_path_factory.mktemp("plain_phase1")
    run(["--input", str(SAMPLE), "--output", str(out), "--profile", "demo", "--phases", "clusters", *NO_MODELS])
    return read_clusters(out)


def _overrides(model_dir: str, **extra: object) -> list[str]:
    settings = {"synth.model.name": model_dir, "synth.train.steps": 3, "synth.train.learning_rate": 1e-3,
                "synth.sample.steps": 2, "synth.sample.images_per_prompt": 2, "synth.max_prompts": 2, **extra}
    return [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]


def _config(model_dir: str, **extra: object) -> SynthConfig:
    overrides = [o for o in _overrides(model_dir, **extra) if o != "--set"]
    return build_config("demo", overrides=overrides).synth


def _run_synthesize(clusters_file: str, output: str, model_dir: str, *args: str, **extra: object) -> dict:
    return run(["--phases", "synthesize", "--input", clusters_file, "--output", output,
                *_overrides(model_dir, **extra), *args])


# --- the stage in a TestPipeline ------------------------------------------------------------------------

def test_stage_renders_candidates_and_rejects_the_broken_cluster(tiny_sd_dir, clusters, tmp_path, caplog) -> None:
    teapot = with_prompts(clusters[0], "teapot", PROMPTS, subject="red ceramic teapot")
    plain = clusters[1]  # phase 1 without the prompts stage: no class noun, no prompts
    broken = broken_copy(clusters[2])
    files = [write_clusters_file([teapot, plain, broken], tmp_path / "clusters.parquet")]
    config = build_config("demo", overrides=[o for o in _overrides(tiny_sd_dir) if o != "--set"])

    caplog.set_level(logging.INFO, logger="transforms.synthesize")
    p = TestPipeline()
    out = build_synthesize_pipeline(p, config, files, str(tmp_path / "out"))
    keys = out["candidates"] | "Keys" >> beam.Map(lambda c: (c.cluster_id, c.prompt, c.skill, c.k))
    # The prompt-less cluster renders the template grammar's prompts for an unknown object ("sks object").
    fallback = template_prompts(plain.cluster_id, None, False, config.synth.fallback_prompts)[:2]
    rendered = [(plain.cluster_id, p.prompt.replace("{subject}", "sks object"), p.skill, k)
                for p in fallback for k in (0, 1)]
    assert_that(keys, equal_to([
        (teapot.cluster_id, "a photo of sks teapot on a beach", "recontextualization", 0),
        (teapot.cluster_id, "a photo of sks teapot on a beach", "recontextualization", 1),
        (teapot.cluster_id, "a painting of sks teapot in the style of Monet", "stylization", 0),
        (teapot.cluster_id, "a painting of sks teapot in the style of Monet", "stylization", 1),
    ] + rendered), label="Candidates")
    reasons = out["rejects"] | "Reasons" >> beam.Map(lambda r: (r.id, r.stage, r.reason, r.n_images))
    assert_that(reasons, equal_to([(broken.cluster_id, "synthesize", "no_usable_images", len(broken.images))]),
                label="Rejects")
    result = p.run()
    result.wait_until_finish()

    counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]
                if c.key.metric.namespace == "synthesize"}
    assert counters["clusters_trained"] == 2 and counters["candidates"] == 8
    assert counters["no_usable_images"] == len(broken.images) and counters["clusters_fallback_prompts"] == 2
    assert "clusters_cached" not in counters
    assert any("3/3 clusters done" in r.getMessage() for r in caplog.records)

    rows = read_rows(tmp_path / "out", "candidates")
    assert len(rows) == 8
    table = pq.read_table(next((tmp_path / "out" / "candidates").glob("*.parquet")))
    assert table.schema.metadata[b"icl.schema"] == b"candidates"
    by_prompt = {r["prompt"]: r for r in rows if r["k"] == 0}
    row = by_prompt["a photo of sks teapot on a beach"]
    assert row["subject"] == "red ceramic teapot" and row["class_noun"] == "teapot" and row["identifier"] == "sks"
    assert row["prompt_template"] == "a photo of {subject} on a beach"
    assert row["train"]["model"] == tiny_sd_dir and row["train"]["steps"] == 3 and row["train"]["mode"] == "lora"
    assert row["train"]["instance_prompt"] == "a photo of sks teapot" and row["train"]["resolution"] == 64
    assert row["sample"]["steps"] == 2 and row["sample"]["images_per_prompt"] == 2
    assert row["seconds"]["train"] > 0 and row["seconds"]["total"] >= row["seconds"]["train"]
    assert row["n_train_images"] == len(teapot.images) and row["final_loss"] > 0
    assert Image.open(io.BytesIO(image_bytes(row["image"]))).size == (64, 64)
    assert candidate_to_row(candidate_from_row(row)) == row  # the record round-trips through its row
    assert [r["reason"] for r in read_rows(tmp_path / "out", "rejects", "synthesize")] == ["no_usable_images"]


# --- phase 2 from the command line: resume, overwrite -----------------------------------------------------

def test_phase_resumes_from_the_cache_without_training_and_overwrite_redoes(tiny_sd_dir, clusters, tmp_path) -> None:
    chosen = [with_prompts(clusters[3], "dog", PROMPTS), clusters[4], broken_copy(clusters[5])]
    clusters_file = write_clusters_file(chosen, tmp_path / "clusters.parquet")
    out = str(tmp_path / "out")

    first = _run_synthesize(clusters_file, out, tiny_sd_dir)
    summary = first["phases"]["synthesize"]
    assert summary["clusters"] == {"input": 3, "synthesized": 2, "cached": 0, "rejected": {"no_usable_images": 1},
                                   "written": 2, "reconciled": True}
    assert summary["candidates"] == 8
    assert set(summary["per_cluster_seconds"]) == {chosen[0].cluster_id, chosen[1].cluster_id}
    assert summary["seconds_per_cluster"]["train"]["mean"] > 0
    rows = {r["candidate_id"]: r for r in read_rows(out, "candidates")}
    cache_files = sorted((tmp_path / "out" / "cache" / "synthesize").glob("*/*.parquet"))
    assert len(cache_files) == 2 and not list((tmp_path / "out" / "cache").rglob("*.tmp-*"))
    stamps = [f.stat().st_mtime_ns for f in cache_files]

    # A rerun (after a crash, or to add phase 3) trains nothing: every finished cluster comes from the cache.
    second = _run_synthesize(clusters_file, out, tiny_sd_dir)["phases"]["synthesize"]
    assert second["clusters"]["synthesized"] == 0 and second["clusters"]["cached"] == 2
    assert second["clusters"]["rejected"] == {"no_usable_images": 1} and second["clusters"]["reconciled"]
    assert "clusters_trained" not in second["counters"]["synthesize"]
    assert {r["candidate_id"]: r for r in read_rows(out, "candidates")} == rows
    assert [f.stat().st_mtime_ns for f in cache_files] == stamps

    # An unreadable cache entry (a file of an older schema, say) is only a miss: that cluster is redone.
    cache_files[0].write_bytes(b"not parquet")
    again = _run_synthesize(clusters_file, out, tiny_sd_dir)["phases"]["synthesize"]
    assert (again["clusters"]["synthesized"], again["clusters"]["cached"]) == (1, 1)
    assert again["counters"]["synthesize"]["cache_unreadable"] == 1
    assert pq.read_table(cache_files[0]).num_rows == 4  # and written again

    # Other settings are another cache key: the clusters are trained again.
    third = _run_synthesize(clusters_file, out, tiny_sd_dir, **{"synth.train.steps": 2})["phases"]["synthesize"]
    assert third["clusters"]["synthesized"] == 2

    # synth.overwrite redoes finished clusters, and the renders are reproduced exactly.
    fourth = _run_synthesize(clusters_file, out, tiny_sd_dir, **{"synth.overwrite": "true"})["phases"]["synthesize"]
    assert fourth["clusters"]["synthesized"] == 2 and fourth["clusters"]["cached"] == 0
    redone = {r["candidate_id"]: r for r in read_rows(out, "candidates")}
    assert redone.keys() == rows.keys()
    assert all(redone[k]["image"] == rows[k]["image"] for k in rows)


def test_clusters_and_synthesize_phases_chain(demo_run: PhaseOutput) -> None:
    """One command runs phase 1, then phase 2 on every cluster phase 1 wrote (the demo run: `make demo`)."""
    manifest = demo_run.manifest
    n_clusters = manifest["phases"]["clusters"]["clusters"]["written"]
    synth = manifest["phases"]["synthesize"]
    assert synth["clusters"]["input"] == n_clusters == synth["clusters"]["synthesized"] > 0
    assert synth["candidates"] == len(read_rows(demo_run.output, "candidates")) >= n_clusters
    assert synth["clusters"]["reconciled"]
    assert synth["inputs"] == [str(p) for p in sorted((demo_run.output / "clusters").glob("*.parquet"))]
    assert manifest["records"]["reconciled"]  # phase 1's block is kept


def test_a_file_that_is_not_clusters_is_refused_before_running(tmp_path) -> None:
    with pytest.raises(InputFormatError, match="expected an icl-cluster-pipeline 'clusters' file"):
        run(["--phases", "synthesize", "--input", str(SAMPLE), "--output", str(tmp_path)])
    with pytest.raises(InputFormatError, match="matches no file"):
        run(["--phases", "synthesize", "--output", str(tmp_path)])  # default input: OUT/clusters/*.parquet
    with pytest.raises(UsageError):
        run(["--phases", "clusters,assemble", "--input", str(SAMPLE), "--output", str(tmp_path)])


# --- the DoFn alone ----------------------------------------------------------------------------------------

def test_a_diverging_cluster_is_rejected_with_its_reason(tiny_sd_dir, clusters, tmp_path) -> None:
    fn = SynthesizeFn(_config(tiny_sd_dir, **{"synth.train.learning_rate": 1e30, "synth.train.steps": 40}),
                      str(tmp_path / "cache"))
    fn.setup()
    try:
        outputs = list(fn.process(clusters[0]))
    finally:
        fn.teardown()
    assert len(outputs) == 1 and outputs[0].tag == "rejects"
    rejected = outputs[0].value
    assert (rejected.reason, rejected.id, rejected.n_images) == ("non_finite_loss", clusters[0].cluster_id,
                                                                  len(clusters[0].images))
    assert "training loss is" in rejected.detail
    assert not list((tmp_path / "cache").rglob("*.parquet"))  # nothing cached: a rerun tries again


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_a_gpu_worker_without_a_gpu_fails_at_start_up(tiny_sd_dir, tmp_path) -> None:
    fn = SynthesizeFn(_config(tiny_sd_dir, **{"synth.accelerator": "type:nvidia-l4;count:1"}), str(tmp_path))
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        fn.setup()


def test_the_accelerator_hint_is_on_the_synthesis_step_only(tiny_sd_dir, clusters, tmp_path) -> None:
    files = [write_clusters_file(clusters[:1], tmp_path / "clusters.parquet")]
    hint = "type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver"
    config = build_config("dataflow", overrides=[f"synth.model.name={tiny_sd_dir}"])
    assert config.synth.accelerator == hint and config.synth.needs_gpu
    p = beam.Pipeline()
    build_synthesize_pipeline(p, config, files, str(tmp_path / "out"))
    proto = p.to_runner_api()
    environments = {eid: dict(env.resource_hints) for eid, env in proto.components.environments.items()}
    hinted = {t.unique_name for t in proto.components.transforms.values()
              if environments.get(t.environment_id, {}).get("beam:resources:accelerator:v1") == hint.encode()}
    assert "Synthesize/SynthesizeClusters/ParDo(SynthesizeFn)" in hinted
    assert not any(name.startswith(("ReadClusters", "WriteCandidates", "Synthesize/SpreadClusters"))
                   for name in hinted)


# --- settings, prompts, cache -------------------------------------------------------------------------------

def test_cache_key_follows_what_changes_the_renders() -> None:
    base = SynthConfig()
    key = synthesis_hash(base)

    def changed(section: str, **kwargs: object) -> SynthConfig:
        return dataclasses.replace(base, **{section: dataclasses.replace(getattr(base, section), **kwargs)})

    assert synthesis_hash(changed("train", steps=500)) != key
    assert synthesis_hash(changed("sample", guidance_scale=5.0)) != key
    assert synthesis_hash(changed("model", name="stabilityai/stable-diffusion-xl-base-1.0")) != key
    # Where and how fast it runs does not change what is rendered.
    assert synthesis_hash(changed("sample", batch_size=2)) == key
    assert synthesis_hash(changed("model", device="cpu")) == key
    assert synthesis_hash(dataclasses.replace(base, overwrite=True, accelerator="type:nvidia-l4;count:1",
                                              cache_dir="gs://b/c")) == key


def test_prompts_are_the_clusters_own_or_the_fallback(clusters) -> None:
    config = SynthConfig(max_prompts=2)
    own = with_prompts(clusters[0], "teapot", PROMPTS)
    assert [p.skill for p in cluster_prompts(own, config)] == ["recontextualization", "stylization"]
    bare = dataclasses.replace(clusters[0], prompts=(), class_noun=None, is_live=None)
    fallback = cluster_prompts(bare, SynthConfig())
    assert fallback == template_prompts(bare.cluster_id, None, False, SynthConfig().fallback_prompts)
    assert len(fallback) == 6 and all(p.prompt.count("{subject}") == 1 for p in fallback)
    assert not {p.skill for p in fallback} & LIVE_ONLY  # an unknown subject is treated as an object
    with pytest.raises(ConfigError, match="fallback_prompts must be at least 1"):
        build_config("demo", overrides=["synth.fallback_prompts=0"])


def test_beam_storage_writes_atomically(tmp_path) -> None:
    storage = BeamStorage()
    path = storage.join(str(tmp_path), "a", "b.bin")
    storage.write_atomic(path, b"first")
    storage.write_atomic(path, b"second")
    assert storage.exists(path) and storage.read(path) == b"second"
    assert os.listdir(tmp_path / "a") == ["b.bin"]


def test_candidates_schema_has_its_name_and_version() -> None:
    assert CANDIDATES_SCHEMA.metadata[b"icl.schema"] == b"candidates"
    assert CANDIDATES_SCHEMA.metadata[b"icl.schema_version"] == str(SCHEMA_VERSION).encode()
    assert {"candidate_id", "cluster_id", "prompt", "prompt_template", "skill", "seed", "image", "train", "sample",
            "final_loss", "seconds"} <= set(CANDIDATES_SCHEMA.names)
