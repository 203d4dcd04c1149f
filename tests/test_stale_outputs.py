"""A rerun never leaves outputs that its manifest does not describe (issue: outputs match their manifest).

A run of some phases into a folder that holds later phases' outputs of an earlier run stops before it starts,
naming them; with ``--overwrite`` it removes exactly those and nothing else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.phases import PHASE_OUTPUTS
from pipeline.run import UsageError, stale_outputs
from tests.conftest import SAMPLE, PhaseOutput, run_pipeline

FAST_PHASE1 = ("--profile", "demo", "--set", "embed.enabled=false", "--set", "cluster_filter.enabled=false",
               "--set", "cross_page.enabled=false", "--set", "semantic_dedup.enabled=false",
               "--set", "detector.enabled=false")


def _touch(root: Path, *relative: str) -> None:
    for name in relative:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_stale_outputs_are_the_later_phases_files(tmp_path: Path) -> None:
    _touch(tmp_path, "clusters/part-0.parquet", "rejects/clusters-0.parquet", "candidates/part-0.parquet",
           "rejects/synthesize-0.parquet", "examples/part-00000-of-00001.parquet", "scores/part-0.parquet",
           "rejects/assemble-0.parquet", "stats/assemble.target_filter.json", "stats/clusters.cluster_filter.json",
           "README.md", "report/index.html", "cache/synthesize/abc/c1.parquet")
    out = str(tmp_path)
    stale = stale_outputs(out, ("clusters",))
    assert set(stale) == {"synthesize", "assemble"}
    names = sorted(Path(p).relative_to(tmp_path).as_posix() for paths in stale.values() for p in paths)
    assert names == ["README.md", "candidates/part-0.parquet", "examples/part-00000-of-00001.parquet",
                     "rejects/assemble-0.parquet", "rejects/synthesize-0.parquet", "report/index.html",
                     "scores/part-0.parquet", "stats/assemble.target_filter.json"]
    assert set(stale_outputs(out, ("clusters", "synthesize"))) == {"assemble"}
    assert stale_outputs(out, ("synthesize", "assemble")) == {}
    assert stale_outputs(out, ("clusters", "synthesize", "assemble")) == {}
    # Every phase's outputs are listed once: a phase's own files are rewritten by that phase, not "stale".
    assert len({p for patterns in PHASE_OUTPUTS.values() for p in patterns}) == sum(map(len, PHASE_OUTPUTS.values()))


@pytest.mark.slow
def test_rerun_of_phase1_stops_or_overwrites(demo_run: PhaseOutput, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(demo_run.output, out)
    before = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert any(name.startswith("examples/") for name in before) and "report/index.html" in before

    with pytest.raises(UsageError) as error:
        run_pipeline([SAMPLE], out, *FAST_PHASE1)
    message = str(error.value)
    for name in ("candidates/", "examples/", "scores/", "README.md", "report/", "--overwrite"):
        assert name in message
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == before  # nothing touched

    rerun = run_pipeline([SAMPLE], out, *FAST_PHASE1, "--overwrite")
    after = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    for gone in ("candidates/", "examples/", "scores/", "rejects/synthesize-", "rejects/assemble-", "stats/assemble."):
        assert not any(name.startswith(gone) for name in after), gone
    assert "README.md" not in after and "report/index.html" not in after
    assert any(name.startswith("cache/synthesize/") for name in after)  # the resume cache stays
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["phases"]) == {"clusters"} and "candidates" not in manifest
    assert manifest["records"]["reconciled"] and rerun.manifest["overwritten"]["files"] > 0
