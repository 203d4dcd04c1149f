"""The images of an HTML page, found with a real HTML parser (selectolax's Lexbor engine, an HTML5 parser).

:func:`extract_images` walks the ``<body>`` once, in document order, and for every ``<img>``:

* picks the image URL: the largest ``srcset`` candidate (``srcset``, the lazy-loading ``data-srcset`` variants
  and the ``<source>`` siblings of a ``<picture>``), else the first lazy-loading source attribute (``data-src``,
  ``data-lazy-src``, ``data-original``, ... -- they hold the real image while ``src`` holds a placeholder), else
  ``src``; resolved against the page's base URL (``<base href>`` resolved against the page URL);
* records its ``alt``, its ``title`` and a window of the page text around it (the visible text before and after
  it, ``<script>``/``<style>`` left out);
* or skips it with a reason: :data:`INLINE_DATA_URI` (``data:`` sources only), :data:`TRACKING_PIXEL` (declared
  at most 1x1, or from a known pixel host), :data:`NAVIGATION_IMAGE` (inside ``<nav>``, ``<header>`` or
  ``<footer>``: logos, icons, banners), :data:`INVALID_IMAGE_URL` (no source, or not an http(s) URL once
  resolved) and :data:`REPEATED_IMAGE_URL` (the same URL again on the same page: one pair per page and URL).

The page-level opt-out ``<meta name="robots" content="noai">`` (and ``noimageai``, also under a
``<meta name="ROBOTNAME">`` naming our robots token) is reported in :attr:`PageImages.opt_out`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from selectolax.lexbor import LexborHTMLParser, LexborNode
from w3lib.encoding import html_to_unicode

# The defaults live with the extract stage's settings (config section ``extract``).
from transforms.settings import DEFAULT_PAGE_OPT_OUT_DIRECTIVES as DEFAULT_OPT_OUT_DIRECTIVES
from transforms.settings import DEFAULT_PIXEL_HOSTS, DEFAULT_SKIP_REGIONS

# Skip reasons (documented in docs/reasons.md, stage `extract`).
INLINE_DATA_URI = "inline_data_uri"
TRACKING_PIXEL = "tracking_pixel"
NAVIGATION_IMAGE = "navigation_image"
INVALID_IMAGE_URL = "invalid_image_url"
REPEATED_IMAGE_URL = "repeated_image_url"

# Lazy-loading libraries (lazysizes, lozad, jQuery lazyload, WordPress plugins, ...) put the real image here.
LAZY_SRC_ATTRIBUTES = ("data-src", "data-lazy-src", "data-original", "data-lazy", "data-url", "data-echo",
                       "data-hi-res-src", "data-original-src", "data-full-src")
SRCSET_ATTRIBUTES = ("srcset", "data-srcset", "data-lazy-srcset")

_SKIP_TEXT_PARENTS = frozenset(("script", "style", "noscript", "template", "textarea"))
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class ImageCandidate:
    """One ``<img>`` of a page that can become an image-text pair."""

    image_url: str
    """Absolute http(s) URL of the image (the largest ``srcset`` candidate where there is one)."""
    alt: str | None
    """The ``alt`` attribute, whitespace collapsed; ``None`` when missing or blank."""
    title: str | None
    nearby_text: str | None
    """Up to ``window`` characters of visible page text before the image, then as many after it."""
    index: int
    """Position of the ``<img>`` among the page's ``<img>`` tags."""


@dataclass(frozen=True)
class SkippedImage:
    """An ``<img>`` that is not a pair, with its reason code."""

    reason: str
    detail: str
    image_url: str | None
    """The resolved URL when there is one (``None`` for ``data:`` URIs and missing sources)."""
    index: int
    """Position of the ``<img>`` among the page's ``<img>`` tags (stable id for the reject)."""


@dataclass(frozen=True)
class PageImages:
    """What a page holds: the candidates, the skipped ``<img>`` tags and the page-level opt-out."""

    base_url: str
    images: tuple[ImageCandidate, ...]
    skipped: tuple[SkippedImage, ...]
    opt_out: str | None
    """The opt-out directive found in the page's robots ``<meta>`` (``"noai"``), or ``None``."""


# --- srcset --------------------------------------------------------------------------------------------


def parse_srcset(value: str) -> list[tuple[str, float, str]]:
    """Candidates of a ``srcset`` as ``(url, size, unit)``; unit ``w`` (width) or ``x`` (density, 1 by default).

    Follows the HTML standard's algorithm: a URL runs to the next whitespace (trailing commas end it, so URLs
    with commas inside, as CDN resizers write them, stay whole); descriptors run to the next comma outside
    parentheses; a candidate with an invalid descriptor is dropped.
    """
    candidates: list[tuple[str, float, str]] = []
    pos, n = 0, len(value)
    while pos < n:
        while pos < n and (value[pos].isspace() or value[pos] == ","):
            pos += 1
        if pos >= n:
            break
        start = pos
        while pos < n and not value[pos].isspace():
            pos += 1
        url = value[start:pos]
        descriptors = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            start, depth = pos, 0
            while pos < n:
                char = value[pos]
                if char == "(":
                    depth += 1
                elif char == ")":
                    depth = max(0, depth - 1)
                elif char == "," and depth == 0:
                    break
                pos += 1
            descriptors = value[start:pos].strip()
            pos += 1
        if not url:
            continue
        size, unit = 1.0, "x"
        valid = True
        for token in descriptors.split():
            number, suffix = token[:-1], token[-1:].lower()
            try:
                parsed = float(number)
            except ValueError:
                valid = False
                break
            if suffix == "w" and parsed > 0 and parsed.is_integer():
                size, unit = parsed, "w"
            elif suffix == "x" and parsed > 0:
                size, unit = parsed, "x"
            elif suffix != "h":  # a height descriptor only accompanies a width
                valid = False
                break
        if valid:
            candidates.append((url, size, unit))
    return candidates


