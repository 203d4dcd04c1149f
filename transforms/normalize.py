"""Stage *normalize*: canonical page URLs and safely decoded, uniform images.

Two pure functions do the work and are tested on their own:

* :func:`canonicalize_page_url` -- lower-case scheme and host, IDN host to punycode, default port,
  credentials and fragment dropped, tracking parameters (``utm_*``, ``fbclid``, ``gclid``, ...)
  removed, the remaining query parameters sorted and percent-encoding normalized (w3lib, Scrapy's URL
  library, does the canonical form). Missing, relative, malformed and non-http(s) URLs are refused.
* :func:`normalize_image` -- decodes with Pillow, refusing decompression bombs *before* any pixel is
  decoded (the header gives the size), truncated or non-image bytes and markup (SVG, HTML); applies the
  EXIF orientation; converts every mode to 8-bit RGB (alpha over white, CMYK, 16-bit, palette, the first
  frame of an animation); refuses too-small images and extreme aspect ratios; shrinks to the configured
  longest side (JPEG draft decoding first, so a 24-megapixel JPEG is decoded at 1/4 or 1/8 scale);
  re-encodes; and hashes the result (SHA-256 content id, 64-bit perceptual hash).

Each refusal raises :class:`Rejected` with its own reason code; the DoFn turns it into a dead letter.
"""

from __future__ import annotations

import fnmatch
import io
import ipaddress
import logging
import math
import re
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import apache_beam as beam
import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from w3lib.url import canonicalize_url, url_query_cleaner

from schemas.ids import content_id
from schemas.records import ImageRecord, InputRecord
from transforms.common import REJECTS, Progress, Reason, StageOutput, count, internal_error, reject
from transforms.settings import DEFAULT_TRACKING_PARAMS, NormalizeConfig

LOG = logging.getLogger(__name__)

STAGE = "normalize"

# Reason codes of this stage (documented in docs/reasons.md).
MISSING_PAGE_URL = "missing_page_url"
RELATIVE_PAGE_URL = "relative_page_url"
UNSUPPORTED_URL_SCHEME = "unsupported_url_scheme"
MALFORMED_PAGE_URL = "malformed_page_url"
MISSING_IMAGE = "missing_image"
FILE_TOO_LARGE = "file_too_large"
DECODE_ERROR = "decode_error"
TRUNCATED_IMAGE = "truncated_image"
UNSUPPORTED_FORMAT = "unsupported_format"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"

REASONS = tuple(Reason(code) for code in (
    MISSING_PAGE_URL, RELATIVE_PAGE_URL, UNSUPPORTED_URL_SCHEME, MALFORMED_PAGE_URL, MISSING_IMAGE, FILE_TOO_LARGE,
    DECODE_ERROR, TRUNCATED_IMAGE, UNSUPPORTED_FORMAT, DECOMPRESSION_BOMB, TOO_SMALL, BAD_ASPECT_RATIO))


