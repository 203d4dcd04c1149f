"""Phase outputs: every file a phase writes under ``OUT/`` and a later phase (or the launcher) reads back.

* Writers: :class:`WriteShards` for every Parquet output (``clusters/``, ``candidates/``, ``scores/``,
  ``examples/``, ``rejects/``: :func:`write_clusters` and the others), :class:`WriteStats` for the values a phase
  computes about its own data (``stats/``), :func:`write_stage_extras` for what a stage hands over besides its
  main output.
* Readers: :class:`ReadClusters` and :class:`ReadCandidates` (the inputs of phases 2 and 3),
  :func:`read_stats`, :func:`read_columns` (the accounting), :func:`sample_rows` (the report's galleries: the
  same rows on every call, within a byte budget), and the checks a later phase runs on its input files before it
  starts (:func:`expand_phase_inputs`).
* Housekeeping: a phase's previous files (:func:`delete_matching`), the writers' temporary folders
  (:func:`remove_temp_dirs`), and phase 2's resume-cache entries (:func:`candidates_to_parquet`).

Everything goes through Beam ``FileSystems``, so ``gs://`` and ``s3://`` work.

**Files sized in bytes.** Beam's ``WriteToParquet`` can fix a number of files but not their size, and with a fixed
number it groups each file's rows into *one* element: a file of all clusters becomes an element of hundreds of
megabytes that a portable runner (Flink, Dataflow's runner v2, the multi-process DirectRunner) must move whole.
:class:`WriteShards` sizes files by bytes and never builds an element larger than a row group:

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
import io
import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from schemas.ids import stable_id
from schemas.parquet import (
    CANDIDATES_SCHEMA,
    CLUSTERS_SCHEMA,
    EXAMPLES_SCHEMA,
    REJECTS_SCHEMA,
    TARGET_SCORES_SCHEMA,
    candidate_from_row,
    candidate_to_row,
    check_schema_version,
    cluster_from_row,
    cluster_to_row,
    example_to_row,
    reject_to_row,
    target_scores_row,
)
from schemas.records import Candidate
from transforms import payloads
from transforms.common import REJECTS, InputFormatError, StageOutput, count, internal_error
from transforms.settings import AssembleConfig, OutputConfig

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
    """What the write steps share: where, with which schema and codec, and how a row group's carried values become
    its rows (``None``: the values are the rows)."""

    folder: str
    prefix: str
    temp: str
    schema: pa.Schema
    codec: str
    finish: Callable[[list[Any]], list[dict[str, Any]]] | None = None


class WriteGroupFn(beam.DoFn):
    """``((shard, group, n_shards), [(key, row), ...])`` -> ``(shard, (group, temporary path, rows))``."""

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def process(self, element: tuple[tuple[int, int, int], Iterable[tuple[str, dict[str, Any]]]]) -> Iterator[Any]:
        (shard, group, n_shards), keyed = element
        finish = self._sink.finish
        rows = [row for _, row in sorted(keyed, key=lambda pair: pair[0])]
        if finish is not None:  # light records: their rows, made here with their bytes read back
            rows = finish(rows)
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


class LightRecords(NamedTuple):
    """How a writer's light records (their image bytes set aside: ``transforms/payloads.py``) get their bytes back
    (``restore_all``: a row group's records at once), and how many bytes that adds to each one's row."""

    restore_all: Callable[[list[Any]], list[Any]]
    stored_bytes: Callable[[Any], int]


class _RestoredRows(NamedTuple):
    """A row group's light records -> their rows, the image bytes of all of them read back together."""

    restore_all: Callable[[list[Any]], list[Any]]
    to_row: Callable[[Any], dict[str, Any]]

    def __call__(self, records: list[Any]) -> list[dict[str, Any]]:
        return [self.to_row(record) for record in self.restore_all(records)]


def _measured(record: Any, to_row: Callable[[Any], dict[str, Any]], key_of: Callable[[dict[str, Any]], str],
              stored_bytes: Callable[[Any], int]) -> tuple[str, Any, int]:
    """A light record -> ``(its row's key, the record, the size of its row once its bytes are back)``."""
    row = to_row(record)
    return key_of(row), record, row_bytes(row) + stored_bytes(record)


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
    together; ids make good keys). With ``light`` (:class:`LightRecords`), the records are carried light to the
    row-group writer, which reads their bytes back and makes the rows there; shards and row groups are still cut
    by the size of the rows written.
    """

    def __init__(self, output_dir: str, folder: str, prefix: str, schema: pa.Schema,
                 to_row: Callable[[Any], dict[str, Any]], key_of: Callable[[dict[str, Any]], str],
                 config: OutputConfig, *, light: LightRecords | None = None) -> None:
        super().__init__()
        folder_path = FileSystems.join(output_dir, folder)
        finish = None if light is None else _RestoredRows(light.restore_all, to_row)
        self._sink = _Sink(folder_path, prefix, FileSystems.join(folder_path, f".tmp-{uuid.uuid4().hex}"),
                           schema, config.codec, finish)
        self._to_row = to_row
        self._key_of = key_of
        self._light = light
        self._config = config

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        key_of, config, sink = self._key_of, self._config, self._sink
        if sink.finish is None:
            rows = (records | "ToRows" >> beam.Map(self._to_row)
                    | "KeyRows" >> beam.Map(lambda row: (key_of(row), row)))
            sizes = rows | "RowSizes" >> beam.Map(lambda pair: (pair[0], row_bytes(pair[1])))
        else:  # light records travel; each becomes its row where its row group is written
            measured = records | "MeasureRows" >> beam.Map(_measured, self._to_row, key_of,
                                                            self._light.stored_bytes)
            rows = measured | "KeyRecords" >> beam.Map(lambda triple: (triple[0], triple[1]))
            sizes = measured | "RowSizes" >> beam.Map(lambda triple: (triple[0], triple[2]))
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


def write_clusters(output_dir: str, config: OutputConfig, *, restore: bool = False) -> WriteShards:
    """``Cluster``s -> ``OUT/clusters/part-*.parquet``; with ``restore``, light clusters whose image bytes the
    writer reads back (``transforms/payloads.py``)."""
    return WriteShards(output_dir, "clusters", "part", CLUSTERS_SCHEMA, cluster_to_row,
                       lambda row: row["cluster_id"], config,
                       light=LightRecords(payloads.restore_all, payloads.stored_bytes) if restore else None)


def write_candidates(output_dir: str, config: OutputConfig) -> WriteShards:
    """``Candidate``s (phase 2) -> ``OUT/candidates/part-*.parquet``."""
    return WriteShards(output_dir, "candidates", "part", CANDIDATES_SCHEMA, candidate_to_row,
                       lambda row: row["candidate_id"], config)


def _reject_key(row: dict[str, Any]) -> str:
    return "\x1f".join(str(row.get(k) or "") for k in ("id", "stage", "reason", "source", "cluster_id"))


def write_rejects(output_dir: str, phase: str, config: OutputConfig) -> WriteShards:
    """``Reject``s of one phase -> ``OUT/rejects/<phase>-*.parquet`` (each phase rewrites only its own)."""
    return WriteShards(output_dir, "rejects", phase, REJECTS_SCHEMA, reject_to_row, _reject_key, config)


def write_scores(output_dir: str, config: OutputConfig) -> WriteShards:
    """The target filter's ``(ScoredCandidate, decision, failed)`` -> ``OUT/scores/part-*.parquet``."""
    return WriteShards(output_dir, "scores", "part", TARGET_SCORES_SCHEMA, lambda d: target_scores_row(*d),
                       lambda row: row["candidate_id"], config)


