"""HTML image extraction (transforms/web/html.py) on realistic shop pages: exact pairs and skip reasons."""

from __future__ import annotations

import pytest

from transforms.web.html import (
    INLINE_DATA_URI,
    INVALID_IMAGE_URL,
    NAVIGATION_IMAGE,
    REPEATED_IMAGE_URL,
    TRACKING_PIXEL,
    ImageCandidate,
    SkippedImage,
    decode_html,
    extract_images,
    is_pixel_host,
    largest_candidate,
    parse_srcset,
)

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Red hiking backpack | Example Shop</title>
<base href="https://cdn.example-shop.com/media/">
<script>var tracking = "<img src='fake.jpg'>";</script><style>img { border: 0 }</style></head>
<body>
<header><a href="/"><img src="logo.png" alt="Example Shop"></a></header>
<nav><ul><li><a href="/bags">Bags</a><img src="/icons/bags.svg"></li></ul></nav>
<main>
<h1>Red hiking backpack</h1>
<p>Our best-selling backpack holds 30 litres.</p>
<img src="products/backpack-00.jpg" alt="  Red backpack,
   front view ">
<picture><source type="image/webp" srcset="products/backpack-01.webp 1600w">
<img srcset="products/backpack-01-480.jpg 480w, products/backpack-01-1080.jpg 1080w" src="products/backpack-01-480.jpg"
 alt="Backpack, side"></picture>
<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" data-src="/products/backpack-02.jpg" class="lazyload"
 title="The backpack on a mountain trail">
<p>Water-resistant fabric and padded straps.</p>
<img src="products/backpack-00.jpg#zoom" alt="again">
<img src="data:image/png;base64,iVBORw0KGgo=" alt="inline swatch">
<img src="https://www.facebook.com/tr?id=1&amp;ev=PageView" width="1" height="1" style="display:none">
<img src="https://stats.wp.com/g.gif?blog=1" alt="">
<img src="javascript:void(0)">
<img srcset="https://res.example-cdn.com/image/upload/w_400,h_300/backpack-03.jpg 1x,
 https://res.example-cdn.com/image/upload/w_800,h_600/backpack-03.jpg 2x">
