"""Phase outputs: every Parquet file a phase writes goes through :class:`WriteShards`.

Beam's ``WriteToParquet`` can fix a number of files but not their size, and with a fixed number it groups
each file's rows into *one* element: a file of all clusters becomes an element of hundreds of megabytes that
a portable runner (Flink, Dataflow's runner v2, the multi-process DirectRunner) must move whole. This writer
sizes files by bytes and never builds an element larger than a row group:

1. every row is measured once (:func:`row_bytes`: its bytes and text) and keyed by a sort key;
2. a light global step (ids and sizes only) sets the number of files: ``ceil(total bytes / shard_bytes)``, or
   ``num_shards`` when fixed; each key hashes to a file;
3. per file, the keys (sizes only, no rows) are sorted and cut into row groups of about ``row_group_bytes``;
   each key's place ``(file, row group)`` is joined back to its rows by key;
4. the rows of each row group are written to a temporary file (``OUT/<folder>/.tmp-<token>/``) by one worker;
5. per file, a worker copies its row groups, in order, from those temporary files into the final
   ``<prefix>-SSSSS-of-NNNNN.parquet`` (pyarrow through Beam ``FileSystems``, so ``gs://`` works), written under
   the temporary folder and renamed into place, and deletes the temporaries. The launcher removes the emptied
   temporary folder, or, after a failed run, the whole folder with whatever it still holds.

So files are deterministic (the same rows make the same files, rows in key order), every element is one row,
a list of ids, or one row group, and a retried bundle rewrites the same temporary names. An output with no
row is one empty file with the schema, so that the next phase finds a valid (empty) input.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.common import count
from transforms.settings import OutputConfig

STAGE = "write"


# --- sizes and places -----------------------------------------------------------------------------------


def row_bytes(value: Any) -> int:
    """Approximate stored size of a row: the length of its bytes and strings, 8 per other leaf value."""
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    if isinstance(value, dict):
        return sum(row_bytes(v) for v in value.values()) + 8
    if isinstance(value, (list, tuple)):
        return sum(row_bytes(v) for v in value) + 8
    return 8


class Layout(NamedTuple):
    """How many rows and bytes an output holds, and into how many files they go."""

    rows: int
    bytes: int
    n_shards: int


def layout(totals: tuple[int, int], config: OutputConfig) -> Layout:
    rows, size = totals
    n_shards = config.num_shards or max(1, math.ceil(size / config.shard_bytes))
    return Layout(rows, size, n_shards)


def shard_of(key: str, n_shards: int) -> int:
    """The file a sort key goes to (a stable hash)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) % n_shards


def cut_row_groups(sizes: Iterable[tuple[str, int]], row_group_bytes: int) -> Iterator[tuple[str, int]]:
    """``(key, size)`` of one file's rows -> ``(key, row group index)``: keys in order, groups of about
    ``row_group_bytes`` (at least one key each; all rows of one key share a group)."""
    per_key: dict[str, int] = {}
    for key, size in sizes:
        per_key[key] = per_key.get(key, 0) + size
    group, filled = 0, 0
    for key in sorted(per_key):
        size = per_key[key]
        if filled and filled + size > row_group_bytes:
            group, filled = group + 1, 0
        filled += size
        yield key, group


def shard_path(folder: str, prefix: str, shard: int, n_shards: int) -> str:
    return FileSystems.join(folder, f"{prefix}-{shard:05d}-of-{n_shards:05d}.parquet")


# --- writing --------------------------------------------------------------------------------------------


def _create(path: str) -> Any:
    return FileSystems.create(path, mime_type="application/octet-stream",
                              compression_type=CompressionTypes.UNCOMPRESSED)


def write_table(path: str, rows: list[dict[str, Any]], schema: pa.Schema, codec: str) -> None:
    with _create(path) as handle, pq.ParquetWriter(handle, schema, compression=codec) as writer:
        writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=max(1, len(rows)))


class _Sink(NamedTuple):
    """What the write steps share: where, with which schema and codec."""

    folder: str
    prefix: str
    temp: str
    schema: pa.Schema
    codec: str