def largest_candidate(candidates: Iterable[tuple[str, float, str]]) -> str | None:
    """The URL of the largest candidate: widest when any has a width descriptor, else the highest density;
    the first of equals."""
    candidates = list(candidates)
    if not candidates:
        return None
    widths = [c for c in candidates if c[2] == "w"]
    pool = widths or candidates
    best = pool[0]
    for candidate in pool[1:]:
        if candidate[1] > best[1]:
            best = candidate
    return best[0]


# --- helpers --------------------------------------------------------------------------------------------


def _clean(text: str | None) -> str | None:
    if text is None:
        return None
    text = _WHITESPACE.sub(" ", text).strip()
    return text or None


def _window(text: str, offset: int, window: int) -> str | None:
    """Up to ``window`` characters of ``text`` on each side of ``offset``, without words cut at the edges."""
    start, end = max(0, offset - window), min(len(text), offset + window)
    before, after = text[start:offset], text[offset:end]
    if start > 0 and not text[start - 1].isspace() and not before[:1].isspace():
        before = before.partition(" ")[2]
    if end < len(text) and not text[end].isspace() and not after[-1:].isspace():
        after = after.rpartition(" ")[0]
    return _clean(f"{before} {after}")


def _declared_pixels(value: str | None) -> float | None:
    if value is None:
        return None
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(px)?\s*$", value, re.IGNORECASE)
    return float(match.group(1)) if match else None


def _style_pixels(style: str | None, prop: str) -> float | None:
    if not style:
        return None
    match = re.search(rf"(?:^|;)\s*{prop}\s*:\s*(\d+(?:\.\d+)?)\s*px", style, re.IGNORECASE)
    return float(match.group(1)) if match else None


def is_pixel_host(url: str, pixel_hosts: Iterable[str]) -> bool:
    """Whether ``url`` is on one of ``pixel_hosts`` (a host matches its subdomains; ``host/path`` entries
    match that path prefix on that host)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    for entry in pixel_hosts:
        entry_host, _, entry_path = entry.lower().partition("/")
        if host == entry_host or host.endswith("." + entry_host):
            if not entry_path or parts.path.lstrip("/").startswith(entry_path):
                return True
    return False


def _in_region(node: LexborNode, regions: frozenset[str]) -> str | None:
    parent = node.parent
    while parent is not None:
        if parent.tag in regions:
            return parent.tag
        parent = parent.parent
    return None


def _resolve(base_url: str, value: str) -> str | None:
    value = value.strip()
    try:
        url = urljoin(base_url, value)
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts._replace(fragment="").geturl()


def _base_url(tree: LexborHTMLParser, page_url: str) -> str:
    base = tree.css_first("base[href]")
    if base is not None:
        href = (base.attributes.get("href") or "").strip()
        resolved = _resolve(page_url, href) if href else None
        if resolved:
            return resolved
    return page_url


def page_opt_out(tree: LexborHTMLParser, directives: Iterable[str], robots_token: str) -> str | None:
    """The first opt-out directive of the page's ``<meta name="robots">`` (or ``<meta name=TOKEN>``)."""
    wanted = {d.lower() for d in directives}
    names = {"robots", robots_token.lower()}
    for meta in tree.css("meta[name]"):
        name = (meta.attributes.get("name") or "").strip().lower()
        if name not in names:
            continue
        for directive in (meta.attributes.get("content") or "").split(","):
            directive = directive.strip().lower()
            if directive in wanted:
                return directive
    return None


def decode_html(body: bytes, content_type: str | None = None) -> str:
    """The page's text: the charset of the HTTP header, else of a BOM or ``<meta charset>``, else UTF-8
    (undecodable bytes replaced), as browsers do (w3lib's ``html_to_unicode``)."""
    return html_to_unicode(content_type, body)[1]


# --- extraction -----------------------------------------------------------------------------------------


