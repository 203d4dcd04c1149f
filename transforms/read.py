"""Stage *read*: crawled image-text pairs from Parquet, JSONL and WebDataset files.

Every input format yields the same :class:`~schemas.records.InputRecord`. Parquet and JSONL files of other
layouts -- MMC4 and OBELICS documents, img2dataset's Parquet, URL lists -- are read through
``read.preset`` / ``read.columns`` (:mod:`transforms.documents`); WARC files (``.warc``, ``.warc.gz``) are
matched and checked here but read by the *extract* stage (:mod:`transforms.extract`). Files are streamed (Parquet
row group by row group in batches of ``read.batch_rows`` rows, JSONL line by line, tar member by
member), so a reader never holds a whole file in memory. All IO goes through Beam's ``FileSystems``,
so ``gs://`` and ``s3://`` paths work wherever the matching Beam extra is installed.

A record that cannot be made into an ``InputRecord`` (a JSONL line that is not JSON, an
``image_path`` that cannot be read, ...) becomes a dead letter; a file that is not what its extension
says, or lacks the required columns, stops the job with a message naming the file
(:class:`InputFormatError`), checked before the job starts for the first ``read.validate_max_files``
files and while reading for the rest.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import gzip
import json
import logging
import lzma
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from schemas.ids import content_id, stable_id
from schemas.records import InputRecord
from transforms.common import REJECTS, InputFormatError, Progress, Reason, StageOutput, count, reject
from transforms.settings import ReadConfig

LOG = logging.getLogger(__name__)

STAGE = "read"

PARQUET, JSONL, WEBDATASET, WARC = "parquet", "jsonl", "webdataset", "warc"

# Longest suffix first: ".jsonl.gz" must win over ".gz".
_SUFFIXES = (
    (".jsonl.gz", JSONL),
    (".jsonl", JSONL),
    (".parquet", PARQUET),
    (".tar.gz", WEBDATASET),
    (".tar", WEBDATASET),
    (".warc.gz", WARC),
    (".warc", WARC),
)

DOCUMENT_FORMATS = (PARQUET, JSONL)
"""The formats ``read.preset`` and ``read.columns`` apply to (the others have one layout each)."""

_WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")

# Reasons this stage rejects records for (documented in docs/reasons.md).
MALFORMED_RECORD = "malformed_record"
IMAGE_UNREADABLE = "image_unreadable"
TRUNCATED_FILE = "truncated_file"
"""A file-level reject: a compressed (or tar) input that ends early. Its row accounts for no record (the
records it held past the cut were never read); the records before the cut go on."""

DOWNLOAD_FAILED = "download_failed"
"""A row of a mapped layout (``read.columns``, ``read.preset=img2dataset``) whose download failed upstream."""

REASONS = (Reason(MALFORMED_RECORD), Reason(IMAGE_UNREADABLE), Reason(TRUNCATED_FILE), Reason(DOWNLOAD_FAILED))


@dataclass(frozen=True)
class InputFile:
    """One matched input file and its format."""

    path: str
    format: str


def input_format(path: str) -> str | None:
    """The input format of ``path`` from its extension, or ``None`` when no reader handles it."""
    lower = path.lower()
    for suffix, fmt in _SUFFIXES:
        if lower.endswith(suffix):
            return fmt
    return None


def expand_inputs(patterns: list[str]) -> list[InputFile]:
    """Match the ``--input`` globs; fail when one matches nothing or a file has an unknown extension."""
    if not patterns:
        raise InputFormatError("no --input given")
    files: dict[str, InputFile] = {}
    for pattern in patterns:
        matched = FileSystems.match([pattern])[0].metadata_list
        if not matched:
            raise InputFormatError(f"--input {pattern!r} matches no file")
        for metadata in sorted(matched, key=lambda m: m.path):
            fmt = input_format(metadata.path)
            if fmt is None:
                raise InputFormatError(
                    f"{metadata.path}: unknown input format; expected one of "
                    f"{', '.join(s for s, _ in _SUFFIXES)}")
            files[metadata.path] = InputFile(metadata.path, fmt)
    return sorted(files.values(), key=lambda f: f.path)


# --- layout checks ---------------------------------------------------------------------------------

_STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view())
_BINARY_TYPES = (pa.binary(), pa.large_binary(), pa.binary_view())
_PARQUET_COLUMNS = {
    "page_url": (_STRING_TYPES, True),
    "image_url": (_STRING_TYPES, True),
    "image": (_BINARY_TYPES, True),
    "text": (_STRING_TYPES, False),
}


def input_lines(handle: Any) -> Iterator[bytes]:
    """Lines of a Beam file handle (``CompressedFile`` has ``readline`` but is not iterable)."""
    return iter(handle.readline, b"")


class TruncatedInputError(InputFormatError):
    """A compressed or tar input ends before its end-of-stream (or end-of-archive) marker."""


_DECOMPRESSORS = {".gz": gzip.GzipFile, ".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile}
"""Compressed suffixes read with Python's own decompressors, which raise on a stream that ends early (Beam's
``CompressedFile`` returns end of file instead, so a truncated file would pass for a shorter whole one)."""

TRUNCATION_ERRORS = (EOFError, zlib.error, lzma.LZMAError, OSError)


def open_input(path: str, compressed: bool = False) -> Any:
    """A binary file handle on ``path`` through Beam FileSystems; with ``compressed``, decompressed by suffix."""
    raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    if not compressed:
        return raw
    for suffix, opener in _DECOMPRESSORS.items():
        if path.lower().endswith(suffix):
            return opener(fileobj=raw, mode="rb")
    return raw


class _EndMarkedTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` that records on its archive whether the end-of-archive marker (a zero block) was read.

    In stream mode ``tarfile`` ends iteration silently both at that marker and at a stream that stops between
    or inside member headers; only the first is a whole archive.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.end_marker_seen = True  # type: ignore[attr-defined]
            raise


def parquet_columns(path: str, schema: pa.Schema) -> list[str]:
    """The columns to read from a Parquet input; raises :class:`InputFormatError` on a bad layout."""
    columns = []
    for name, (types, required) in _PARQUET_COLUMNS.items():
        index = schema.get_field_index(name)
        if index < 0:
            if required:
                raise InputFormatError(
                    f"{path}: Parquet input has no column {name!r} (columns: {', '.join(schema.names)}); "
                    f"required: page_url (string), image_url (string), image (binary), optional: text")
            continue
        field_type = schema.field(index).type
        if field_type not in types and not pa.types.is_null(field_type):
            expected = "binary" if name == "image" else "string"
            raise InputFormatError(f"{path}: column {name!r} has type {field_type}, expected {expected}")
        columns.append(name)
    return columns


def byteless_inputs(files: Iterable[InputFile], config: ReadConfig) -> bool:
    """Whether some input yields pairs without image bytes, which the *fetch* stage then fetches (``fetch.enabled:
    auto``): WARC pages, and Parquet or JSONL files read through a preset or mapping without an image column."""
    spec = config.spec()
    return any(f.format == WARC or (spec is not None and spec.byteless and f.format in DOCUMENT_FORMATS)
               for f in files)


def validate_input_file(input_file: InputFile, config: ReadConfig | None = None) -> None:
    """Check that a file is readable in its format and has the fields we need (reads little data): with
    ``read.preset`` / ``read.columns`` set, a Parquet or JSONL file has that layout's columns."""
    path = input_file.path
    spec = config.spec() if config is not None else None
    if input_file.format == WARC:
        from transforms.extract import validate_warc  # (extract imports this module)

        validate_warc(path)
    elif spec is not None and input_file.format in DOCUMENT_FORMATS:
        from transforms.documents import check_document_layout  # (documents imports this module)

        check_document_layout(path, input_file.format, spec)
    elif input_file.format == PARQUET:
        with open_input(path) as handle:
            schema = parquet_file(path, handle).schema_arrow
        parquet_columns(path, schema)
    elif input_file.format == JSONL:
        with open_input(path, compressed=True) as handle:
            try:
                for line in input_lines(handle):
                    if line.strip():
                        _check_first_jsonl_line(path, line)
                        break
            except (OSError, EOFError, zlib.error) as error:
                raise InputFormatError(f"{path}: cannot be read as JSONL ({error})") from error
    elif input_file.format == WEBDATASET:
        with open_input(path, compressed=True) as handle:
            try:
                with tarfile.open(fileobj=handle, mode="r|") as tar:
                    next(iter(tar), None)
            except (tarfile.TarError, OSError, EOFError) as error:
                raise InputFormatError(f"{path}: not a readable tar (WebDataset) file ({error})") from error


