"""``OUT/manifest.json``: what a run did, with counts that must reconcile.

The record funnel is computed from what was actually written, not from what the stages believe they
did: ``kept`` is the number of images in ``clusters/``, ``rejected`` the images accounted for by
``rejects/`` rows, per reason. ``input`` is the ``read/records`` Beam counter. ``input == kept +
sum(rejected)`` must hold; :func:`reconcile` says whether it does, and the command fails when it does
not (a record was lost: a bug). Beam counters of every stage are recorded alongside, per phase.
"""

from __future__ import annotations

import datetime
import json
import platform
from collections import Counter
from importlib import metadata
from typing import Any

from apache_beam.io.filesystems import FileSystems

from transforms.outputs import read_columns

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


def beam_counters(result: Any) -> dict[str, dict[str, int]]:
    """``{namespace: {name: value}}`` of a finished pipeline's counters (committed where supported)."""
    counters: dict[str, dict[str, int]] = {}
    for counter in result.metrics().query()["counters"]:
        try:
            value = counter.committed
        except Exception:  # noqa: BLE001 -- some runners support only attempted metrics
            value = None
        if value is None:
            value = counter.attempted
        name = counter.key.metric
        section = counters.setdefault(name.namespace, {})
        section[name.name] = section.get(name.name, 0) + int(value or 0)
    return {ns: dict(sorted(values.items())) for ns, values in sorted(counters.items())}


def reject_summary(output_dir: str, phase: str) -> dict[str, Any]:
    """Images and rows per reason (and per stage) in ``OUT/rejects/<phase>-*.parquet``."""
    table = read_columns(FileSystems.join(output_dir, "rejects", f"{phase}-*.parquet"),
                         ["stage", "reason", "n_images"])
    images: Counter[str] = Counter()
    rows: Counter[str] = Counter()
    by_stage: dict[str, Counter[str]] = {}
    if table is not None:
        for stage, reason, n in zip(*(table.column(c).to_pylist() for c in ("stage", "reason", "n_images")),
                                    strict=True):
            images[reason] += n
            rows[reason] += 1
            by_stage.setdefault(stage, Counter())[reason] += n
    return {
        "images": dict(sorted(images.items())),
        "rows": dict(sorted(rows.items())),
        "by_stage": {stage: dict(sorted(c.items())) for stage, c in sorted(by_stage.items())},
    }


def reject_rows(output_dir: str, phase: str, reason: str, columns: list[str]) -> list[dict[str, Any]]:
    """The ``columns`` of the rows of ``OUT/rejects/<phase>-*.parquet`` with ``reason``, sorted by the first column."""
    table = read_columns(FileSystems.join(output_dir, "rejects", f"{phase}-*.parquet"), ["reason", *columns])
    if table is None:
        return []
    rows = [row for row in table.to_pylist() if row.pop("reason") == reason]
    return sorted(rows, key=lambda row: str(row[columns[0]]))


def cluster_summary(output_dir: str) -> dict[str, int]:
    """Clusters and images in ``OUT/clusters/*.parquet``."""
    table = read_columns(FileSystems.join(output_dir, "clusters", "*.parquet"), ["stats"])
    if table is None:
        return {"clusters": 0, "images": 0}
    n_images = table.column("stats").combine_chunks().field("n_images").to_pylist()
    return {"clusters": len(n_images), "images": int(sum(n_images))}


def reconcile(n_input: int, kept: int, rejected: dict[str, int]) -> dict[str, Any]:
    """The ``records`` block: ``input == kept + sum(rejected)`` or ``reconciled: false``."""
    total = kept + sum(rejected.values())
    return {
        "input": n_input,
        "kept": kept,
        "rejected": dict(sorted(rejected.items())),
        "reconciled": n_input == total,
        **({} if n_input == total else {"unaccounted": n_input - total}),
    }


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


def funnel(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The steps from input records to examples that the manifest knows of, each with its count, its unit and
    what left the pipeline between the previous step and it, by reason.

    Within a unit the counts chain: a step's count is the previous step's minus its ``rejected``. The unit
    changes twice: records become clusters (a cluster holds several images) and clusters become candidates
    (a cluster renders several).
    """
    steps: list[dict[str, Any]] = []
    records = manifest.get("records")
    if records:
        steps.append({"step": "input records", "unit": "records", "count": records["input"]})
        steps.append({"step": "images kept in clusters", "unit": "records", "count": records["kept"],
                      "rejected": records["rejected"]})
    clusters = manifest.get("clusters")
    if clusters:
        steps.append({"step": "clusters written", "unit": "clusters", "count": clusters["written"],
                      "dropped_whole": clusters.get("rejected", {})})
    phases = manifest.get("phases", {})
    synth = phases.get("synthesize")
    if synth:
        if not clusters:
            steps.append({"step": "input clusters", "unit": "clusters", "count": synth["clusters"]["input"]})
        steps.append({"step": "clusters synthesized", "unit": "clusters", "count": synth["clusters"]["written"],
                      "rejected": synth["clusters"]["rejected"]})
        steps.append({"step": "candidates rendered", "unit": "candidates", "count": synth["candidates"]})
    candidates = manifest.get("candidates")
    assemble = phases.get("assemble")
    if candidates and assemble:
        by_stage = assemble.get("rejects_by_stage", {})
        if not synth:
            steps.append({"step": "input candidates", "unit": "candidates", "count": candidates["input"]})
        steps.append({"step": "candidates scored", "unit": "candidates", "count": candidates["scored"],
                      "rejected": by_stage.get("score", {})})
        steps.append({"step": "kept by the target filter", "unit": "candidates",
                      "count": candidates["kept_by_filter"], "rejected": by_stage.get("target_filter", {})})
        steps.append({"step": "examples", "unit": "examples", "count": candidates["examples"],
                      "rejected": by_stage.get("assemble", {})})
    return steps


def departures(step: dict[str, Any]) -> dict[str, int]:
    """What left before a :func:`funnel` step, by reason (whole-cluster drops marked as such)."""
    return {**step.get("rejected", {}),
            **{f"{reason} (whole clusters)": n for reason, n in step.get("dropped_whole", {}).items()}}
