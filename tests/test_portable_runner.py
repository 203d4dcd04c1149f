"""The portable path that Flink, Spark and Dataflow's runner v2 use: all three phases through ``PortableRunner``.

Beam's own job service and a Beam worker pool run as separate processes on loopback (``pipeline/runners.py``),
as on a Flink cluster (docs/runners.md): the pipeline is handed over gRPC, and our DoFns run in SDK harness
processes the pool starts -- so whatever does not pickle, relies on process state, or builds elements too big
for the data plane fails here. The outputs must equal the in-process DirectRunner's run of the same settings:
the same cluster ids, the same example ids, the same counts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SAMPLE, SMALL_SYNTH, PhaseOutput, portable_args, read_rows, run_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.portable]


def _summary(run: PhaseOutput) -> dict:
    manifest = run.manifest
    return {
        "clusters": sorted(c["cluster_id"] for c in run.clusters()),
        "candidates": sorted(r["candidate_id"] for r in read_rows(run.output, "candidates")),
        "examples": sorted(r["example_id"] for r in read_rows(run.output, "examples")),
        "records": manifest["records"],
        "clusters_block": manifest["clusters"],
        "synth": {k: v for k, v in manifest["phases"]["synthesize"]["clusters"].items() if k != "synthesized"},
        "candidates_block": {k: v for k, v in manifest["candidates"].items()},
    }


def test_three_phases_through_the_portable_runner_equal_the_direct_runner(
        demo_run: PhaseOutput, portable_services: tuple[str, str], tmp_path: Path) -> None:
    portable = run_pipeline([SAMPLE], tmp_path / "portable", "--profile", "demo",
                            "--phases", "clusters,synthesize,assemble", *SMALL_SYNTH,
                            "--set", "assemble.shard_bytes=400000", "--set", "assemble.row_group_bytes=150000",
                            *portable_args(portable_services))
    assert portable.manifest["runner"] == "PortableRunner"
    expected, actual = _summary(demo_run), _summary(portable)
    assert actual["clusters"] and actual["examples"]
    assert actual == expected
    for phase in ("clusters", "synthesize", "assemble"):
        assert portable.manifest["phases"][phase]["counters"], phase  # the runner reports Beam counters