def _check_first_jsonl_line(path: str, line: bytes) -> None:
    try:
        obj = json.loads(line)
    except ValueError as error:
        raise InputFormatError(f"{path}: first line is not JSON ({error}); is this JSONL?") from error
    if not isinstance(obj, dict):
        raise InputFormatError(f"{path}: first line is a JSON {type(obj).__name__}, expected an object")
    if "page_url" not in obj or not ({"image_b64", "image_path"} & obj.keys()):
        raise InputFormatError(
            f"{path}: first record has keys {sorted(obj)}; expected page_url, image_url, text and one of "
            f"image_b64 / image_path")


# --- readers ----------------------------------------------------------------------------------------


def _record(source: str, page_url: Any, image_url: Any, text: Any, image: bytes | None) -> InputRecord:
    return InputRecord(
        record_id=stable_id(page_url, image_url, content_id(image) if image is not None else None),
        source=source,
        page_url=page_url,
        image_url=image_url,
        text=text,
        image=image,
    )


def _read_failure(source: str, reason: str, detail: str, **kwargs: Any) -> beam.pvalue.TaggedOutput:
    return reject(STAGE, reason, detail, id=stable_id("read", source), source=source, **kwargs)


def parquet_file(path: str, handle: Any) -> pq.ParquetFile:
    """``handle``'s Parquet file; :class:`InputFormatError` naming ``path`` when it is not one."""
    try:
        return pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as error:
        raise InputFormatError(f"{path}: not a readable Parquet file ({error})") from error