class WriteGroupFn(beam.DoFn):
    """``((shard, group, n_shards), [(key, row), ...])`` -> ``(shard, (group, temporary path, rows))``."""

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def process(self, element: tuple[tuple[int, int, int], Iterable[tuple[str, dict[str, Any]]]]) -> Iterator[Any]:
        (shard, group, n_shards), keyed = element
        rows = [row for _, row in sorted(keyed, key=lambda pair: pair[0])]
        path = FileSystems.join(self._sink.temp, f"{shard:05d}-{group:06d}.parquet")
        write_table(path, rows, self._sink.schema, self._sink.codec)
        yield (shard, n_shards), (group, path, len(rows))


class MergeShardFn(beam.DoFn):
    """``((shard, n_shards), [(group, path, rows), ...])`` -> the final file; yields ``{path, rows, row_groups}``."""

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def process(self, element: tuple[tuple[int, int], Iterable[tuple[int, str, int]]]) -> Iterator[dict[str, Any]]:
        (shard, n_shards), groups = element
        groups = sorted(groups)
        sink = self._sink
        path = shard_path(sink.folder, sink.prefix, shard, n_shards)
        temporary = FileSystems.join(sink.temp, f"{sink.prefix}-{shard:05d}-{uuid.uuid4().hex}.parquet")
        rows = 0
        with _create(temporary) as handle, pq.ParquetWriter(handle, sink.schema, compression=sink.codec) as writer:
            for _, group_path, _ in groups:  # one row group in memory at a time
                with FileSystems.open(group_path, compression_type=CompressionTypes.UNCOMPRESSED) as source:
                    table = pq.ParquetFile(source).read()
                writer.write_table(table, row_group_size=max(1, table.num_rows))
                rows += table.num_rows
        if FileSystems.exists(path):
            FileSystems.delete([path])
        FileSystems.rename([temporary], [path])
        FileSystems.delete([group_path for _, group_path, _ in groups])
        count(STAGE, f"{sink.prefix}_files")
        yield {"path": path, "rows": rows, "row_groups": len(groups)}


def write_empty(output: Layout, sink: _Sink) -> Iterator[dict[str, Any]]:
    """An output without rows is one empty file with the schema (a later phase reads a valid, empty input)."""
    if output.rows:
        return
    path = shard_path(sink.folder, sink.prefix, 0, 1)
    write_table(path, [], sink.schema, sink.codec)
    yield {"path": path, "rows": 0, "row_groups": 1}


def _place(element: tuple[str, dict[str, Any]]) -> Iterator[tuple[tuple[int, int, int], tuple[str, dict]]]:
    key, joined = element
    places = list(joined["place"])
    if len(places) != 1:
        raise RuntimeError(f"{len(places)} places for output key {key!r}; expected exactly one")
    for row in joined["row"]:
        yield places[0], (key, row)


class _Totals(beam.CombineFn):
    """``row size`` values -> ``(rows, bytes)``."""

    def create_accumulator(self) -> tuple[int, int]:
        return 0, 0

    def add_input(self, accumulator: tuple[int, int], size: int) -> tuple[int, int]:
        return accumulator[0] + 1, accumulator[1] + size

    def merge_accumulators(self, accumulators: Iterable[tuple[int, int]]) -> tuple[int, int]:
        rows = size = 0
        for r, s in accumulators:
            rows, size = rows + r, size + s
        return rows, size

    def extract_output(self, accumulator: tuple[int, int]) -> tuple[int, int]:
        return accumulator