</main>
<footer><img src="payment-badges.png" alt="We accept cards"></footer>
</body></html>"""

PAGE_URL = "https://shop.example.com/products/backpack?utm_source=mail"
CDN = "https://cdn.example-shop.com/media/"


def test_a_shop_page_gives_exact_pairs_and_skip_reasons() -> None:
    page = extract_images(PAGE.encode("utf-8"), PAGE_URL, content_type="text/html; charset=utf-8", window=60)
    assert page.base_url == CDN
    assert page.opt_out is None
    # 60 characters each side, no word cut: "Red" is 62 characters before the first photo
    nearby = "hiking backpack Our best-selling backpack holds 30 litres. Water-resistant fabric and padded straps."
    assert page.images == (
        ImageCandidate(CDN + "products/backpack-00.jpg", "Red backpack, front view", None, nearby, 2),
        # srcset and the <picture>'s <source>: the widest candidate
        ImageCandidate(CDN + "products/backpack-01.webp", "Backpack, side", None, nearby, 3),
        # lazy loading: data-src holds the real image, src a placeholder
        ImageCandidate("https://cdn.example-shop.com/products/backpack-02.jpg", None,
                       "The backpack on a mountain trail", nearby, 4),
        # commas inside a srcset URL (CDN resizers) and density descriptors: the 2x candidate
        ImageCandidate("https://res.example-cdn.com/image/upload/w_800,h_600/backpack-03.jpg", None, None,
                       "holds 30 litres. Water-resistant fabric and padded straps.", 10),
    )
    assert page.skipped == (
        SkippedImage(NAVIGATION_IMAGE, "inside <header>", CDN + "logo.png", 0),
        SkippedImage(NAVIGATION_IMAGE, "inside <nav>", "https://cdn.example-shop.com/icons/bags.svg", 1),
        SkippedImage(REPEATED_IMAGE_URL, "the page already has an <img> with this URL",
                     CDN + "products/backpack-00.jpg", 5),
        SkippedImage(INLINE_DATA_URI, "the image is a data: URI (no URL to fetch or cite)", None, 6),
        SkippedImage(TRACKING_PIXEL, "declared 1x1", "https://www.facebook.com/tr?id=1&ev=PageView", 7),
        SkippedImage(TRACKING_PIXEL, "known tracking host stats.wp.com", "https://stats.wp.com/g.gif?blog=1", 8),
        SkippedImage(INVALID_IMAGE_URL, "not an http(s) URL: 'javascript:void(0)'", None, 9),
        SkippedImage(NAVIGATION_IMAGE, "inside <footer>", CDN + "payment-badges.png", 11),
    )


def test_the_script_text_is_not_nearby_text_and_regions_are_configurable() -> None:
    page = extract_images(PAGE, PAGE_URL, skip_regions=("nav",))
    urls = [image.image_url for image in page.images]
    assert urls[0] == CDN + "logo.png" and CDN + "payment-badges.png" in urls
    assert all("tracking" not in (image.nearby_text or "") for image in page.images)


@pytest.mark.parametrize("meta, expected", [
    ('<meta name="robots" content="noindex, NoAI">', "noai"),
    ('<meta name="ROBOTS" content="noimageai">', "noimageai"),
    ('<meta name="icl-cluster-pipeline" content="noai">', "noai"),
    ('<meta name="otherbot" content="noai">', None),
    ('<meta name="robots" content="noindex, nofollow">', None),
])
def test_the_page_level_opt_out_is_found(meta: str, expected: str | None) -> None:
    html = f"<html><head>{meta}</head><body><img src='a.jpg'></body></html>"
    assert extract_images(html, "https://example.org/p").opt_out == expected


def test_relative_urls_resolve_against_the_page_without_base_and_charsets_are_honoured() -> None:
    body = "<html><body><p>Café crème</p><img src='../img/tasse.jpg' alt='Tasse à café'></body></html>"
    page = extract_images(body.encode("iso-8859-1"), "https://boutique.example.fr/produits/tasse.html",
                          content_type="text/html; charset=iso-8859-1")
    assert page.images == (ImageCandidate("https://boutique.example.fr/img/tasse.jpg", "Tasse à café", None,
                                          "Café crème", 0),)
    meta_charset = "<html><head><meta charset='windows-1252'></head><body>\x93quoted\x94</body></html>"
    assert "\u201cquoted\u201d" in decode_html(meta_charset.encode("latin-1"))


def test_srcset_parsing_follows_the_standard() -> None:
    assert parse_srcset("a.jpg 480w, b.jpg 1080w") == [("a.jpg", 480.0, "w"), ("b.jpg", 1080.0, "w")]
    assert parse_srcset("a.jpg, b.jpg 2x,c.jpg 1.5x") == [("a.jpg", 1.0, "x"), ("b.jpg", 2.0, "x"),
                                                          ("c.jpg", 1.5, "x")]
    assert parse_srcset("https://x.com/w_400,h_300/a.jpg 400w") == [("https://x.com/w_400,h_300/a.jpg", 400.0, "w")]
    assert parse_srcset("a.jpg 100q, b.jpg 10w 20h, c.jpg -2x") == [("b.jpg", 10.0, "w")]
    assert parse_srcset("") == [] and parse_srcset(" , ,") == []
    assert largest_candidate(parse_srcset("a.jpg 2x, b.jpg 300w, c.jpg 200w")) == "b.jpg"
    assert largest_candidate(parse_srcset("a.jpg, b.jpg 3x, c.jpg 3x")) == "b.jpg"
    assert largest_candidate([]) is None


def test_pixel_hosts_match_subdomains_and_path_prefixes() -> None:
    hosts = ("doubleclick.net", "facebook.com/tr")
    assert is_pixel_host("https://ad.doubleclick.net/x.gif", hosts)
    assert is_pixel_host("https://www.facebook.com/tr?id=1", hosts)
    assert not is_pixel_host("https://www.facebook.com/photo.jpg", hosts)
    assert not is_pixel_host("https://notdoubleclick.net/x.gif", hosts)