def read_parquet(path: str, batch_rows: int, row_groups: tuple[int, int] | None = None,
                 first_row: int = 0) -> Iterator[InputRecord]:
    """The records of a Parquet file of our layout, or of its row groups ``[start, stop)`` (``row_groups``), whose
    first row is row ``first_row`` of the file (record sources are ``path:row``)."""
    with open_input(path) as handle:
        parquet = parquet_file(path, handle)
        columns = parquet_columns(path, parquet.schema_arrow)
        groups = None if row_groups is None else list(range(*row_groups))
        row = first_row
        try:
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
                data = batch.to_pydict()
                texts = data.get("text") or [None] * batch.num_rows
                for page_url, image_url, text, image in zip(
                        data["page_url"], data["image_url"], texts, data["image"], strict=True):
                    yield _record(f"{path}:{row}", page_url, image_url, text, image)
                    row += 1
        except (pa.ArrowException, OSError) as error:
            raise InputFormatError(f"{path}: Parquet data unreadable after row {row} ({error})") from error


@dataclass(frozen=True)
class InputSplit:
    """The part of an input file that one worker reads: Parquet row groups ``[start, stop)`` (``row_groups``)
    whose first row is ``first_row``, or the whole file (``row_groups`` is ``None``)."""

    file: InputFile
    row_groups: tuple[int, int] | None = None
    first_row: int = 0
    index: int = 0
    """The split's place in its file (split 0 counts the file)."""

    @property
    def whole(self) -> bool:
        return self.row_groups is None


def splittable(input_file: InputFile, config: ReadConfig) -> bool:
    """Whether ``input_file`` is read in parts: Parquet of our layout (row groups), when ``read.split_rows``."""
    return input_file.format == PARQUET and config.spec() is None and config.split_rows > 0


def plan_splits(input_file: InputFile, config: ReadConfig) -> list[InputSplit]:
    """``input_file`` cut into splits of whole row groups of at least ``read.split_rows`` rows each (the last may
    be shorter), read from the file's footer; one whole-file split when it is not splittable."""
    if not splittable(input_file, config):
        return [InputSplit(input_file)]
    with open_input(input_file.path) as handle:
        metadata = parquet_file(input_file.path, handle).metadata
    splits: list[InputSplit] = []
    start, first_row, rows = 0, 0, 0
    for group in range(metadata.num_row_groups):
        rows += metadata.row_group(group).num_rows
        if rows >= config.split_rows or group == metadata.num_row_groups - 1:
            splits.append(InputSplit(input_file, (start, group + 1), first_row, len(splits)))
            start, first_row, rows = group + 1, first_row + rows, 0
    return splits or [InputSplit(input_file)]  # no row group: nothing to split


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"field {key!r} is a JSON {type(value).__name__}, expected a string or null")


def read_jsonl(path: str) -> Iterator[InputRecord | beam.pvalue.TaggedOutput]:
    """Records of a JSONL file (``.jsonl``, or compressed: ``.jsonl.gz``, ``.bz2``, ``.xz``).

    Raises :class:`TruncatedInputError` after the last whole line when a compressed file ends early.
    """
    with open_input(path, compressed=True) as handle:
        line_number = 0
        try:
            for line_number, line in enumerate(input_lines(handle), start=1):
                if line.strip():
                    yield _jsonl_record(path, line_number, line)
        except TRUNCATION_ERRORS as error:
            raise TruncatedInputError(f"{path}: the compressed stream ends early, after line {line_number} "
                                      f"({type(error).__name__}: {error})") from error


