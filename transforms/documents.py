"""Document datasets and column mappings for the read stage: MMC4, OBELICS, img2dataset Parquet, URL lists.

Plain functions from one row (a dict, as ``json.loads`` or pyarrow's ``to_pylist`` gives it) to
``InputRecord`` s and dead letters, plus :func:`read_documents`, which streams a whole Parquet or JSONL file
through them, and :func:`check_document_layout`, the before-the-job check. ``transforms/read.py`` calls these
when ``read.preset`` or ``read.columns`` is set (see :class:`DocumentSpec`).

* **MMC4** (``allenai/mmc4``): one page per row, ``url`` and ``image_info[]`` (``raw_url``,
  ``matched_text_index``); a pair's text is ``text_list[matched_text_index]`` (MMC4 has no alt text).
* **OBELICS** (``HuggingFaceM4/OBELICS``): ``images``/``texts`` interleaved (an image node has a URL in
  ``images`` and null in ``texts``); ``metadata`` is a JSON-encoded list aligned with ``images`` whose image
  entries hold ``alt_text`` (when the page had one) and ``document_url``; ``general_metadata`` is a JSON object
  with the page ``url``. A pair's text is the alt text.
* **A column mapping** for any Parquet or JSONL row: ``{image_url: url, text: caption, image: jpg}`` names the
  source column of each of our fields (``page_url``, ``image_url``, ``text``, ``image``; ``status`` and
  ``error`` for download outcomes). ``preset: img2dataset`` and ``preset: laion`` are such mappings. An image
  column holds bytes (Parquet) or base64 text (JSONL).
* **Failed downloads**: a row without image bytes whose ``status`` is not ``success`` or whose ``error`` is set
  (img2dataset writes ``status: failed_to_download`` and ``error_message``) is a ``download_failed`` dead letter
  keeping the message -- not a pair to fetch again, not a silent loss.

Record ids are *read*'s: ``stable_id(page_url, image_url, content_id(image bytes) or None)``; sources are
``path:row`` (Parquet, from 0) or ``path:line`` (JSONL, from 1), with ``#imgN`` (N: position in the
document's image list) for document presets.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from schemas.ids import content_id, stable_id
from schemas.records import InputRecord
from transforms.common import reject
from transforms.read import (
    DOWNLOAD_FAILED,
    JSONL,
    MALFORMED_RECORD,
    PARQUET,
    TRUNCATION_ERRORS,
    InputFormatError,
    TruncatedInputError,
    input_lines,
    open_input,
)

# The spec and the presets are settings (``read.preset``, ``read.columns``), checked when the config is built.
from transforms.settings import (
    DOCUMENT_FIELDS,
    IMG2DATASET,
    LAION,
    MMC4,
    OBELICS,
    PRESET_COLUMNS,
    PRESETS,
    DocumentSpec,
    document_spec,
)

STAGE = "read"

FIELDS = DOCUMENT_FIELDS

_OPTIONAL_COLUMNS = {"page_url", "text", "image", "status", "error"}
"""Mapped columns a file may lack (a URL list has no image column, LAION has no page URL)."""

_DOCUMENT_COLUMNS = {MMC4: ("url", "image_info", "text_list"),
                     OBELICS: ("images", "texts", "metadata", "general_metadata")}
_REQUIRED_DOCUMENT_COLUMNS = {MMC4: ("url", "image_info"), OBELICS: ("images",)}

_SUCCESS = ("success", "ok", "")


# --- one row -> pairs --------------------------------------------------------------------------------------


def _record(source: str, page_url: str | None, image_url: str | None, text: str | None,
            image: bytes | None) -> InputRecord:
    return InputRecord(record_id=stable_id(page_url, image_url, content_id(image) if image is not None else None),
                       source=source, page_url=page_url, image_url=image_url, text=text, image=image)


def _malformed(source: str, detail: str, **kwargs: Any) -> beam.pvalue.TaggedOutput:
    return reject(STAGE, MALFORMED_RECORD, detail, id=stable_id("read", source), source=source, **kwargs)


def _str_or_none(value: Any, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{what} is a {type(value).__name__}, expected a string or null")


def mmc4_pairs(row: Mapping[str, Any], source: str) -> list[InputRecord | beam.pvalue.TaggedOutput]:
    """The pairs of one MMC4 document: page ``url``, each ``image_info[i].raw_url`` with the sentence
    ``text_list[matched_text_index]`` as its text (``None`` when the index is missing or out of range)."""
    try:
        page_url = _str_or_none(row.get("url"), "url")
        images = row.get("image_info")
        texts = row.get("text_list") or []
        if not isinstance(images, list) or not isinstance(texts, list):
            raise TypeError("image_info and text_list must be lists")
    except TypeError as error:
        return [_malformed(source, f"MMC4 row: {error}")]
    out: list[InputRecord | beam.pvalue.TaggedOutput] = []
    for i, info in enumerate(images):
        item_source = f"{source}#img{i}"
        if not isinstance(info, Mapping):
            out.append(_malformed(item_source, f"MMC4 image_info[{i}] is a {type(info).__name__}, expected an "
                                               "object", page_url=page_url))
            continue
        image_url = info.get("raw_url")
        if not isinstance(image_url, str) or not image_url:
            out.append(_malformed(item_source, f"MMC4 image_info[{i}] has no raw_url", page_url=page_url))
            continue
        index = info.get("matched_text_index")
        text = texts[index] if isinstance(index, int) and 0 <= index < len(texts) else None
        out.append(_record(item_source, page_url, image_url, text if isinstance(text, str) else None, None))
    return out


def _json_field(value: Any, what: str) -> Any:
    if isinstance(value, str | bytes):
        try:
            return json.loads(value)
        except ValueError as error:
            raise TypeError(f"{what} is not valid JSON ({error})") from error
    return value


def obelics_pairs(row: Mapping[str, Any], source: str) -> list[InputRecord | beam.pvalue.TaggedOutput]:
    """The pairs of one OBELICS document: each non-null ``images[i]``, its alt text from ``metadata[i]`` (a JSON
    string), the page URL from ``general_metadata.url`` (else ``metadata[i].document_url``)."""
    try:
        images = row.get("images")
        if not isinstance(images, list):
            raise TypeError(f"images is a {type(images).__name__}, expected a list")
        texts = row.get("texts")
        if texts is not None and (not isinstance(texts, list) or len(texts) != len(images)):
            raise TypeError("texts must be a list as long as images")
        metadata = _json_field(row.get("metadata"), "metadata")
        if metadata is None:
            metadata = [None] * len(images)
        if not isinstance(metadata, list) or len(metadata) != len(images):
            raise TypeError("metadata must be a JSON list as long as images")
        general = _json_field(row.get("general_metadata"), "general_metadata") or {}
        if not isinstance(general, Mapping):
            raise TypeError("general_metadata must be a JSON object")
        page_url = _str_or_none(general.get("url"), "general_metadata.url")
    except TypeError as error:
        return [_malformed(source, f"OBELICS row: {error}")]
    out: list[InputRecord | beam.pvalue.TaggedOutput] = []
    for i, image_url in enumerate(images):
        if image_url is None:
            continue  # a text node
        item_source = f"{source}#img{i}"
        meta = metadata[i] if isinstance(metadata[i], Mapping) else {}
        url = page_url or (meta.get("document_url") if isinstance(meta.get("document_url"), str) else None)
        if not isinstance(image_url, str) or not image_url:
            out.append(_malformed(item_source, f"OBELICS images[{i}] is not a URL", page_url=url))
            continue
        alt = meta.get("alt_text")
        out.append(_record(item_source, url, image_url, alt if isinstance(alt, str) and alt.strip() else None, None))
    return out


def _image_bytes(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return base64.b64decode(value, validate=True)
    raise TypeError(f"image column holds a {type(value).__name__}, expected bytes or base64 text")


def mapped_pairs(row: Mapping[str, Any], columns: Mapping[str, str],
                 source: str) -> list[InputRecord | beam.pvalue.TaggedOutput]:
    """One pair from a row through a column mapping (our field -> column), or a ``download_failed`` dead letter
    for a row without bytes whose status is not a success or whose error is set (the message kept)."""

    def get(name: str) -> Any:
        column = columns.get(name)
        return row.get(column) if column is not None else None

    try:
        page_url = _str_or_none(get("page_url"), f"column {columns.get('page_url')!r}")
        image_url = _str_or_none(get("image_url"), f"column {columns.get('image_url')!r}")
        text = _str_or_none(get("text"), f"column {columns.get('text')!r}")
        image = _image_bytes(get("image"))
    except (TypeError, ValueError, binascii.Error) as error:
        return [_malformed(source, f"{type(error).__name__}: {error}")]
    status, error_message = get("status"), get("error")
    if not image:
        failed = (status is not None and str(status).strip().lower() not in _SUCCESS) or bool(error_message)
        if failed:
            detail = "; ".join(str(part) for part in (status, error_message) if part not in (None, ""))
            return [reject(STAGE, DOWNLOAD_FAILED, f"download failed upstream: {detail}",
                           id=stable_id(page_url, image_url, None), page_url=page_url, image_url=image_url,
                           source=source)]
    return [_record(source, page_url, image_url, text, image)]


def row_pairs(row: Any, source: str, spec: DocumentSpec) -> list[InputRecord | beam.pvalue.TaggedOutput]:
    """Dispatch one row by ``spec``; a row that is not an object is a ``malformed_record``."""
    if not isinstance(row, Mapping):
        return [_malformed(source, f"row is a {type(row).__name__}, expected an object")]
    if spec.preset == MMC4:
        return mmc4_pairs(row, source)
    if spec.preset == OBELICS:
        return obelics_pairs(row, source)
    return mapped_pairs(row, spec.mapping(), source)


# --- files ---------------------------------------------------------------------------------------------------


def _wanted_columns(spec: DocumentSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(columns to read, columns that must exist)."""
    if spec.document:
        return _DOCUMENT_COLUMNS[spec.preset], _REQUIRED_DOCUMENT_COLUMNS[spec.preset]
    mapping = spec.mapping()
    columns = tuple(dict.fromkeys(mapping.values()))
    required = tuple(column for name, column in mapping.items() if name not in _OPTIONAL_COLUMNS)
    return columns, required


