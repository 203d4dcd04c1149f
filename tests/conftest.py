"""Shared fixtures: the bundled sample crawl and helpers to run phases and read their outputs."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample" / "crawl.parquet"

# Tests never reach a model hub (nothing leaves this machine): the libraries read these when first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One torch/OpenMP thread per process (read when torch is first imported; worker processes inherit it): the test
# processes already take every core, and tiny models gain nothing from more threads that compete for them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# The multi-process DirectRunner starts worker processes that import our packages: make sure they
# find this checkout even when the project is not installed.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.runners import bind_loopback_only, dofn_specs_cache, fnapi_data_plane_fix  # noqa: E402

# The multi-process DirectRunner serves its workers over gRPC; keep those servers (and any other) on loopback.
bind_loopback_only()
# Pipelines that tests run directly (TestPipeline) get what pipeline.run applies to its runs: the FnApiRunner fix,
# and Beam's inspection of each DoFn once per DoFn (a third of a small stage test's time). Held open for the
# session: a context manager left unreferenced is closed by the garbage collector, which undoes it at once.
BEAM_FIXES = contextlib.ExitStack()
BEAM_FIXES.enter_context(fnapi_data_plane_fix())
BEAM_FIXES.enter_context(dofn_specs_cache())


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
    console: subprocess.CompletedProcess | None = None
    """For a run from the command line: its exit status, stdout and stderr."""

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


def run_command_line(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``icl-pipeline ARGS`` in a process of its own, from the repository root."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def sample_phase1(tmp_path_factory: pytest.TempPathFactory) -> PhaseOutput:
    """Phase 1 on the bundled sample with the demo profile, run once as a user runs it: ``icl-pipeline run`` in a
    process of its own (in-memory DirectRunner); ``console`` holds what it printed."""
    output = tmp_path_factory.mktemp("sample_phase1") / "out"
    console = run_command_line("run", "--profile", "demo", "--input", str(SAMPLE), "--output", str(output),
                               "--phases", "clusters")
    assert console.returncode == 0, console.stderr[-4000:]
    return PhaseOutput(output, json.loads((output / "manifest.json").read_text(encoding="utf-8")), console)


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


# --- Beam's portability services (the layout of a Flink cluster), on loopback ---------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service exited with status {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture(scope="session")
def portable_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """``(job endpoint, worker pool endpoint)`` of a job service and a worker pool on loopback."""
    env = dict(os.environ)
    # The pool starts `python` from PATH: the project's virtualenv must come first.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    logs = tmp_path_factory.mktemp("portable-services")
    job_port, pool_port = _free_port(), _free_port()
    processes = []
    try:
        for name, port in (("job", job_port), ("pool", pool_port)):
            log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 -- closed with the process below
            processes.append((subprocess.Popen([sys.executable, "-m", "pipeline.runners", name, str(port)], cwd=REPO,
                                               env=env, stdout=log, stderr=subprocess.STDOUT), log))
            _wait_for_port(port, processes[-1][0])
        yield f"localhost:{job_port}", f"localhost:{pool_port}"
    finally:
        for process, log in processes:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()


def portable_args(services: tuple[str, str]) -> tuple[str, ...]:
    job, pool = services
    return ("--runner", "PortableRunner", "--job_endpoint", job, "--environment_type", "EXTERNAL",
            "--environment_config", pool)


# --- selection and scheduling -----------------------------------------------------------------------------------

HEAVY_FIXTURES = {
    "demo_run": "demo_run",              # all three phases on the sample, once per session
    "sample_phase1": "sample_phase1",
    "portable_services": "portable",     # Beam's job service and worker pool
    "phase1": None,                      # test_phase1's module run of phase 1
    "tiny_sd_dir": None,                 # tests that train and render with the tiny Stable Diffusion
}
"""Fixtures that take seconds to tens of seconds to build: a test using one is ``slow`` (``make test-fast``
leaves it out). Tests sharing a session-wide run go to one xdist worker (``--dist loadgroup``), so the run is
built once per session instead of once per worker."""


MODULE_FIXTURES = {"vllm_run", "phase1", "model", "plain", "clusters", "server", "encoder"}
"""Module-scoped fixtures that take seconds (a pipeline run, a model, a server process): the tests of a module that
use one go to one xdist worker too, so that the fixture is built once, not once per worker."""


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        heavy = used & HEAVY_FIXTURES.keys()
        if heavy:
            item.add_marker(pytest.mark.slow)
        groups = sorted(HEAVY_FIXTURES[name] for name in heavy if HEAVY_FIXTURES[name])
        if not groups and used & MODULE_FIXTURES:
            groups = [item.path.stem]
        if groups:
            item.add_marker(pytest.mark.xdist_group(groups[0]))
    # Slow tests first (stable: modules stay in order). xdist hands out the groups with the most tests first, then
    # single tests in this order, so a slow test no longer starts last and leaves the other worker idle.
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Under ``--dist loadgroup``, xdist marks a grouped test by suffixing its node id with the group; without it
    every worker builds every session-wide run (a minute more on two cores). Some pytest releases break that."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    grouped = [item for item in session.items if item.get_closest_marker("xdist_group")]
    if grouped and "@" not in grouped[0].nodeid:
        raise pytest.UsageError(f"pytest-xdist's --dist loadgroup does not group with pytest {pytest.__version__}: "
                                "install the versions in constraints.txt")