def _jsonl_record(path: str, line_number: int, line: bytes) -> InputRecord | beam.pvalue.TaggedOutput:
    source = f"{path}:{line_number}"
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise TypeError(f"line is a JSON {type(obj).__name__}, expected an object")
        page_url = _optional_str(obj, "page_url")
        image_url = _optional_str(obj, "image_url")
        text = _optional_str(obj, "text")
        image_b64 = _optional_str(obj, "image_b64")
        image_path = _optional_str(obj, "image_path")
        image = base64.b64decode(image_b64, validate=True) if image_b64 is not None else None
    except (ValueError, TypeError, binascii.Error) as error:
        return _read_failure(source, MALFORMED_RECORD, f"{type(error).__name__}: {error}")
    if image is None and image_path:
        full = image_path if "://" in image_path or image_path.startswith("/") else \
            FileSystems.join(FileSystems.split(path)[0], image_path)
        try:
            with open_input(full) as image_file:
                image = image_file.read()
        except OSError as error:
            return _read_failure(source, IMAGE_UNREADABLE, f"image_path {image_path!r}: {error}",
                                 page_url=page_url, image_url=image_url)
    return _record(source, page_url, image_url, text, image)


_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def _webdataset_sample(path: str, key: str, parts: dict[str, bytes]) -> InputRecord | beam.pvalue.TaggedOutput:
    source = f"{path}#{key}"
    image = next((parts[ext] for ext in _WEBDATASET_IMAGE_EXTENSIONS if ext in parts), None)
    text = parts["txt"].decode("utf-8", errors="replace") if "txt" in parts else None
    metadata: dict[str, Any] = {}
    if "json" in parts:
        try:
            metadata = json.loads(parts["json"])
            if not isinstance(metadata, dict):
                raise TypeError(f"{key}.json is a JSON {type(metadata).__name__}, expected an object")
            page_url = _optional_str(metadata, "page_url")
            image_url = _optional_str(metadata, "url")
        except (ValueError, TypeError) as error:
            return _read_failure(source, MALFORMED_RECORD, f"{type(error).__name__}: {error}")
    else:
        page_url = image_url = None
    if text is None and isinstance(metadata.get("caption"), str):
        text = metadata["caption"]
    return _record(source, page_url, image_url, text, image)


def read_webdataset(path: str) -> Iterator[InputRecord | beam.pvalue.TaggedOutput]:
    """Samples of an img2dataset tar shard: ``KEY.jpg|png|webp``, ``KEY.txt``, ``KEY.json``."""
    with open_input(path, compressed=True) as handle:
        try:
            tar = tarfile.open(fileobj=handle, mode="r|", tarinfo=_EndMarkedTarInfo)
        except (tarfile.TarError, *TRUNCATION_ERRORS) as error:
            raise InputFormatError(f"{path}: not a readable tar (WebDataset) file ({error})") from error
        key: str | None = None
        parts: dict[str, bytes] = {}
        try:
            for member in tar:
                if not member.isfile():
                    continue
                match = _KEY_RE.match(member.name)
                if match is None:
                    continue
                member_key, extension = match.group(1), match.group(2).lower()
                if member_key != key:
                    if key is not None:
                        yield _webdataset_sample(path, key, parts)
                    key, parts = member_key, {}
                extracted = tar.extractfile(member)
                parts[extension] = extracted.read() if extracted is not None else b""
        except (tarfile.TarError, *TRUNCATION_ERRORS) as error:
            # The sample being read when the data stopped may lack parts: it is part of the lost tail.
            raise TruncatedInputError(f"{path}: the tar data ends early, inside or after sample {key!r} "
                                      f"({type(error).__name__}: {error})") from error
        if not getattr(tar, "end_marker_seen", False):
            raise TruncatedInputError(f"{path}: the tar stream stops without its end-of-archive marker, after "
                                      f"sample {key!r}; the file was cut")
        if key is not None:
            yield _webdataset_sample(path, key, parts)


class SplitFileFn(beam.DoFn):
    """:class:`InputFile` -> its :class:`InputSplit` s (:func:`plan_splits`: only a Parquet footer is read)."""

    def __init__(self, config: ReadConfig) -> None:
        self._config = config

    def process(self, input_file: InputFile) -> Iterator[InputSplit]:
        yield from plan_splits(input_file, self._config)


WHOLE = "whole"
"""The output of :class:`ReadFileFn` holding the records of files read whole (redistributed by ``read.reshuffle``)."""


