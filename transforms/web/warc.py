"""WARC files (``.warc``, ``.warc.gz``) read with warcio through Beam's ``FileSystems`` (so ``gs://`` works).

:func:`iter_responses` streams a file's ``response`` records (``resource`` records too: a WARC written by a
crawler that stores the body without the HTTP envelope) and sorts them into HTML pages and images by their
``Content-Type`` (sniffing the body when it is missing or generic). Bodies come with transfer and content
encodings removed; a body larger than ``max_bytes`` is not read (``too_large`` is set instead).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

HTML, IMAGE, OTHER = "html", "image", "other"
WARC_SUFFIXES = (".warc", ".warc.gz")

_HTML_TYPES = ("text/html", "application/xhtml+xml")
_GENERIC_TYPES = ("", "application/octet-stream", "binary/octet-stream", "application/unknown")


@dataclass(frozen=True)
class WarcResponse:
    """One captured HTTP response (or stored resource) of a WARC file."""

    url: str
    """``WARC-Target-URI``."""
    kind: str
    """:data:`HTML`, :data:`IMAGE` or :data:`OTHER`."""
    status: int | None
    """HTTP status (``None`` for ``resource`` records)."""
    content_type: str | None
    """The HTTP ``Content-Type`` header (``WARC``'s for ``resource`` records)."""
    x_robots_tag: tuple[str, ...]
    """Every ``X-Robots-Tag`` header value of the response."""
    body: bytes | None = field(repr=False)
    """The payload with transfer and content encodings removed; ``None`` when it was too large."""
    offset: int
    """Byte offset of the record in the file (what ``source`` names, as Common Crawl's indexes do)."""
    too_large: bool = False


def is_warc(path: str) -> bool:
    """Whether ``path`` has a WARC extension."""
    return path.lower().endswith(WARC_SUFFIXES)


def sniff_kind(content_type: str | None, head: bytes) -> str:
    """:data:`HTML`, :data:`IMAGE` or :data:`OTHER` from the declared type, sniffing only generic ones."""
    declared = (content_type or "").split(";", 1)[0].strip().lower()
    if declared in _HTML_TYPES:
        return HTML
    if declared.startswith("image/"):
        return IMAGE
    if declared in _GENERIC_TYPES:
        if looks_like_html(head):
            return HTML
        if image_magic(head) is not None:
            return IMAGE
    return OTHER


def looks_like_html(head: bytes) -> bool:
    """Whether a body starts like an HTML document (after a BOM and whitespace)."""
    start = head[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return start.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<!--", b"<title", b"<meta"))


_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
    (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
)


def image_magic(head: bytes) -> str | None:
    """The image format that the first bytes announce (JPEG, PNG, GIF, WebP, BMP, TIFF, AVIF/HEIF), or ``None``."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"):
        return "avif" if head[8:11] == b"avi" else "heif"
    return None


class TruncatedWarcError(ArchiveLoadFailed):
    """A WARC file ends inside a record (or has bytes after its last whole record that form none): it was cut.
    The records before the cut are whole and were yielded."""


_PARSE_ERRORS = (AttributeError, ValueError, EOFError, zlib.error, OSError)
"""What warcio raises on a record whose headers are cut off or garbled, besides ``ArchiveLoadFailed``."""

_TAIL_PROBE = 64


def iter_responses(path: str, max_bytes: int) -> Iterator[WarcResponse]:
    """The ``response`` and ``resource`` records of one WARC file, streamed (one record in memory at a time).

    warcio reads a cut file as a shorter whole one in most places (a record cut in its header block ends the
    iteration, a cut body reads short), so every record is checked to hold all of its ``Content-Length`` bytes,
    and the last whole record to end where the file does (an uncompressed file may end in the record separator).

    Raises:
        TruncatedWarcError: the file ends, or breaks, inside a record (after yielding the records before it).
        warcio.exceptions.ArchiveLoadFailed: the file is not a WARC file (ARC files are not read either).
    """
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        records = ArchiveIterator(handle)
        iterator = iter(records)
        end, compressed = 0, False
        while True:
            try:
                record = next(iterator)
            except StopIteration:
                break
            except ArchiveLoadFailed as error:
                if end == 0:  # no whole record yet: not a WARC file (or its first record is broken)
                    raise
                raise TruncatedWarcError(f"the record after offset {end} is cut off or damaged ({error})") from error
            except _PARSE_ERRORS as error:
                raise TruncatedWarcError(f"the record after offset {end} is cut off or damaged "
                                         f"({type(error).__name__}: {error})") from error
            if record.format != "warc":
                # warcio reads anything that is not WARC as the old ARC format; we take WARC only
                raise ArchiveLoadFailed(f"record at offset {records.offset} is not a WARC record ({record.format})")
            if not (record.rec_headers.get_header("Content-Length") or "").strip().isdigit():
                # mandatory in WARC; missing or empty when the record's header block was cut (warcio reads on)
                raise TruncatedWarcError(f"the record at offset {end} has no Content-Length: its header block is cut "
                                         "off")
            response = _response(record, max_bytes)
            # Read what is left of the record (warcio would, without saying whether it was all there).
            while record.raw_stream.read(1 << 16):
                pass
            missing = getattr(record.raw_stream, "limit", 0)
            if missing > 0:
                url = record.rec_headers.get_header("WARC-Target-URI")
                raise TruncatedWarcError(f"the {record.rec_type} record for {url} at offset {end} is cut off "
                                         f"({missing} bytes missing)")
            offset = records.get_record_offset()  # after reading: asking before the body is read skips the body
            end = offset + records.get_record_length()
            decompressor = records.reader.decompressor
            compressed = decompressor is not None
            if compressed and not getattr(decompressor, "eof", True):
                # the record's gzip member stops before its end (its CRC and size): the file was cut there
                raise TruncatedWarcError(f"the gzip member of the {record.rec_type} record at offset {offset} is cut "
                                         "off before its end")
            if response is not None:
                yield dataclasses.replace(response, offset=offset)
        _check_tail(path, end, compressed)


def _response(record: Any, max_bytes: int) -> WarcResponse | None:
    """The response or resource of one record (offset still unknown), or ``None`` for other records."""
    if record.rec_type not in ("response", "resource"):
        return None
    url = record.rec_headers.get_header("WARC-Target-URI")
    if not url:
        return None
    if record.rec_type == "response" and record.http_headers is not None:
        status_line = record.http_headers.get_statuscode()
        status = int(status_line) if status_line and status_line.isdigit() else None
        content_type = record.http_headers.get_header("Content-Type")
        robots = tuple(value for name, value in record.http_headers.headers if name.lower() == "x-robots-tag")
    elif record.rec_type == "resource":
        status, robots = None, ()
        content_type = record.rec_headers.get_header("Content-Type")
    else:
        return None
    body = record.content_stream().read(max_bytes + 1)
    too_large = len(body) > max_bytes
    kind = sniff_kind(content_type, body[:512])
    return WarcResponse(url=url, kind=kind, status=status, content_type=content_type, x_robots_tag=robots,
                        body=None if too_large else body, offset=-1, too_large=too_large)


def _check_tail(path: str, end: int, compressed: bool) -> None:
    """Raise :class:`TruncatedWarcError` when bytes follow the last whole record (ending at ``end``): a record
    whose header block was cut, which warcio takes for the end of the file. An uncompressed file may end in the
    blank lines that separate records."""
    matched = FileSystems.match([path])[0].metadata_list
    if not matched or matched[0].size_in_bytes <= end:
        return
    size = matched[0].size_in_bytes
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.seek(end)
        tail = handle.read(_TAIL_PROBE)
    if compressed or tail.strip(b"\r\n") or size - end > _TAIL_PROBE:
        raise TruncatedWarcError(f"{size - end} bytes after the last whole record (offset {end}) form no record: "
                                 f"the file is cut off or damaged there")


__all__ = ["HTML", "IMAGE", "OTHER", "WARC_SUFFIXES", "TruncatedWarcError", "WarcResponse", "image_magic", "is_warc",
           "iter_responses", "looks_like_html", "sniff_kind"]
