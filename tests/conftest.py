"""Shared fixtures: the bundled sample crawl and helpers to run phases and read their outputs."""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample" / "crawl.parquet"

# The multi-process DirectRunner starts worker processes that import our packages: make sure they
# find this checkout even when the project is not installed.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def read_rows(output_dir: str | os.PathLike, folder: str, prefix: str = "*") -> list[dict[str, Any]]:
    """All rows of ``OUT/folder/prefix*.parquet`` as dicts."""
    rows: list[dict[str, Any]] = []
    for path in sorted(glob.glob(os.path.join(str(output_dir), folder, f"{prefix}*.parquet"))):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


@dataclass
class PhaseOutput:
    output: Path
    manifest: dict[str, Any]

    def clusters(self) -> list[dict[str, Any]]:
        return read_rows(self.output, "clusters")

    def rejects(self, phase: str = "clusters") -> list[dict[str, Any]]:
        return read_rows(self.output, "rejects", phase)


def run_pipeline(inputs: list[str | os.PathLike], output: str | os.PathLike, *args: str) -> PhaseOutput:
    """Run the pipeline; phase 1 only unless ``args`` has ``--phases``."""
    from pipeline.run import run

    phases = () if "--phases" in args else ("--phases", "clusters")
    argv = [a for i in inputs for a in ("--input", str(i))] + ["--output", str(output), *phases, *args]
    return PhaseOutput(Path(output), run(argv))


@pytest.fixture(scope="session")
def sample_rows() -> list[dict[str, Any]]:
    """The bundled crawl, with its ``expected``, ``expected_page`` and ``note`` columns."""
    return pq.read_table(SAMPLE).to_pylist()


@pytest.fixture(scope="session")
def sample_phase1(tmp_path_factory: pytest.TempPathFactory) -> PhaseOutput:
    """Phase 1 on the bundled sample with the demo profile (in-memory DirectRunner), run once."""
    return run_pipeline([SAMPLE], tmp_path_factory.mktemp("sample_phase1"), "--profile", "demo")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Stable Diffusion saved with ``save_pretrained``, loaded like a real model id."""
    from tests.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models"), "tiny-random")


@pytest.fixture(scope="session")
def product_photos(sample_rows: list[dict[str, Any]]) -> list[bytes]:
    """Real JPEG product photos from the sample (DreamBench), one per subject."""
    photos, seen = [], set()
    for row in sample_rows:
        if row["expected"] == "kept" and row["note"].startswith("product photo") and row["expected_page"] not in seen:
            seen.add(row["expected_page"])
            photos.append(row["image"])
    return photos


# Phase 2 settings of the three-phase runs of the tests: the demo profile's, smaller (the demo renders
# meaningless noise either way); 25 clusters x 2 prompts x 1 image.
SMALL_SYNTH: tuple[str, ...] = ("--set", "synth.train.steps=4", "--set", "synth.sample.steps=2",
                                "--set", "synth.max_prompts=2", "--set", "synth.model.cpu_threads=1")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> PhaseOutput:
    """All three phases on the bundled sample with the demo profile (what `make demo` runs), run once; small
    example shards (~400 kB, row groups of ~150 kB) so that readers have several files and row groups to split."""
    return run_pipeline([SAMPLE], tmp_path_factory.mktemp("demo_run"), "--profile", "demo",
                        "--phases", "clusters,synthesize,assemble", *SMALL_SYNTH,
                        "--set", "assemble.shard_bytes=400000", "--set", "assemble.row_group_bytes=150000")
