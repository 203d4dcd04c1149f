"""Packaging: setup.py as installed here and as Beam's --setup_file builds it for remote workers, and the GPU
worker image (Dockerfile), which must agree with it (one Beam version, the SDK image and its boot, pinned torch)."""

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


# --- the GPU worker image (Dockerfile) --------------------------------------------------------------------
# No Docker engine runs where the tests run, so the Dockerfile is checked as text.

DOCKERFILE = (REPO / "Dockerfile").read_text(encoding="utf-8")


def test_dockerfile_beam_version_is_setup_py_beam_version() -> None:
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", DOCKERFILE, flags=re.MULTILINE))
    assert args["BEAM_VERSION"].strip('"') == _setup_constant("BEAM_VERSION")
    assert len(re.findall(r"^ARG BEAM_VERSION=", DOCKERFILE, flags=re.MULTILINE)) == 1  # one place to change it
    constraint = re.search(r"^apache-beam==(\S+)$", (REPO / "constraints.txt").read_text(), flags=re.MULTILINE)
    assert constraint and constraint.group(1) == _setup_constant("BEAM_VERSION")


def test_image_is_the_sdk_image_of_that_version_with_its_boot() -> None:
    bases = re.findall(r"^FROM (\S+)", DOCKERFILE, flags=re.MULTILINE)
    assert len(bases) == 1 and re.fullmatch(r"apache/beam_python3\.\d+_sdk:\$\{BEAM_VERSION\}", bases[0]), bases
    assert re.search(r'^ENTRYPOINT \["/opt/apache/beam/boot"\]$', DOCKERFILE, flags=re.MULTILINE)


def test_image_installs_the_torch_the_tests_run_with() -> None:
    # torch, torchvision and the CUDA libraries come from constraints.txt, not from a base image of its own.
    constraints = (REPO / "constraints.txt").read_text()
    assert re.search(r"^torch==\S+$", constraints, flags=re.MULTILINE)
    assert re.search(r"^nvidia-cudnn-\S+==\S+$", constraints, flags=re.MULTILINE)  # CUDA build pinned
    assert "pip install --no-cache-dir -c constraints.txt " in DOCKERFILE


def test_project_and_gpu_extras_install_in_one_layer_ending_in_pip_check() -> None:
    runs = re.findall(r"^RUN (.*?)(?<!\\)\n(?! )", DOCKERFILE + "\n", flags=re.MULTILINE | re.DOTALL)
    install = [r for r in runs if "pip install" in r]
    assert len(install) == 1
    layer = install[0]
    assert "--no-cache-dir" in layer and '".[models,gcp]"' in layer
    assert layer.rstrip().endswith("pip check")
    assert "git clone" not in DOCKERFILE


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "out"} <= ignored
    assert not {"README.md", "setup.py", "constraints.txt"} & ignored  # pip install . needs them
