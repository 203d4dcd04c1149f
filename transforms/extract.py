"""Stage *extract*: WARC files -> image-text pairs (``InputRecord`` s), with bytes where the WARC has them.

For every HTML response of a WARC file (``transforms.web.warc``), the page's ``<img>`` tags become pairs
(``transforms.web.html``: URL from ``srcset``/lazy attributes/``src`` resolved against the base URL; text from
``alt``, else ``title``, else the nearby text). Skipped tags leave as dead letters with their reason
(``inline_data_uri``, ``tracking_pixel``, ``navigation_image``, ``invalid_image_url``, ``repeated_image_url``);
every image of a page that opts out (``<meta name="robots" content="noai">`` or an ``X-Robots-Tag: noai`` on the
page response) leaves as ``opted_out``.

Image responses in the same WARC files are joined to the pairs by URL (``CoGroupByKey`` on the URL without its
fragment, scheme and host in lower case, default port dropped): a pair whose image was captured gets its bytes
(the first 2xx capture by content hash when there are several; ``opted_out`` when that capture carries an
``X-Robots-Tag`` opt-out), the others go out without bytes for the *fetch* stage. Captured images no page
points at are only counted (``extract/images_unreferenced``). The join holds one URL's pairs and captures at a
time, never a file's or the job's.

Record ids follow *read*: ``stable_id(page_url, image_url, content_id(bytes))`` for a pair with captured bytes,
``stable_id(page_url, image_url, None)`` for one without (which *fetch* keeps). ``source`` is
``PATH@OFFSET#imgN``: the page record's byte offset in the WARC file and the ``<img>``'s position on the page.

Accounting: ``extract/records`` counts every ``<img>`` found (a pair or a dead letter), the stage's input as
``read/records`` is read's. A WARC file that ends inside a record (``TruncatedWarcError``) keeps the pages read
before the cut and becomes one ``truncated_file`` row (file-level, ``n_images`` 0), as a cut ``.jsonl.gz`` does
in *read*; one cut exactly between two records (gzip members) cannot be told from a whole file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import apache_beam as beam
from warcio.exceptions import ArchiveLoadFailed

from schemas.ids import content_id, stable_id
from schemas.records import InputRecord
from transforms.common import INTERNAL_ERROR, REJECTS, Progress, Reason, StageOutput, count, internal_error, reject
from transforms.read import TRUNCATED_FILE, InputFormatError
from transforms.settings import ExtractConfig
from transforms.web import html as web_html
from transforms.web.fetcher import OPTED_OUT, x_robots_opt_out
from transforms.web.warc import HTML, IMAGE, TruncatedWarcError, iter_responses

LOG = logging.getLogger(__name__)

STAGE = "extract"

REASONS = tuple(Reason(code) for code in (
    web_html.NAVIGATION_IMAGE, web_html.INLINE_DATA_URI, web_html.TRACKING_PIXEL, web_html.INVALID_IMAGE_URL,
    web_html.REPEATED_IMAGE_URL, OPTED_OUT, INTERNAL_ERROR, TRUNCATED_FILE))
"""Reject reasons (docs/reasons.md). ``truncated_file`` is a file-level row, as read's: a WARC file cut short."""


class CapturedImage(NamedTuple):
    """An image response found in a WARC file."""

    url: str
    body: bytes
    content_id: str
    x_robots_tag: tuple[str, ...]
    source: str


