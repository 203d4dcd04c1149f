"""Values a pipeline computes about its own data (calibrated thresholds, score quantiles, ...).

A stage that derives such values from the data of the run (``target_keep_rate`` calibration, say) ends
them in :class:`WriteStats`: the dicts of a PCollection are merged and written to
``OUT/stats/<phase>.<name>.json`` through Beam ``FileSystems``. When the phase has finished,
``pipeline.run`` merges every ``stats/<phase>.*.json`` into ``manifest.json`` under
``stats.<phase>.<name>``, so the numbers a run used are recorded next to the counts they produced.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

STATS_FOLDER = "stats"


def stats_path(output_dir: str, phase: str, name: str) -> str:
    return FileSystems.join(output_dir, STATS_FOLDER, f"{phase}.{name}.json")


def _write(parts: Iterable[dict[str, Any]], path: str) -> str:
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part)
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(merged, indent=2, sort_keys=True, default=float).encode("utf-8"))
    return path


class WriteStats(beam.PTransform):
    """``dict``s -> ``OUT/stats/<phase>.<name>.json`` (their merge). Writes ``{}`` when there are none."""

    def __init__(self, output_dir: str, phase: str, name: str) -> None:
        super().__init__()
        self._path = stats_path(output_dir, phase, name)

    def expand(self, stats: beam.PCollection) -> beam.PCollection:
        return (
            stats
            | "CollectStats" >> beam.combiners.ToList()
            | "WriteStatsJson" >> beam.Map(_write, self._path)
        )


def read_stats(output_dir: str, phase: str) -> dict[str, Any]:
    """``{name: values}`` of every ``OUT/stats/<phase>.<name>.json``."""
    pattern = FileSystems.join(output_dir, STATS_FOLDER, f"{phase}.*.json")
    out: dict[str, Any] = {}
    for metadata in sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path):
        name = metadata.path.rsplit("/", 1)[-1][len(phase) + 1:-len(".json")]
        with FileSystems.open(metadata.path) as handle:
            out[name] = json.loads(handle.read().decode("utf-8"))
    return out