def _what(spec: DocumentSpec) -> str:
    return f"read.preset={spec.preset}" if spec.preset else f"read.columns={dict(spec.columns)}"


def check_document_layout(path: str, fmt: str, spec: DocumentSpec) -> None:
    """Raise :class:`InputFormatError` when a Parquet file lacks a required column, or the first JSONL line is not
    a JSON object with the required keys."""
    _columns, required = _wanted_columns(spec)
    if fmt == PARQUET:
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                names = pq.ParquetFile(handle).schema_arrow.names
        except (pa.ArrowException, OSError) as error:
            raise InputFormatError(f"{path}: not a readable Parquet file ({error})") from error
    elif fmt == JSONL:
        names = []
        try:
            with open_input(path, compressed=True) as handle:
                for line in input_lines(handle):
                    if line.strip():
                        first = json.loads(line)
                        if not isinstance(first, dict):
                            raise InputFormatError(f"{path}: first line is a JSON {type(first).__name__}, "
                                                   "expected an object")
                        names = list(first)
                        break
        except (ValueError, OSError, EOFError, zlib.error) as error:
            raise InputFormatError(f"{path}: cannot be read as JSONL ({error})") from error
    else:
        raise InputFormatError(f"{path}: {_what(spec)} applies to Parquet and JSONL files, not {fmt}")
    missing = [column for column in required if column not in names]
    if missing:
        raise InputFormatError(f"{path}: {_what(spec)} needs column(s) {', '.join(missing)}; the file has "
                               f"{', '.join(names) or 'none'}")