def join_key(url: str) -> str:
    """The URL as the join compares it: no fragment, scheme and host lower case, no default port."""
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return url
    scheme = parts.scheme.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None or (scheme, port) in (("http", 80), ("https", 443)) else f"{host}:{port}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def page_pairs(page_url: str, body: bytes, content_type: str | None, x_robots_tag: tuple[str, ...], source: str,
               config: ExtractConfig) -> Iterator[InputRecord | tuple[str, str, str | None, int]]:
    """The pairs of one captured HTML page (byte-less ``InputRecord`` s) and its skipped images as
    ``(reason, detail, image_url, index)`` tuples; a plain function, the DoFn turns tuples into dead letters."""
    page = web_html.extract_images(body, page_url, content_type=content_type, window=config.nearby_chars,
                                   pixel_hosts=config.pixel_hosts, skip_regions=config.skip_regions,
                                   opt_out_directives=config.page_opt_out_directives,
                                   robots_token=config.robots_token)
    opt_out = page.opt_out
    where = "<meta name=robots>"
    if opt_out is None:
        opt_out = x_robots_opt_out(x_robots_tag, config.robots_token, config.page_opt_out_directives)
        where = "the page's X-Robots-Tag"
    for image in page.images:
        index = image.index
        if opt_out is not None:
            yield (OPTED_OUT, f"page opts out of AI use: {opt_out} in {where}", image.image_url, index)
            continue
        text = image.alt or image.title or (image.nearby_text if config.text_fallback else None)
        yield InputRecord(record_id=stable_id(page_url, image.image_url, None), source=f"{source}#img{index}",
                          page_url=page_url, image_url=image.image_url, text=text, image=None)
    for skipped in page.skipped:
        yield (skipped.reason, skipped.detail, skipped.image_url, skipped.index)


class ReadWarcFn(beam.DoFn):
    """One WARC file -> ``(join key, InputRecord)`` pairs (main), ``(join key, CapturedImage)`` (``images``) and
    dead letters (``rejects``)."""

    IMAGES = "images"

    def __init__(self, config: ExtractConfig) -> None:
        self._config = config

    def setup(self) -> None:
        self._progress = Progress(STAGE, "pages")

    def process(self, path: str) -> Iterator[Any]:
        config = self._config
        max_bytes = max(config.max_page_bytes, config.max_image_bytes)
        pages = 0
        try:
            for response in iter_responses(path, max_bytes):
                source = f"{path}@{response.offset}"
                if response.kind == IMAGE:
                    if response.body is None or len(response.body) > config.max_image_bytes:
                        count(STAGE, "images_too_large")
                    elif response.status is not None and not 200 <= response.status < 300:
                        count(STAGE, "images_not_ok")
                    else:
                        count(STAGE, "images_captured")
                        yield beam.pvalue.TaggedOutput(self.IMAGES, (join_key(response.url), CapturedImage(
                            response.url, response.body, content_id(response.body), response.x_robots_tag, source)))
                    continue
                if response.kind != HTML:
                    count(STAGE, "other_records")
                    continue
                if response.status is not None and not 200 <= response.status < 300:
                    count(STAGE, "pages_not_ok")
                    continue
                if response.body is None or len(response.body) > config.max_page_bytes:
                    count(STAGE, "pages_too_large")
                    continue
                pages += 1
                count(STAGE, "pages")
                self._progress.add()
                yield from self._page(response.url, response.body, response.content_type, response.x_robots_tag,
                                      source)
        except TruncatedWarcError as error:
            # As read does for a cut .jsonl.gz or tar: what was read goes on, and one file-level row says the rest
            # is missing (the launcher fails the run unless read.allow_truncated).
            LOG.error("extract: %s: %s (%s pages read from it)", path, error, f"{pages:,}")
            count(STAGE, "truncated_files")
            yield reject(STAGE, TRUNCATED_FILE, f"{path}: the WARC file ends early: {error}; {pages} pages were read "
                         "from it, the rest of the file is missing", id=stable_id("truncated", path), source=path,
                         n_images=0)
        except ArchiveLoadFailed as error:
            raise InputFormatError(f"{path}: not a readable WARC file ({error})") from error
        LOG.info("extract: %s pages from %s", f"{pages:,}", path)

    def _page(self, url: str, body: bytes, content_type: str | None, x_robots_tag: tuple[str, ...],
              source: str) -> Iterator[Any]:
        try:
            items = list(page_pairs(url, body, content_type, x_robots_tag, source, self._config))
        except Exception as error:  # noqa: BLE001 -- one bad page must not lose the rest of the file
            count(STAGE, "records")
            yield internal_error(STAGE, error, id=stable_id(STAGE, source), page_url=url, source=source)
            return
        # `extract/records` is this stage's input count, as `read/records` is read's: every <img> found, pair or
        # dead letter; each pair then ends as exactly one record or reject downstream.
        count(STAGE, "records", len(items))
        for item in items:
            if isinstance(item, InputRecord):
                count(STAGE, "pairs")
                yield join_key(item.image_url), item
            else:
                reason, detail, image_url, index = item
                yield reject(STAGE, reason, detail, id=stable_id(url, image_url, STAGE, index), page_url=url,
                             image_url=image_url, source=f"{source}#img{index}")


