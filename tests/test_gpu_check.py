"""benchmarks/gpu_check.sh: the one-run GPU check, run here with ``--cpu-smoke`` (the same code, tiny shapes, on
CPU) so that it cannot rot before a GPU arrives; its output has the shape of benchmarks/results/gpu.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check
from tests.conftest import REPO

SWITCHES = {"bf16", "sdpa", "cached_encodings", "fused_adamw", "batched_sampling", "deferred_loss_check"}
PARTS = ("latents", "train", "sample", "other", "total")


def test_smoke_never_writes_the_gpu_results_and_the_gpu_run_needs_a_gpu(capsys) -> None:
    with pytest.raises(SystemExit):
        gpu_check.main(["--cpu-smoke", "--output", str(gpu_check.RESULTS)])
    assert "never writes" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.main([])
        assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_smoke_writes_gpu_json_shaped_results(tmp_path) -> None:
    results = gpu_check.RESULTS
    before = results.stat().st_mtime_ns if results.exists() else None
    output = tmp_path / "gpu.json"
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-smoke", "--output", str(output)], cwd=REPO,
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert (results.stat().st_mtime_ns if results.exists() else None) == before  # CPU figures stay out of it

    report = json.loads(output.read_text(encoding="utf-8"))
    assert report["benchmark"] == "gpu" and report["mode"] == "cpu-smoke" and report["machine"]["cpus"]
    assert report["wall_seconds"] <= report["budget_s"]
    parts = report["parts"]
    assert list(parts) == ["cuda_tests", "embed", "synth", "synth_compiled"]
    assert all(part["status"] == "ok" for part in parts.values()), {k: p["status"] for k, p in parts.items()}

    tests = parts["cuda_tests"]
    assert "tests/test_synth_speed.py" in tests["files"] and tests["tests"] >= 5 and not tests["failed"]
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"]

    (embed,) = parts["embed"]["results"]
    assert embed["plain_loop_images_per_s"] > 0 and embed["beam_images_per_s"] > 0 and embed["ratio"] > 0
    assert parts["embed"]["batch_size_sweep_images_per_s"]

    synth = parts["synth"]
    recipe = synth["recipe"]
    assert recipe["train_scale"] == recipe["train_steps"] / recipe["measure_steps"] > 1
    variants = synth["variants"]
    expected = {"fast", "plain_diffusers_loop", "adapters_4", "processes_2", "compiled",
                *(f"fast_without_{s}" for s in SWITCHES)}
    assert set(variants) == expected and not synth["skipped"]
    for name, variant in variants.items():
        seconds = variant["seconds_per_cluster"]
        assert list(seconds) == list(PARTS) and seconds["train"] > 0 and seconds["sample"] > 0, name
        assert seconds["total"] == pytest.approx(sum(seconds[p] for p in PARTS[:-1]), abs=0.01)
        assert variant["clusters_per_gpu_hour"] > 0 and variant["speedup_vs_plain"] > 0
        for cluster in variant["clusters"]:  # training measured on a fraction of the steps, scaled to all
            assert cluster["scaled"]["train"] == pytest.approx(cluster["measured"]["train"] * recipe["train_scale"],
                                                               abs=0.01)
    assert len(variants["fast"]["rss_after_each_cluster_mib"]) == 3  # memory after each timed cluster
    assert len(variants["compiled"]["clusters"]) == 3 and variants["compiled"]["warmup_seconds"] > 0
    assert len(variants["adapters_4"]["clusters"]) == 4 and variants["processes_2"]["processes"] == 2
    assert variants["plain_diffusers_loop"]["speedup_vs_plain"] == 1.0
    assert set(synth["switches"]) == SWITCHES
    several = synth["several_clusters_per_gpu"]
    assert several["more_clusters_per_gpu_hour"] in ("adapter_batch", "worker_processes")
    assert set(several["clusters_per_gpu_hour"]) == {"adapters_4", "processes_2"}
    assert synth["best"]["variant"] in variants and synth["memory_flat"] is True

    for line in ("CUDA tests: ok", "synthesis per cluster", "plain_diffusers_loop", "several clusters per GPU",
                 "best:"):
        assert line in run.stdout
