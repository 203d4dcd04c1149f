"""``OUT/manifest.json``: what a run did -- its command, configuration and versions, and per phase the counts
that must reconcile (:mod:`pipeline.accounting`) -- read and written through Beam ``FileSystems``."""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from apache_beam.io.filesystems import FileSystems

from pipeline.config import PipelineConfig, config_hash, to_dict
from schemas.parquet import SCHEMA_VERSION

MANIFEST = "manifest.json"

_PACKAGES = ("icl-cluster-pipeline", "apache-beam", "pyarrow", "pillow", "imagehash", "w3lib", "numpy",
             "torch", "torchvision", "open_clip_torch", "diffusers", "transformers", "peft")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_manifest(output_dir: str) -> dict[str, Any]:
    path = FileSystems.join(output_dir, MANIFEST)
    if not FileSystems.exists(path):
        return {}
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def write_manifest(output_dir: str, manifest: dict[str, Any]) -> str:
    path = FileSystems.join(output_dir, MANIFEST)
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=False, default=str).encode("utf-8"))
        handle.write(b"\n")
    return path


def describe_run(argv: Sequence[str], profile: str, runner: str, config: PipelineConfig) -> dict[str, Any]:
    """The manifest's header: the command (``icl-pipeline run`` and ``argv``), the configuration and the versions."""
    return {
        "pipeline": "icl-cluster-pipeline",
        "version": package_versions().get("icl-cluster-pipeline"),
        "schema_version": SCHEMA_VERSION,
        "created": now(),
        "command": ["icl-pipeline", "run", *argv],
        "profile": profile,
        "runner": runner,
        "config": to_dict(config),
        "config_hash": config_hash(config),
        "versions": package_versions(),
    }