class JoinCapturesFn(beam.DoFn):
    """``(key, {pairs, images})`` -> the pairs, with the captured bytes when there are some."""

    def __init__(self, config: ExtractConfig) -> None:
        self._config = config

    def process(self, element: tuple[str, dict[str, Any]]) -> Iterator[Any]:
        _key, groups = element
        pairs = list(groups["pairs"])
        captures = list(groups["images"])
        if not pairs:
            count(STAGE, "images_unreferenced", len(captures))
            return
        if not captures:
            count(STAGE, "pairs_to_fetch", len(pairs))
            yield from pairs
            return
        capture = min(captures, key=lambda c: (c.content_id, c.source))
        opt_out = x_robots_opt_out(capture.x_robots_tag, self._config.robots_token,
                                   self._config.image_opt_out_directives)
        for pair in pairs:
            if opt_out is not None:
                yield reject(STAGE, OPTED_OUT, f"captured image response has X-Robots-Tag: {opt_out}", record=pair)
                continue
            count(STAGE, "pairs_with_bytes")
            yield dataclasses.replace(pair, image=capture.body,
                                      record_id=stable_id(pair.page_url, pair.image_url, capture.content_id))


class ExtractPages(beam.PTransform):
    """``PBegin`` -> ``InputRecord`` s of the pages in ``files`` (WARC paths)."""

    def __init__(self, files: list[str], config: ExtractConfig) -> None:
        super().__init__()
        self._files = sorted(files)
        self._config = config

    def expand(self, pbegin: beam.pvalue.PBegin) -> StageOutput:
        read = (
            pbegin
            | "ListWarcFiles" >> beam.Create(self._files)
            | "SpreadWarcFiles" >> beam.Reshuffle()
            | "ReadWarc" >> beam.ParDo(ReadWarcFn(self._config)).with_outputs(
                ReadWarcFn.IMAGES, REJECTS, main="pairs")
        )
        joined = (
            {"pairs": read.pairs, "images": read[ReadWarcFn.IMAGES]}
            | "JoinByImageUrl" >> beam.CoGroupByKey()
            | "AttachCaptures" >> beam.ParDo(JoinCapturesFn(self._config)).with_outputs(REJECTS, main="records")
        )
        rejects = (read[REJECTS], joined[REJECTS]) | "CollectExtractRejects" >> beam.Flatten()
        return StageOutput(joined.records, rejects)


def validate_warc(path: str) -> None:
    """Raise :class:`InputFormatError` unless ``path`` starts with a readable WARC record (reads one response).

    A WARC file cut short passes: the stage reports it as ``truncated_file`` when it reads it.
    """
    try:
        with contextlib.closing(iter_responses(path, 1)) as responses:
            next(responses, None)
    except TruncatedWarcError:
        return
    except (ArchiveLoadFailed, OSError, EOFError) as error:
        raise InputFormatError(f"{path}: not a readable WARC file ({error})") from error


__all__ = ["REASONS", "STAGE", "CapturedImage", "ExtractConfig", "ExtractPages", "join_key", "page_pairs",
           "validate_warc"]