class ReadFileFn(beam.DoFn):
    """Reads one :class:`InputSplit` (or a whole :class:`InputFile`) into ``InputRecord``s: the main output for
    the parts of a split file, :data:`WHOLE` for files read whole (with ``whole_output``; otherwise main too),
    and dead letters (``rejects``)."""

    def __init__(self, config: ReadConfig, whole_output: bool = False) -> None:
        self._config = config
        self._whole_output = whole_output

    def setup(self) -> None:
        self._progress = Progress(STAGE, "records")

    def process(self, part: InputSplit | InputFile) -> Iterator[Any]:
        split = part if isinstance(part, InputSplit) else InputSplit(part)
        input_file = split.file
        spec = self._config.spec()
        if spec is not None and input_file.format in DOCUMENT_FORMATS:
            from transforms.documents import read_documents  # (documents imports this module)

            items = read_documents(input_file.path, input_file.format, spec, self._config.batch_rows)
        elif input_file.format == PARQUET:
            items = read_parquet(input_file.path, self._config.batch_rows, split.row_groups, split.first_row)
        elif input_file.format == JSONL:
            items = read_jsonl(input_file.path)
        elif input_file.format == WEBDATASET:
            items = read_webdataset(input_file.path)
        else:  # WARC files go to the extract stage
            raise InputFormatError(f"{input_file.path}: the read stage does not read {input_file.format!r} files")
        tag = WHOLE if self._whole_output and split.whole else None
        # A bad *file* (InputFormatError) fails the job on purpose; anything else unexpected is a bug
        # that must not silently lose the rest of the file, so it fails the job too. A file that ends early
        # keeps what was read before the cut and becomes one truncated_file row: the launcher fails the run
        # unless read.allow_truncated.
        n = 0
        try:
            for item in items:
                n += 1
                count(STAGE, "records")
                self._progress.add()
                yield item if tag is None or isinstance(item, beam.pvalue.TaggedOutput) else \
                    beam.pvalue.TaggedOutput(tag, item)
        except TruncatedInputError as error:
            LOG.error("read: %s (%s records read from it)", error, f"{n:,}")
            count(STAGE, "truncated_files")
            yield reject(STAGE, TRUNCATED_FILE, f"{error}; {n} records were read from it, the rest of the file "
                         f"is missing", id=stable_id("truncated", input_file.path), source=input_file.path,
                         n_images=0)
        if split.index == 0:
            count(STAGE, "files")
        part = ""
        if not split.whole:
            count(STAGE, "splits")
            part = f" (row groups {split.row_groups[0]}-{split.row_groups[1] - 1})"
        LOG.info("read: %s records from %s%s", f"{n:,}", input_file.path, part)


class ReadPairs(beam.PTransform):
    """``PBegin`` -> ``InputRecord``s, from already matched and checked input files (not WARC files: those are
    the extract stage's).

    Parquet files of our layout are read in splits of whole row groups (``read.split_rows`` rows), spread over the
    workers as small descriptors, so that each worker reads and normalizes its own splits and no image byte is
    redistributed; files read whole (JSONL, tar, document layouts) have their records redistributed
    (``read.reshuffle``), so that normalization is not fused to the one worker that read each file.
    """

    def __init__(self, files: list[InputFile], config: ReadConfig) -> None:
        super().__init__()
        self._files = files
        self._config = config

    def expand(self, pbegin: beam.pvalue.PBegin) -> StageOutput:
        splits = (
            pbegin
            | "ListFiles" >> beam.Create(self._files)
            | "SplitFiles" >> beam.ParDo(SplitFileFn(self._config))
            | "SpreadSplits" >> beam.Reshuffle()
        )
        whole = self._config.reshuffle and not all(splittable(f, self._config) for f in self._files)
        read = splits | "ReadFiles" >> beam.ParDo(ReadFileFn(self._config, whole_output=whole)).with_outputs(
            REJECTS, WHOLE, main="records")
        records = read.records
        if whole:
            spread = read[WHOLE] | "BreakFusion" >> beam.Reshuffle()
            records = (records, spread) | "MergeRecords" >> beam.Flatten()
        return StageOutput(records, read[REJECTS])


__all__ = [
    "DOCUMENT_FORMATS",
    "DOWNLOAD_FAILED",
    "IMAGE_UNREADABLE",
    "MALFORMED_RECORD",
    "TRUNCATED_FILE",
    "WARC",
    "InputFile",
    "InputFormatError",
    "InputSplit",
    "TruncatedInputError",
    "ReadConfig",
    "ReadPairs",
    "byteless_inputs",
    "expand_inputs",
    "plan_splits",
    "input_format",
    "validate_input_file",
]