def write_examples(output_dir: str, config: OutputConfig) -> WriteShards:
    """``Example``s -> ``OUT/examples/part-*.parquet`` (files of ``config.shard_bytes``, row groups of
    ``config.row_group_bytes``: what a trainer streams)."""
    return WriteShards(output_dir, "examples", "part", EXAMPLES_SCHEMA, example_to_row,
                       lambda row: row["example_id"], config)


def examples_output(config: AssembleConfig, codec: str) -> OutputConfig:
    """How ``examples/`` is written: files of ``assemble.shard_bytes``, row groups of ``assemble.row_group_bytes``."""
    return OutputConfig(shard_bytes=config.shard_bytes, row_group_bytes=config.row_group_bytes, codec=codec)


# --- stats: values a phase computes about its own data --------------------------------------------------

STATS_FOLDER = "stats"


def stats_path(output_dir: str, phase: str, name: str) -> str:
    return FileSystems.join(output_dir, STATS_FOLDER, f"{phase}.{name}.json")


def _write_stats(parts: Iterable[dict[str, Any]], path: str) -> str:
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part)
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(merged, indent=2, sort_keys=True, default=float).encode("utf-8"))
    return path


class WriteStats(beam.PTransform):
    """``dict``s -> ``OUT/stats/<phase>.<name>.json`` (their merge). Writes ``{}`` when there are none.

    A stage that derives values from the run's own data (a calibrated threshold, score quantiles) hands them over as
    its ``extra["stats"]``; when the phase has finished, the launcher merges every ``stats/<phase>.*.json`` into
    ``manifest.json`` under ``stats.<phase>.<name>`` (:func:`read_stats`), so the numbers a run used are recorded
    next to the counts they produced.
    """

    def __init__(self, output_dir: str, phase: str, name: str) -> None:
        super().__init__()
        self._path = stats_path(output_dir, phase, name)

    def expand(self, stats: beam.PCollection) -> beam.PCollection:
        return (
            stats
            | "CollectStats" >> beam.combiners.ToList()
            | "WriteStatsJson" >> beam.Map(_write_stats, self._path)
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


def write_stage_extras(result: StageOutput, label: str, output_dir: str, phase: str, stage: str,
                       config: OutputConfig) -> None:
    """Write what a stage handed over besides its main output: ``"stats"`` to ``OUT/stats/<phase>.<stage>.json``,
    ``"scores"`` to ``OUT/scores/`` (steps ``Write<label>Stats``, ``Write<label>Scores``)."""
    for name, pcoll in sorted(result.extra.items()):
        if name == "stats":
            _ = pcoll | f"Write{label}Stats" >> WriteStats(output_dir, phase, stage)
        elif name == "scores":
            _ = pcoll | f"Write{label}Scores" >> write_scores(output_dir, config)
        else:
            raise ValueError(f"stage {stage}: no writer for its extra output {name!r}")


# --- finding and checking the files a later phase reads -------------------------------------------------


def matching_files(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def parquet_footer(path: str) -> tuple[pq.FileMetaData, pa.Schema]:
    """The footer of a Parquet file (row and row-group counts, Arrow schema with its metadata), read through
    Beam's FileSystems; no data page is read."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        parquet = pq.ParquetFile(handle)
        return parquet.metadata, parquet.schema_arrow


def count_parquet_rows(files: list[str]) -> int:
    """Rows of Parquet files, from their footers."""
    return sum(parquet_footer(path)[0].num_rows for path in files)


def check_output_file(path: str, name: str, required: tuple[str, ...] = ()) -> None:
    """Raise ``SchemaVersionError`` unless ``path`` is one of our ``name`` files (``clusters``, ``candidates``)
    of the current schema version, ``ValueError`` when it lacks one of the ``required`` columns."""
    schema = parquet_footer(path)[1]
    check_schema_version(schema, name, path)
    missing = [column for column in required if column not in schema.names]
    if missing:
        raise ValueError(f"{path}: not a {name} file (no {', '.join(missing)})")


_WRITTEN_BY = {"clusters": "clusters", "candidates": "synthesize"}
"""The phase that writes each kind of file a later phase reads."""


def expand_phase_inputs(patterns: list[str], name: str, *, phase: str, where: str = "--input",
                        required: tuple[str, ...] = ()) -> list[str]:
    """The files of globs that a later phase reads (an earlier phase's ``OUT/<name>/*.parquet``), each checked
    with :func:`check_output_file`; raises :class:`InputFormatError` naming the pattern or the file."""
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
        if not matched:
            raise InputFormatError(f"{where} {pattern!r} matches no file (phase {phase} reads the "
                                   f"{_WRITTEN_BY[name]} phase's OUT/{name}/*.parquet)")
        files.extend(path for path in matched if path not in files)
    for path in files:
        try:
            check_output_file(path, name, required)
        except (ValueError, OSError) as error:  # SchemaVersionError is a ValueError
            raise InputFormatError(f"phase {phase}: {error}") from error
    return sorted(files)


def read_columns(pattern: str, columns: list[str]) -> pa.Table | None:
    """The named columns of every Parquet file matching ``pattern`` (``None`` when none matches)."""
    tables = []
    for path in matching_files(pattern):
        with FileSystems.open(path) as handle:
            tables.append(pq.ParquetFile(handle).read(columns=columns))
    return pa.concat_tables(tables) if tables else None


# --- reading phase outputs ------------------------------------------------------------------------------


def _unreadable_cluster(row: dict[str, Any], row_id: str) -> dict[str, Any]:
    return {"cluster_id": row_id, "n_images": len(row.get("images") or ())}


def _unreadable_candidate(row: dict[str, Any], row_id: str) -> dict[str, Any]:
    return {"cluster_id": row.get("cluster_id")}  # one image: the render


class PhaseRows(NamedTuple):
    """How the rows of one kind of phase output become records."""

    id_column: str
    convert: Callable[[dict[str, Any]], Any]
    batch_rows: int
    """Rows converted at a time (rows with images are large)."""
    unreadable: Callable[[dict[str, Any], str], dict[str, Any]]
    """A row that does not convert -> the fields of its ``internal_error`` reject besides id, page and source."""


PHASE_ROWS = {
    "clusters": PhaseRows("cluster_id", cluster_from_row, 8, _unreadable_cluster),
    "candidates": PhaseRows("candidate_id", candidate_from_row, 16, _unreadable_candidate),
}
"""The phase outputs a later phase reads as records, by the schema name their files carry."""


class ReadPhaseFileFn(beam.DoFn):
    """A phase-output file path -> its records (``clusters``: ``Cluster``, ``candidates``: ``Candidate``), a few
    rows at a time, counted as ``<stage>/<kind>_read``. A row that does not convert is an ``internal_error`` reject
    that names the file and the row; the rest of the file goes on."""

    def __init__(self, kind: str, stage: str) -> None:
        if kind not in PHASE_ROWS:
            raise ValueError(f"no reader for phase output {kind!r} (known: {', '.join(PHASE_ROWS)})")
        self._kind = kind
        self._stage = stage

    def process(self, path: str) -> Iterator[Any]:
        rows = PHASE_ROWS[self._kind]
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            parquet = pq.ParquetFile(handle)
            check_schema_version(parquet.schema_arrow, self._kind, path)
            n = 0
            for batch in parquet.iter_batches(batch_size=rows.batch_rows):
                for row in batch.to_pylist():
                    count(self._stage, f"{self._kind}_read")
                    try:
                        yield rows.convert(row)
                    except Exception as error:  # noqa: BLE001 -- one bad row must not lose the file
                        row_id = row.get(rows.id_column) or stable_id(f"unreadable-{self._kind}", path, n)
                        yield internal_error(self._stage, error, id=row_id, page_url=row.get("page_url"),
                                             source=f"{path}:{n}", **rows.unreadable(row, row_id))
                    n += 1


class ReadPhaseOutput(beam.PTransform):
    """``PBegin`` -> the records of checked phase-output files of the subclass's ``kind`` (a key of
    :data:`PHASE_ROWS`); the counter ``<stage>/<kind>_read`` and the rejects of unreadable rows are the reading
    stage's."""

    kind = ""

    def __init__(self, files: Sequence[str], stage: str) -> None:
        super().__init__()
        self._files = list(files)
        self._stage = stage

    def expand(self, pbegin: beam.pvalue.PBegin) -> StageOutput:
        noun = self.kind[:-1].capitalize()  # clusters -> Cluster: the step names of earlier releases
        read = (
            pbegin
            | f"List{noun}Files" >> beam.Create(self._files)
            | f"Read{noun}Files" >> beam.ParDo(ReadPhaseFileFn(self.kind, self._stage)).with_outputs(
                REJECTS, main="records")
        )
        return StageOutput(read.records, read[REJECTS])


class ReadClusters(ReadPhaseOutput):
    """``PBegin`` -> ``Cluster``s of checked ``clusters/*.parquet`` paths (phase 1's output, read by phases 2
    and 3)."""

    kind = "clusters"


class ReadCandidates(ReadPhaseOutput):
    """``PBegin`` -> ``Candidate``s of checked ``candidates/*.parquet`` paths (phase 2's output, read by phase 3)."""

    kind = "candidates"


# --- sampled reading (the report's galleries) -----------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One row group of one file, with the ids of its rows."""

    path: str
    row_group: int
    nbytes: int
    ids: tuple[str, ...]


def row_group_ids(paths: Sequence[str], id_column: str) -> list[Unit]:
    """Every row group of ``paths`` with its size and the ids of its rows (only the id column is read)."""
    units = []
    for path in paths:
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            for i in range(parquet.num_row_groups):
                ids = parquet.read_row_group(i, columns=[id_column]).column(id_column).to_pylist()
                units.append(Unit(path, i, parquet.metadata.row_group(i).total_byte_size, tuple(map(str, ids))))
    return units


def choose_units(units: Sequence[Unit], wanted: Iterable[str], budget_bytes: int) -> list[Unit]:
    """The row groups holding the ``wanted`` ids, in the order of the ids, while they fit ``budget_bytes`` (at
    least one)."""
    where = {id_: unit for unit in units for id_ in unit.ids}
    chosen: list[Unit] = []
    spent = 0
    for id_ in wanted:
        unit = where.get(id_)
        if unit is None or unit in chosen:
            continue
        if chosen and spent + unit.nbytes > budget_bytes:
            continue  # a later id may sit in a row group already chosen
        chosen.append(unit)
        spent += unit.nbytes
    return chosen


def read_row_group(path: str, row_group: int, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    with FileSystems.open(path) as handle:
        return pq.ParquetFile(handle).read_row_group(row_group, columns=list(columns) if columns else None).to_pylist()


def read_present_columns(pattern: str, columns: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of every file matching ``pattern``, with those of ``columns`` the file has."""
    rows: list[dict[str, Any]] = []
    for path in matching_files(pattern):
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            rows.extend(parquet.read(columns=present).to_pylist())
    return rows


def sample_order(key: str) -> str:
    """The order rows are sampled in: a hash of their id (the same rows on every call, spread over the run)."""
    return stable_id("report", key)


def sample_rows(pattern: str, id_column: str, n: int, budget_bytes: int,
                columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Up to ``n`` rows of the files matching ``pattern``: those with the smallest hashes of ``id_column`` among
    the row groups that hold the smallest hashes and fit ``budget_bytes`` (the same rows on every call)."""
    if n <= 0:
        return []
    units = row_group_ids(matching_files(pattern), id_column)
    ranked = sorted((id_ for unit in units for id_ in unit.ids), key=sample_order)
    rows: list[dict[str, Any]] = []
    for unit in choose_units(units, ranked, budget_bytes):
        rows.extend(read_row_group(unit.path, unit.row_group, columns))
    return sorted(rows, key=lambda row: sample_order(str(row[id_column])))[:n]


# --- housekeeping ---------------------------------------------------------------------------------------


def delete_matching(patterns: Iterable[str]) -> int:
    """Delete the files matching ``patterns`` (a phase's previous output); returns how many."""
    paths = [path for pattern in patterns for path in matching_files(pattern)]
    if paths:
        FileSystems.delete(paths)
    return len(paths)


TEMP_PREFIXES = ("beam-temp-", ".tmp-")
"""Names of the temporary folders made beside a phase's output: Beam's file sinks', our sharded writer's, and the
image packs of phase 1 (``.tmp-images-*``, ``transforms/payloads.py``)."""


def remove_temp_dirs(output_dir: str, folders: Iterable[str]) -> list[str]:
    """Remove the temporary folders (:data:`TEMP_PREFIXES`) under ``OUT/<folder>`` with their files (after a phase,
    finished or failed: what a writer or the image packs left). Returns them, sorted.

    Object stores have no folders, only files under a prefix (and deleting a "folder" path there deletes nothing),
    so the files are found (``**`` crosses ``/``) and deleted themselves; a local disk keeps the folders, empty
    ones included, so they are then listed and removed.
    """
    found: set[str] = set()
    for folder in folders:
        base = FileSystems.join(output_dir, folder)
        for prefix in TEMP_PREFIXES:
            files = [m.path for m in FileSystems.match([FileSystems.join(base, f"{prefix}**")])[0].metadata_list]
            if files:
                FileSystems.delete(files)
            found.update(FileSystems.join(base, path[len(base):].lstrip("/").split("/")[0]) for path in files)
            for path in _local_dirs(base, prefix):
                FileSystems.delete([path])
                found.add(path)
    return sorted(found)


def _local_dirs(base: str, prefix: str) -> list[str]:
    """The folders named ``prefix*`` in ``base`` when it is a local folder (a local disk keeps empty folders)."""
    if not isinstance(FileSystems.get_filesystem(base), LocalFileSystem) or not os.path.isdir(base):
        return []
    return [FileSystems.join(base, entry.name) for entry in os.scandir(base)
            if entry.is_dir() and entry.name.startswith(prefix)]


# --- phase 2's resume cache: one finished cluster's candidates per file ---------------------------------


def candidates_to_parquet(candidates: Sequence[Candidate]) -> bytes:
    table = pa.Table.from_pylist([candidate_to_row(c) for c in candidates], schema=CANDIDATES_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="none")  # PNG renders: compressing again gains nothing
    return buffer.getvalue()


def candidates_from_parquet(data: bytes, path: str = "") -> list[Candidate]:
    table = pq.read_table(io.BytesIO(data))
    check_schema_version(table.schema, "candidates", path)
    return [candidate_from_row(row) for row in table.to_pylist()]
