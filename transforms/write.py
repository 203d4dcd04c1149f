"""Stage *write*: Parquet shards through Beam's ``parquetio`` (so ``gs://`` and ``s3://`` work).

Every output has one explicit schema from :mod:`schemas.parquet`; the shards of output ``NAME`` are
``OUT/NAME/<prefix>-SSSSS-of-NNNNN.parquet``. Rejects of all phases share ``OUT/rejects/`` with the phase
as the file prefix (``clusters-…``, ``synthesize-…``, ``assemble-…``), so each phase can rewrite its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from schemas.parquet import (
    CANDIDATES_SCHEMA,
    CLUSTERS_SCHEMA,
    REJECTS_SCHEMA,
    candidate_to_row,
    cluster_to_row,
    reject_to_row,
)
from transforms.common import option

_CODECS = ("none", "snappy", "gzip", "brotli", "lz4", "zstd")


@dataclass(frozen=True)
class OutputConfig:
    """How outputs are written (config section ``output``)."""

    num_shards: int = option(0, "Files per output; 0 lets the runner decide (one per bundle on a local run).")
    row_group_bytes: int = option(64 * 1024 * 1024, "Bytes buffered before a Parquet row group is written; "
                                                    "readers stream one row group at a time.")
    batch_rows: int = option(32, "Rows converted to Arrow at a time (the granularity of row_group_bytes).")
    codec: str = option("zstd", f"Parquet compression codec: {', '.join(_CODECS)}. Images are already "
                                "compressed; the codec matters for text and ids.")

    def __post_init__(self) -> None:
        if self.num_shards < 0:
            raise ValueError(f"num_shards must be >= 0, got {self.num_shards}")
        if self.row_group_bytes < 1 or self.batch_rows < 1:
            raise ValueError("row_group_bytes and batch_rows must be positive")
        if self.codec not in _CODECS:
            raise ValueError(f"codec must be one of {', '.join(_CODECS)}, got {self.codec!r}")


def output_path(output_dir: str, *parts: str) -> str:
    return FileSystems.join(output_dir, *parts)


class WriteParquet(beam.PTransform):
    """Records -> rows (``to_row``) -> ``OUT/<folder>/<prefix>-SSSSS-of-NNNNN.parquet``."""

    def __init__(self, output_dir: str, folder: str, prefix: str, schema: pa.Schema,
                 to_row: Callable[[Any], dict[str, Any]], config: OutputConfig) -> None:
        super().__init__()
        self._prefix = output_path(output_dir, folder, prefix)
        self._schema = schema
        self._to_row = to_row
        self._config = config

    def expand(self, records: beam.PCollection) -> Any:
        return (
            records
            | "ToRows" >> beam.Map(self._to_row)
            | "WriteToParquet" >> beam.io.WriteToParquet(
                self._prefix,
                self._schema,
                codec=self._config.codec,
                row_group_buffer_size=self._config.row_group_bytes,
                record_batch_size=self._config.batch_rows,
                num_shards=self._config.num_shards,
                file_name_suffix=".parquet",
            )
        )


def write_clusters(output_dir: str, config: OutputConfig) -> WriteParquet:
    """``Cluster``s -> ``OUT/clusters/part-*.parquet``."""
    return WriteParquet(output_dir, "clusters", "part", CLUSTERS_SCHEMA, cluster_to_row, config)


def write_candidates(output_dir: str, config: OutputConfig) -> WriteParquet:
    """``Candidate``s (phase 2) -> ``OUT/candidates/part-*.parquet``."""
    return WriteParquet(output_dir, "candidates", "part", CANDIDATES_SCHEMA, candidate_to_row, config)


def write_rejects(output_dir: str, phase: str, config: OutputConfig) -> WriteParquet:
    """``Reject``s of one phase -> ``OUT/rejects/<phase>-*.parquet``."""
    return WriteParquet(output_dir, "rejects", phase, REJECTS_SCHEMA, reject_to_row, config)
