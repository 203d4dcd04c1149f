"""Stage *normalize*: canonical page URLs and safely decoded, uniform images.

Two pure functions do the work and are tested on their own:

* :func:`canonicalize_page_url` -- lower-case scheme and host, IDN host to punycode, default port,
  credentials and fragment dropped, tracking parameters (``utm_*``, ``fbclid``, ``gclid``, ...)
  removed, the remaining query parameters sorted and percent-encoding normalized (w3lib, Scrapy's URL
  library, does the canonical form). Missing, relative, malformed and non-http(s) URLs are refused.
* :func:`normalize_image` -- opens with Pillow, refusing decompression bombs *before* any pixel is
  decoded (the header gives the size), truncated or non-image bytes and markup (SVG, HTML), too-small
  images and extreme aspect ratios; decodes; converts every mode to 8-bit RGB (alpha over white, CMYK,
  16-bit, palette, the first frame of an animation); shrinks to the configured longest side by area
  averaging; applies the EXIF orientation; refuses blank and single-colour images (``blank_image``);
  re-encodes; and hashes the result (SHA-256 content id, 64-bit perceptual hash).
* :func:`cap_text` -- the alt text, cut to ``max_text_chars`` (the record says when it was cut).

Decoding never holds more pixels than it must. YCbCr and greyscale JPEGs are decoded by OpenCV (the same
libjpeg-turbo pixels as Pillow's, faster), straight at 1/2, 1/4 or 1/8 scale when that still covers the
target size, so a 24-megapixel JPEG is never decoded whole. Other formats are decoded by Pillow once; a large
one is converted to RGB and reduced strip by strip, so a 9,400 x 9,400 PNG costs its one decoded copy and
no second full-size RGB copy. The blank check looks at the 32 x 32 luma thumbnail the perceptual hash is
computed from (noise and dithering average out there, a photo's contrast does not), before encoding.

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
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import apache_beam as beam
import cv2
import imagehash
import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError
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
BLANK_IMAGE = "blank_image"  # the same code and meaning as the target filter's (phase 3)

REASONS = tuple(Reason(code) for code in (
    MISSING_PAGE_URL, RELATIVE_PAGE_URL, UNSUPPORTED_URL_SCHEME, MALFORMED_PAGE_URL, MISSING_IMAGE, FILE_TOO_LARGE,
    DECODE_ERROR, TRUNCATED_IMAGE, UNSUPPORTED_FORMAT, DECOMPRESSION_BOMB, TOO_SMALL, BAD_ASPECT_RATIO, BLANK_IMAGE))


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


def _to_rgb(image: Image.Image, extrema: tuple[float, float] | None = None) -> Image.Image:
    """8-bit RGB from any Pillow mode; transparency is composited over white.

    The 32-bit modes (``I``, ``F``) are scaled by their value range: ``extrema`` gives the (min, max) of the
    whole image, so that a strip of it converts exactly as the whole image would.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = extrema if extrema is not None else (float(values.min()), float(values.max()))
        if mode == "F":
            values = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        elif mode.startswith("I;16") or high > 255:
            values = values / 257.0  # 0..65535 onto 0..255
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size of a ``width`` x ``height`` image shrunk to fit ``max_side`` x ``max_side``, never enlarged.

    The shorter side is rounded as Pillow's ``Image.thumbnail`` rounds it: to the neighbouring integer that
    keeps the aspect ratio closest.
    """
    if width <= max_side and height <= max_side:
        return width, height
    aspect = width / height

    def nearest(number: float, error: Callable[[int], float]) -> int:
        return max(min(math.floor(number), math.ceil(number), key=error), 1)

    if aspect <= 1:
        return nearest(max_side * aspect, lambda n: abs(aspect - n / max_side)), max_side
    return max_side, nearest(max_side / aspect, lambda n: abs(aspect - max_side / n) if n else 0)


# EXIF orientations 5-8 store the image with its axes swapped.
_SWAPS_AXES = frozenset((5, 6, 7, 8))


def _orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1-8, as ``ImageOps.exif_transpose`` reads it); 1 when it has none or
    its EXIF block is unreadable."""
    try:
        orientation = int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception as error:  # noqa: BLE001 -- a broken EXIF block must not lose a good image
        LOG.debug("ignoring unreadable EXIF orientation: %s", error)
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The upright view of ``pixels`` (H x W x 3) stored with EXIF ``orientation``: the transposition
    ``ImageOps.exif_transpose`` applies, done after shrinking, on the fewest pixels."""
    if orientation == 2:
        return cv2.flip(pixels, 1)
    if orientation == 3:
        return cv2.rotate(pixels, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(pixels, 0)
    if orientation == 5:
        return cv2.transpose(pixels)
    if orientation == 6:
        return cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.rotate(cv2.transpose(pixels), cv2.ROTATE_180)
    if orientation == 8:
        return cv2.rotate(pixels, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return pixels


def _jpeg_scale(width: int, height: int, target: tuple[int, int]) -> int:
    """The DCT scaling denominator (8, 4, 2 or 1) that decodes a JPEG straight to at least ``target``: the
    one Pillow's ``draft`` picks."""
    ratio = min(width // target[0], height // target[1])
    return next(scale for scale in (8, 4, 2, 1) if ratio >= scale)


_OPENCV_REDUCED = {1: 0, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
_JPEG_END = b"\xff\xd9"


def _decode_jpeg_opencv(data: bytes, width: int, height: int, target: tuple[int, int]) -> np.ndarray | None:
    """BGR pixels of a YCbCr or greyscale JPEG, decoded by OpenCV at Pillow's draft scale.

    Both libraries decode with libjpeg-turbo (integer IDCT, fancy upsampling): the pixels are Pillow's,
    decoded faster. ``None`` when OpenCV cannot decode the data, so that Pillow decides why. OpenCV fills a
    truncated JPEG with grey instead of failing, so a JPEG whose data does not end with the End Of Image
    marker is left to Pillow too (:func:`normalize_image` checks that).
    """
    scale = _jpeg_scale(width, height, target)
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION | _OPENCV_REDUCED[scale]
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as error:  # an assertion in the codec: Pillow will say what is wrong
        LOG.debug("OpenCV could not decode a JPEG: %s", error)
        return None
    if pixels is None or pixels.shape != (-(-height // scale), -(-width // scale), 3):
        return None
    return pixels


# A large image is converted to RGB and reduced this many pixels at a time (4 MB of Pillow's RGB).
_STRIP_PIXELS = 1 << 20


def _load(image: Image.Image) -> None:
    try:
        image.seek(0)  # first frame of an animation
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise _decode_failure(error) from error


def _rgb_reduced(image: Image.Image, target: tuple[int, int]) -> np.ndarray:
    """RGB pixels of a decoded image, reduced by the largest integer factor that keeps at least ``target``.

    A large image is converted and reduced in strips of rows, so that besides its one decoded copy only a
    strip and the reduced image are held (converting a 9,400 x 9,400 palette PNG whole would add 265 MB of
    RGB, and more for transparency). Reducing (a box average over whole pixels) strip by strip gives exactly
    the pixels of reducing the whole image.
    """
    width, height = image.size
    factor = max(1, min(width // target[0], height // target[1]))
    extrema = image.getextrema() if image.mode == "F" or image.mode.startswith("I") else None
    if factor == 1:
        return np.asarray(_to_rgb(image, extrema))
    reduced = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    rows = max(1, _STRIP_PIXELS // (width * factor)) * factor
    for top in range(0, height, rows):
        strip = _to_rgb(image.crop((0, top, width, min(height, top + rows))), extrema)
        reduced.paste(strip.reduce(factor), (0, top // factor))
    return np.asarray(reduced)


# The perceptual hash's first step: the luma shrunk to 32 x 32 (imagehash: hash_size 8 x highfreq_factor 4).
_THUMBNAIL = (32, 32)


def image_contrast(pixels: np.ndarray, thumbnail: np.ndarray, floor: float = 0.5) -> float:
    """Contrast of an 8-bit BGR image, 0 to 0.5, seen at thumbnail scale: the larger of the standard deviations
    of its 32 x 32 luma ``thumbnail`` and of its colour channels at 32 x 32, 0-255 values scaled to 0..1.

    Phase 3's contrast (the target filter's ``blank_image``) is the same standard deviation of the luma. At 32 x
    32 sensor and JPEG noise and dithering average out (under 0.002 even for noise of 16 levels), while a photo
    keeps nearly all of its contrast (the lowest in the bundled sample, 0.075 at full size, measures 0.070). The
    channels count so that two colours of equal luma (red on green) are not uniform; they are only measured
    when the luma is under ``floor`` (the larger value is all a threshold needs).
    """
    contrast = float(cv2.meanStdDev(thumbnail)[1].max()) / 255.0
    if contrast >= floor:
        return contrast
    colour = cv2.resize(pixels, _THUMBNAIL, interpolation=cv2.INTER_AREA)
    return max(contrast, float(cv2.meanStdDev(colour)[1].max()) / 255.0)


def _open(data: bytes, config: NormalizeConfig) -> Image.Image:
    """Open the image and check what its header tells (format, size, aspect ratio); no pixel is decoded."""
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
    return image


def normalize_image(data: bytes, config: NormalizeConfig) -> NormalizedImage:
    """Decode, validate, orient, convert, shrink, check, re-encode and hash one image (see module docstring)."""
    image = _open(data, config)
    source_format = image.format or "unknown"
    width, height = image.size
    jpeg = source_format in ("JPEG", "MPO")
    if not jpeg:
        _load(image)  # PNG and WebP may keep their EXIF block after the pixels
    orientation = _orientation(image)
    upright = (height, width) if orientation in _SWAPS_AXES else (width, height)
    size = fit_size(*upright, config.max_side)
    target = size[::-1] if orientation in _SWAPS_AXES else size  # in the stored orientation

    pixels = None
    if jpeg and image.mode in ("RGB", "L") and data.endswith(_JPEG_END):
        pixels = _decode_jpeg_opencv(data, width, height, target)
    if pixels is None:
        if jpeg:
            if target != (width, height):
                image.draft("RGB" if image.mode == "RGB" else None, target)
            _load(image)
        try:
            pixels = cv2.cvtColor(_rgb_reduced(image, target), cv2.COLOR_RGB2BGR)
        except (ValueError, OSError) as error:
            raise Rejected(UNSUPPORTED_FORMAT, f"cannot convert mode {image.mode} to RGB: {error}") from error
    if (pixels.shape[1], pixels.shape[0]) != target:
        # Area averaging, as img2dataset (and OpenCV's documentation) recommends for shrinking.
        pixels = cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)
    pixels = np.ascontiguousarray(_orient(pixels, orientation))  # BGR, OpenCV's order, from here on

    # OpenCV's luma has Pillow's weights (ITU-R BT.601); its rounding differs on about 1 pixel in 10^5. The
    # thumbnail is imagehash.phash's own first step, done here once for both the hash and the blank check.
    luma = Image.fromarray(cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY), "L")
    thumbnail = luma.resize(_THUMBNAIL, Image.Resampling.LANCZOS)
    if config.min_contrast is not None:
        contrast = image_contrast(pixels, np.asarray(thumbnail), floor=config.min_contrast)
        if contrast < config.min_contrast:
            raise Rejected(BLANK_IMAGE, f"contrast {contrast:.4f} < min_contrast {config.min_contrast}: "
                                        "blank or a single colour")
    height_out, width_out = pixels.shape[:2]
    return NormalizedImage(
        image=(encoded := _encode(pixels, config)),
        width=width_out,
        height=height_out,
        image_id=content_id(encoded),
        phash=str(imagehash.phash(thumbnail)),  # resizing 32 x 32 to 32 x 32 copies: the hash of the picture
        source_width=width,
        source_height=height,
        source_format=source_format,
    )


def _encode(pixels: np.ndarray, config: NormalizeConfig) -> bytes:
    """Encode BGR pixels. JPEG through OpenCV: libjpeg-turbo with Pillow's settings (4:2:0, baseline, the IJG
    tables at ``quality``), byte for byte the file Pillow writes; PNG and WebP through Pillow."""
    if config.output_format == "JPEG":
        ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, config.quality])
        if ok:
            return encoded.tobytes()
    picture = Image.fromarray(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), "RGB")
    buffer = io.BytesIO()
    if config.output_format == "PNG":
        picture.save(buffer, "PNG", compress_level=6)
    else:
        picture.save(buffer, config.output_format, quality=config.quality)
    return buffer.getvalue()


def cap_text(text: str | None, max_chars: int | None) -> tuple[str | None, bool]:
    """``text`` cut to at most ``max_chars`` characters, and whether it was cut.

    The cut falls on the last whitespace within the limit when one is in its last tenth (no half word), else
    at the limit; trailing whitespace goes. ``None`` as ``max_chars``: no cap.
    """
    if text is None or max_chars is None or len(text) <= max_chars:
        return text, False
    cut = text[:max_chars]
    space = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
    if space >= max_chars - max_chars // 10 and not text[max_chars].isspace():
        cut = cut[:space]
    return cut.rstrip(), True


# --- the stage ----------------------------------------------------------------------------------------


class NormalizeFn(beam.DoFn):
    """``InputRecord`` -> ``ImageRecord`` (main) or a dead letter (``rejects``)."""

    def __init__(self, config: NormalizeConfig) -> None:
        self._config = config

    def setup(self) -> None:
        # Pillow warns when it opens an image over its own pixel limit; we refuse those ourselves with
        # a reason code (max_pixels), so the warning would only be noise in worker logs.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        # Beam runs one bundle per thread and one worker per core: OpenCV's own thread pool would only
        # oversubscribe the cores (img2dataset sets one thread too).
        cv2.setNumThreads(1)
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
        text, text_truncated = cap_text(record.text, self._config.max_text_chars)
        if text_truncated:
            count(STAGE, "texts_truncated")
        yield ImageRecord(
            image_id=normalized.image_id,
            record_id=record.record_id,
            source=record.source,
            page_url=page_url,
            domain=url_host(page_url),
            image_url=record.image_url,
            text=text,
            image=normalized.image,
            width=normalized.width,
            height=normalized.height,
            phash=normalized.phash,
            source_width=normalized.source_width,
            source_height=normalized.source_height,
            source_format=normalized.source_format,
            text_truncated=text_truncated,
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