def _image_source(node: LexborNode, base_url: str) -> tuple[str | None, str | None, str]:
    """(resolved URL, skip reason, detail) of one ``<img>``."""
    attributes = node.attributes
    srcsets = [attributes.get(name) for name in SRCSET_ATTRIBUTES]
    parent = node.parent
    if parent is not None and parent.tag == "picture":
        for source in parent.iter():
            if source.tag == "source":
                srcsets.extend(source.attributes.get(name) for name in SRCSET_ATTRIBUTES)
    saw_data_uri = False
    candidates = []
    for srcset in srcsets:
        for url, size, unit in parse_srcset(srcset or ""):
            if url.lower().startswith("data:"):
                saw_data_uri = True
                continue
            candidates.append((url, size, unit))
    chosen = largest_candidate(candidates)
    if chosen is None:
        for name in (*LAZY_SRC_ATTRIBUTES, "src"):
            value = (attributes.get(name) or "").strip()
            if not value:
                continue
            if value.lower().startswith("data:"):
                saw_data_uri = True
                continue
            chosen = value
            break
    if chosen is None:
        if saw_data_uri:
            return None, INLINE_DATA_URI, "the image is a data: URI (no URL to fetch or cite)"
        return None, INVALID_IMAGE_URL, "<img> without src, srcset or lazy-loading source"
    resolved = _resolve(base_url, chosen)
    if resolved is None:
        return None, INVALID_IMAGE_URL, f"not an http(s) URL: {chosen[:200]!r}"
    return resolved, None, ""


def extract_images(html: str | bytes, page_url: str, *, content_type: str | None = None, window: int = 200,
                   pixel_hosts: Iterable[str] = DEFAULT_PIXEL_HOSTS,
                   skip_regions: Iterable[str] = DEFAULT_SKIP_REGIONS,
                   opt_out_directives: Iterable[str] = DEFAULT_OPT_OUT_DIRECTIVES,
                   robots_token: str = "icl-cluster-pipeline") -> PageImages:
    """The images of one HTML page (see the module docstring).

    Args:
        html: the page, as text or as the response body (decoded with :func:`decode_html`).
        page_url: the URL the page was fetched from (the WARC record's target URI).
        content_type: the response's ``Content-Type`` header, for its charset.
        window: characters of nearby text kept on each side of an image.
    """
    if isinstance(html, bytes):
        html = decode_html(html, content_type)
    tree = LexborHTMLParser(html)
    base_url = _base_url(tree, page_url)
    opt_out = page_opt_out(tree, opt_out_directives, robots_token)
    regions = frozenset(r.lower() for r in skip_regions)
    pixel_hosts = tuple(pixel_hosts)

    # Visible text in document order, whitespace collapsed and text nodes joined by one space (block boundaries
    # carry no whitespace of their own); offsets of the images are positions in this text.
    chunks: list[str] = []
    length = 0
    found: list[tuple[int, int, LexborNode]] = []  # (img index, text offset, node)
    body = tree.body
    if body is not None:
        for node in body.traverse(include_text=True):
            if node.tag == "-text":
                parent = node.parent
                if parent is not None and parent.tag in _SKIP_TEXT_PARENTS:
                    continue
                text = _WHITESPACE.sub(" ", node.text_content or "").strip()
                if text:
                    if chunks:
                        text = " " + text
                    chunks.append(text)
                    length += len(text)
            elif node.tag == "img":
                found.append((len(found), length, node))
    text = "".join(chunks)

    images: list[ImageCandidate] = []
    skipped: list[SkippedImage] = []
    seen: set[str] = set()
    for index, offset, node in found:
        url, reason, detail = _image_source(node, base_url)
        attributes = node.attributes
        if reason is None:
            region = _in_region(node, regions)
            width = _declared_pixels(attributes.get("width"))
            height = _declared_pixels(attributes.get("height"))
            style = attributes.get("style")
            width = width if width is not None else _style_pixels(style, "width")
            height = height if height is not None else _style_pixels(style, "height")
            if region is not None:
                reason, detail = NAVIGATION_IMAGE, f"inside <{region}>"
            elif width is not None and height is not None and width <= 1 and height <= 1:
                reason, detail = TRACKING_PIXEL, f"declared {width:g}x{height:g}"
            elif is_pixel_host(url, pixel_hosts):
                reason, detail = TRACKING_PIXEL, f"known tracking host {urlsplit(url).hostname}"
            elif url in seen:
                reason, detail = REPEATED_IMAGE_URL, "the page already has an <img> with this URL"
        if reason is not None:
            skipped.append(SkippedImage(reason, detail, url, index))
            continue
        seen.add(url)
        nearby = _window(text, offset, window)
        images.append(ImageCandidate(url, _clean(attributes.get("alt")), _clean(attributes.get("title")), nearby,
                                     index))
    return PageImages(base_url, tuple(images), tuple(skipped), opt_out)


__all__ = [
    "DEFAULT_OPT_OUT_DIRECTIVES",
    "DEFAULT_PIXEL_HOSTS",
    "DEFAULT_SKIP_REGIONS",
    "INLINE_DATA_URI",
    "INVALID_IMAGE_URL",
    "NAVIGATION_IMAGE",
    "REPEATED_IMAGE_URL",
    "TRACKING_PIXEL",
    "ImageCandidate",
    "PageImages",
    "SkippedImage",
    "decode_html",
    "extract_images",
    "is_pixel_host",
    "largest_candidate",
    "parse_srcset",
]