class Rejected(Exception):
    """A record is refused; ``reason`` is the reason code, ``detail`` says what exactly was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- page URLs ------------------------------------------------------------------------------------

_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def _valid_host(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    host = host.rstrip(".")
    return 0 < len(host) <= 253 and all(_HOST_LABEL.match(label) for label in host.split("."))


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _strip_netloc(url: str) -> str:
    """Drop credentials and the scheme's default port from the network location."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = parts.port
    netloc = host if port is None or port == _DEFAULT_PORTS.get(parts.scheme) else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def canonicalize_page_url(url: str | None, tracking_params: tuple[str, ...] = DEFAULT_TRACKING_PARAMS) -> str:
    """The canonical form of a page URL, or :class:`Rejected` when it is not an absolute http(s) URL."""
    if url is None or not url.strip():
        raise Rejected(MISSING_PAGE_URL, "page URL is missing or blank")
    url = url.strip()
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise Rejected(MALFORMED_PAGE_URL, f"whitespace or control character in {url[:200]!r}")
    try:
        parts = urlsplit(url)
    except ValueError as error:
        raise Rejected(MALFORMED_PAGE_URL, f"{error}: {url[:200]!r}") from error
    if not parts.scheme or url.startswith("//"):
        raise Rejected(RELATIVE_PAGE_URL, f"not an absolute URL: {url[:200]!r}")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Rejected(UNSUPPORTED_URL_SCHEME, f"scheme {scheme!r} is not http(s): {url[:200]!r}")
    if not parts.netloc or not parts.hostname:
        raise Rejected(MALFORMED_PAGE_URL, f"no host in {url[:200]!r}")
    try:
        parts.port  # noqa: B018 -- raises ValueError on a bad port
        names = {name for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
        tracking = sorted(n for n in names if any(fnmatch.fnmatch(n.lower(), p.lower()) for p in tracking_params))
        if tracking:
            url = url_query_cleaner(url, tracking, remove=True, unique=False, keep_fragments=True)
        canonical = _strip_netloc(canonicalize_url(url, keep_blank_values=True, keep_fragments=False))
        host = urlsplit(canonical).hostname or ""
    except (ValueError, UnicodeError) as error:
        raise Rejected(MALFORMED_PAGE_URL, f"{type(error).__name__}: {error}: {url[:200]!r}") from error
    if not _valid_host(host):
        raise Rejected(MALFORMED_PAGE_URL, f"invalid host {host!r} in {url[:200]!r}")
    return canonical


def url_host(canonical_url: str) -> str:
    """The host of a canonical URL (lower case, IDNA-encoded): the cluster's ``domain``."""
    return (urlsplit(canonical_url).hostname or "").rstrip(".")


# --- images ---------------------------------------------------------------------------------------


class NormalizedImage(NamedTuple):
    """What :func:`normalize_image` makes of one encoded image."""

    image: bytes
    width: int
    height: int
    image_id: str
    phash: str
    source_width: int
    source_height: int
    source_format: str


_MARKUP_PREFIXES = (b"<?xml", b"<svg", b"<!doctype", b"<html", b"<head", b"<body", b"<!--")


def _markup_kind(data: bytes) -> str | None:
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if not head.startswith(_MARKUP_PREFIXES):
        return None
    return "SVG" if b"<svg" in head else "HTML" if b"<html" in head or b"<!doctype html" in head else "XML"


def _decode_failure(error: BaseException) -> Rejected:
    message = str(error)
    if "truncated" in message.lower() or isinstance(error, EOFError):
        return Rejected(TRUNCATED_IMAGE, f"{type(error).__name__}: {message}")
    return Rejected(DECODE_ERROR, f"{type(error).__name__}: {message}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode; transparency is composited over white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            low, high = float(values.min()), float(values.max())
            values = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        elif mode.startswith("I;16") or values.max() > 255:
            values = values / 257.0  # 0..65535 onto 0..255
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def normalize_image(data: bytes, config: NormalizeConfig) -> NormalizedImage:
    """Decode, validate, orient, convert, shrink, re-encode and hash one image (see module docstring)."""
    if not data:
        raise Rejected(MISSING_IMAGE, "image bytes are missing or empty")
    if len(data) > config.max_bytes:
        raise Rejected(FILE_TOO_LARGE, f"{len(data)} bytes > max_bytes {config.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise Rejected(DECOMPRESSION_BOMB, str(error)) from error
    except UnidentifiedImageError as error:
        markup = _markup_kind(data)
        if markup:
            raise Rejected(UNSUPPORTED_FORMAT, f"{markup} markup, not a raster image") from error
        raise Rejected(DECODE_ERROR, f"not a recognized image ({len(data)} bytes, starts {data[:8]!r})") from error
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise _decode_failure(error) from error

    source_format = image.format or "unknown"
    if source_format not in config.allowed_formats:
        raise Rejected(UNSUPPORTED_FORMAT, f"format {source_format} is not in allowed_formats")
    width, height = image.size
    if width * height > config.max_pixels:
        raise Rejected(DECOMPRESSION_BOMB,
                       f"{width}x{height} = {width * height} pixels > max_pixels {config.max_pixels}")
    if min(width, height) < config.min_side:
        raise Rejected(TOO_SMALL, f"{width}x{height}: shorter side < min_side {config.min_side}")
    aspect = max(width, height) / min(width, height)
    if aspect > config.max_aspect_ratio:
        raise Rejected(BAD_ASPECT_RATIO, f"{width}x{height}: aspect ratio {aspect:.2f} > {config.max_aspect_ratio}")

    scale = min(1.0, config.max_side / max(width, height))
    try:
        if scale < 1.0 and source_format in ("JPEG", "MPO"):
            # Decode straight at 1/2, 1/4 or 1/8 scale when that is still at least the target size.
            image.draft("RGB" if image.mode == "RGB" else None,
                        (math.ceil(width * scale), math.ceil(height * scale)))
        image.seek(0)  # first frame of an animation
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise _decode_failure(error) from error

    try:
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 -- a broken EXIF block must not lose a good image
        LOG.debug("ignoring unreadable EXIF orientation: %s", error)
    try:
        image = _to_rgb(image)
    except (ValueError, OSError) as error:
        raise Rejected(UNSUPPORTED_FORMAT, f"cannot convert mode {image.mode} to RGB: {error}") from error
    if max(image.size) > config.max_side:
        image.thumbnail((config.max_side, config.max_side), Image.Resampling.LANCZOS)

    buffer = io.BytesIO()
    if config.output_format == "PNG":
        image.save(buffer, "PNG", compress_level=6)
    else:
        image.save(buffer, config.output_format, quality=config.quality)
    encoded = buffer.getvalue()
    return NormalizedImage(
        image=encoded,
        width=image.width,
        height=image.height,
        image_id=content_id(encoded),
        phash=str(imagehash.phash(image)),
        source_width=width,
        source_height=height,
        source_format=source_format,
    )


# --- the stage ----------------------------------------------------------------------------------------


class NormalizeFn(beam.DoFn):
    """``InputRecord`` -> ``ImageRecord`` (main) or a dead letter (``rejects``)."""

    def __init__(self, config: NormalizeConfig) -> None:
        self._config = config

    def setup(self) -> None:
        # Pillow warns when it opens an image over its own pixel limit; we refuse those ourselves with
        # a reason code (max_pixels), so the warning would only be noise in worker logs.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        self._progress = Progress(STAGE, "images")

    def process(self, record: InputRecord) -> Iterator[Any]:
        self._progress.add()
        try:
            page_url = canonicalize_page_url(record.page_url, self._config.tracking_params)
            normalized = normalize_image(record.image or b"", self._config)
        except Rejected as rejected:
            yield reject(STAGE, rejected.reason, rejected.detail, record=record)
            return
        except Exception as error:  # noqa: BLE001 -- dead-letter, never crash the job on one record
            yield internal_error(STAGE, error, record=record)
            return
        count(STAGE, "images")
        yield ImageRecord(
            image_id=normalized.image_id,
            record_id=record.record_id,
            source=record.source,
            page_url=page_url,
            domain=url_host(page_url),
            image_url=record.image_url,
            text=record.text,
            image=normalized.image,
            width=normalized.width,
            height=normalized.height,
            phash=normalized.phash,
            source_width=normalized.source_width,
            source_height=normalized.source_height,
            source_format=normalized.source_format,
        )


class Normalize(beam.PTransform):
    """``InputRecord``s -> ``ImageRecord``s with canonical page URLs and normalized images."""

    def __init__(self, config: NormalizeConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, records: beam.PCollection) -> StageOutput:
        result = records | "NormalizeRecords" >> beam.ParDo(NormalizeFn(self._config)).with_outputs(
            REJECTS, main="images")
        return StageOutput(result.images, result[REJECTS])
