"""Packaging: setup.py as installed here and as Beam's --setup_file builds it for remote workers."""

from __future__ import annotations

import re
import tarfile
from importlib import metadata

from tests.conftest import REPO


def _setup_constant(name: str) -> str:
    match = re.search(rf'^{name} = "([^"]+)"', (REPO / "setup.py").read_text(), re.M)
    assert match, name
    return match.group(1)


def test_installed_distribution_matches_setup_py() -> None:
    dist = metadata.distribution("icl-cluster-pipeline")
    assert dist.version == _setup_constant("VERSION")
    assert metadata.version("apache-beam") == _setup_constant("BEAM_VERSION")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"icl-pipeline": "pipeline.cli:main"}
    extras = set(dist.metadata.get_all("Provides-Extra") or [])
    assert {"dev", "models", "gcp", "aws", "vllm"} <= extras


def test_setup_file_builds_what_workers_need(tmp_path) -> None:
    """Beam's stager builds an sdist from --setup_file; it must hold every package and data file."""
    from apache_beam.runners.portability.stager import Stager

    sdist = Stager._build_setup_package(str(REPO / "setup.py"), str(tmp_path))
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for required in ("setup.py", "pipeline/__init__.py", "pipeline/run.py", "pipeline/profiles/demo.yaml",
                     "pipeline/profiles/local.yaml", "pipeline/profiles/dataflow.yaml", "transforms/normalize.py",
                     "schemas/parquet.py", "README.md"):
        assert required in names, required
    assert not any(name.startswith(("tests/", "sample/", "benchmarks/")) for name in names)