class WriteShards(beam.PTransform):
    """Records -> ``OUT/<folder>/<prefix>-SSSSS-of-NNNNN.parquet`` (see the module docstring); returns one
    ``{path, rows, row_groups}`` per file written.

    ``to_row`` makes a record a row of ``schema``; ``key_of`` gives a row's sort key (rows sharing a key stay
    together; ids make good keys).
    """

    def __init__(self, output_dir: str, folder: str, prefix: str, schema: pa.Schema,
                 to_row: Callable[[Any], dict[str, Any]], key_of: Callable[[dict[str, Any]], str],
                 config: OutputConfig) -> None:
        super().__init__()
        folder_path = FileSystems.join(output_dir, folder)
        self._sink = _Sink(folder_path, prefix, FileSystems.join(folder_path, f".tmp-{uuid.uuid4().hex}"),
                           schema, config.codec)
        self._to_row = to_row
        self._key_of = key_of
        self._config = config

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        key_of, config, sink = self._key_of, self._config, self._sink
        rows = (records | "ToRows" >> beam.Map(self._to_row)
                | "KeyRows" >> beam.Map(lambda row: (key_of(row), row)))
        sizes = rows | "RowSizes" >> beam.Map(lambda pair: (pair[0], row_bytes(pair[1])))
        output = (
            sizes
            | "Sizes" >> beam.Values()
            | "Totals" >> beam.CombineGlobally(_Totals())
            | "Layout" >> beam.Map(layout, config)
        )
        places = (
            sizes
            | "AssignShards" >> beam.Map(lambda pair, out: (shard_of(pair[0], out.n_shards), pair),
                                         beam.pvalue.AsSingleton(output))
            | "GroupSizesByShard" >> beam.GroupByKey()
            | "CutRowGroups" >> beam.FlatMap(
                lambda element, out: ((key, (element[0], group, out.n_shards))
                                      for key, group in cut_row_groups(element[1], config.row_group_bytes)),
                beam.pvalue.AsSingleton(output))
        )
        written = (
            {"row": rows, "place": places}
            | "JoinPlaces" >> beam.CoGroupByKey()
            | "PlaceRows" >> beam.FlatMap(_place)
            | "GroupRowGroups" >> beam.GroupByKey()
            | "WriteRowGroups" >> beam.ParDo(WriteGroupFn(sink))
            | "GroupByShard" >> beam.GroupByKey()
            | "MergeShards" >> beam.ParDo(MergeShardFn(sink))
        )
        empty = output | "EmptyOutput" >> beam.FlatMap(write_empty, sink)
        return (written, empty) | "Files" >> beam.Flatten()


# --- the phase outputs ----------------------------------------------------------------------------------


def write_clusters(output_dir: str, config: OutputConfig) -> WriteShards:
    """``Cluster``s -> ``OUT/clusters/part-*.parquet``."""
    from schemas.parquet import CLUSTERS_SCHEMA, cluster_to_row

    return WriteShards(output_dir, "clusters", "part", CLUSTERS_SCHEMA, cluster_to_row,
                       lambda row: row["cluster_id"], config)


def write_candidates(output_dir: str, config: OutputConfig) -> WriteShards:
    """``Candidate``s (phase 2) -> ``OUT/candidates/part-*.parquet``."""
    from schemas.parquet import CANDIDATES_SCHEMA, candidate_to_row

    return WriteShards(output_dir, "candidates", "part", CANDIDATES_SCHEMA, candidate_to_row,
                       lambda row: row["candidate_id"], config)


def _reject_key(row: dict[str, Any]) -> str:
    return "\x1f".join(str(row.get(k) or "") for k in ("id", "stage", "reason", "source", "cluster_id"))


def write_rejects(output_dir: str, phase: str, config: OutputConfig) -> WriteShards:
    """``Reject``s of one phase -> ``OUT/rejects/<phase>-*.parquet`` (each phase rewrites only its own)."""
    from schemas.parquet import REJECTS_SCHEMA, reject_to_row

    return WriteShards(output_dir, "rejects", phase, REJECTS_SCHEMA, reject_to_row, _reject_key, config)


def write_scores(output_dir: str, config: OutputConfig) -> WriteShards:
    """The target filter's ``(ScoredCandidate, decision, failed)`` -> ``OUT/scores/part-*.parquet``."""
    from schemas.parquet import TARGET_SCORES_SCHEMA, target_scores_row

    return WriteShards(output_dir, "scores", "part", TARGET_SCORES_SCHEMA, lambda d: target_scores_row(*d),
                       lambda row: row["candidate_id"], config)


def write_examples(output_dir: str, config: OutputConfig) -> WriteShards:
    """``Example``s -> ``OUT/examples/part-*.parquet`` (files of ``config.shard_bytes``, row groups of
    ``config.row_group_bytes``: what a trainer streams)."""
    from schemas.parquet import EXAMPLES_SCHEMA, example_to_row

    return WriteShards(output_dir, "examples", "part", EXAMPLES_SCHEMA, example_to_row,
                       lambda row: row["example_id"], config)