def read_documents(path: str, fmt: str, spec: DocumentSpec,
                   batch_rows: int = 64) -> Iterator[InputRecord | beam.pvalue.TaggedOutput]:
    """Stream one Parquet or JSONL file through :func:`row_pairs` (row group by row group / line by line)."""
    if fmt == PARQUET:
        columns, _required = _wanted_columns(spec)
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            try:
                parquet = pq.ParquetFile(handle)
                present = [c for c in columns if c in parquet.schema_arrow.names]
                row = 0
                for batch in parquet.iter_batches(batch_size=batch_rows, columns=present):
                    for values in batch.to_pylist():
                        yield from row_pairs(values, f"{path}:{row}", spec)
                        row += 1
            except (pa.ArrowException, OSError) as error:
                raise InputFormatError(f"{path}: Parquet data unreadable ({error})") from error
    elif fmt == JSONL:
        # Python's decompressors (read.open_input), not Beam's: a compressed file cut short must raise, not pass
        # for a whole shorter one (the read stage turns the error into a truncated_file row).
        with open_input(path, compressed=True) as handle:
            line_number = 0
            try:
                for line_number, line in enumerate(input_lines(handle), start=1):
                    if not line.strip():
                        continue
                    source = f"{path}:{line_number}"
                    try:
                        values = json.loads(line)
                    except ValueError as error:
                        yield _malformed(source, f"line is not JSON ({error})")
                        continue
                    yield from row_pairs(values, source, spec)
            except TRUNCATION_ERRORS as error:
                raise TruncatedInputError(f"{path}: the compressed stream ends early, after line {line_number} "
                                          f"({type(error).__name__}: {error})") from error
    else:
        raise InputFormatError(f"{path}: {_what(spec)} applies to Parquet and JSONL files, not {fmt}")


__all__ = [
    "DOWNLOAD_FAILED", "FIELDS", "IMG2DATASET", "LAION", "MMC4", "OBELICS", "PRESETS", "PRESET_COLUMNS",
    "DocumentSpec", "check_document_layout", "document_spec", "mapped_pairs", "mmc4_pairs", "obelics_pairs",
    "read_documents", "row_pairs",
]
