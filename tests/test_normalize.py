"""Stage *normalize*: page URL canonicalization and safe image normalization, on real files."""

from __future__ import annotations

import io

import apache_beam as beam
import imagehash
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from schemas.ids import content_id
from schemas.records import InputRecord
from transforms.normalize import (
    Normalize,
    NormalizeConfig,
    Rejected,
    canonicalize_page_url,
    normalize_image,
    url_host,
)

CONFIG = NormalizeConfig()


# --- page URLs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, canonical", [
    ("https://shop.example.com/products/teapot", "https://shop.example.com/products/teapot"),
    ("HTTPS://SHOP.EXAMPLE.COM:443/products/teapot?utm_source=newsletter&utm_medium=email",
     "https://shop.example.com/products/teapot"),
    ("https://shop.example.com/products/teapot#reviews", "https://shop.example.com/products/teapot"),
    ("https://shop.example.com/products/teapot?gclid=Cj0KCQjw", "https://shop.example.com/products/teapot"),
    ("http://example.com:80/p?b=2&a=1&UTM_Campaign=x&fbclid=IwAR", "http://example.com/p?a=1&b=2"),
    ("http://example.com:8080/p", "http://example.com:8080/p"),
    ("https://user:secret@example.com/p", "https://example.com/p"),
    ("https://möbel.example/produkt/vase", "https://xn--mbel-5qa.example/produkt/vase"),
    ("https://MÖBEL.example:443/produkt/vase#details", "https://xn--mbel-5qa.example/produkt/vase"),
    ("https://example.com/a/../b/./c", "https://example.com/b/c"),
    ("https://example.com/path%7Ename", "https://example.com/path~name"),
    ("https://example.com", "https://example.com/"),
    ("https://example.com/p?q=&a=1", "https://example.com/p?a=1&q="),
    ("http://192.0.2.7/p", "http://192.0.2.7/p"),
    ("http://[2001:db8::1]:80/p", "http://[2001:db8::1]/p"),
    ("  https://example.com/p  ", "https://example.com/p"),
])
def test_canonical_page_urls(url: str, canonical: str) -> None:
    assert canonicalize_page_url(url) == canonical


def test_url_variants_of_one_page_meet() -> None:
    variants = [
        "https://shop.example.com/products/view?id=7&lang=en",
        "https://Shop.Example.com/products/view?lang=en&id=7",
        "https://shop.example.com:443/products/view?utm_campaign=spring&lang=en&id=7&fbclid=IwAR0",
        "https://shop.example.com/products/view?lang=en&id=7#top",
    ]
    assert len({canonicalize_page_url(v) for v in variants}) == 1


@pytest.mark.parametrize("url, reason", [
    (None, "missing_page_url"),
    ("", "missing_page_url"),
    ("   ", "missing_page_url"),
    ("/products/teapot", "relative_page_url"),
    ("//shop.example.com/products/teapot", "relative_page_url"),
    ("shop.example.com/products/teapot", "relative_page_url"),
    ("ftp://shop.example.com/file", "unsupported_url_scheme"),
    ("javascript:void(0)", "unsupported_url_scheme"),
    ("data:text/html,hello", "unsupported_url_scheme"),
    ("mailto:shop@example.com", "unsupported_url_scheme"),
    ("https:///products/x", "malformed_page_url"),
    ("http://shop example.com/x", "malformed_page_url"),
    ("https://shop.example.com:99999/x", "malformed_page_url"),
    ("http://-shop-.example.com/", "malformed_page_url"),
    ("http://shop*.example.com/", "malformed_page_url"),
    ("http://exa%20mple.com/", "malformed_page_url"),
    ("http://example.com/p\nq", "malformed_page_url"),
])
def test_refused_page_urls(url: str | None, reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        canonicalize_page_url(url)
    assert caught.value.reason == reason


def test_tracking_params_are_configurable() -> None:
    url = "https://example.com/p?ref=home&id=3&utm_source=x"
    assert canonicalize_page_url(url) == "https://example.com/p?id=3&ref=home"
    assert canonicalize_page_url(url, ("utm_*", "ref")) == "https://example.com/p?id=3"


def test_domain_is_the_idna_host() -> None:
    assert url_host(canonicalize_page_url("https://MÖBEL.example/x")) == "xn--mbel-5qa.example"


# --- images -----------------------------------------------------------------------------------------

def _photo(product_photos: list[bytes], i: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(product_photos[i])).convert("RGB")


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_normalized_jpeg_is_rgb_hashed_and_stable(product_photos: list[bytes]) -> None:
    result = normalize_image(product_photos[0], CONFIG)
    image = _decode(result.image)
    assert image.format == "JPEG" and image.mode == "RGB"
    assert (result.width, result.height) == image.size == (288, 288)
    assert result.image_id == content_id(result.image)
    assert len(result.phash) == 16 and int(result.phash, 16) >= 0
    assert normalize_image(product_photos[0], CONFIG) == result  # deterministic


def test_large_jpeg_is_shrunk_to_max_side(product_photos: list[bytes]) -> None:
    big = _photo(product_photos).resize((2400, 1600), Image.Resampling.BICUBIC)
    result = normalize_image(_encode(big, "JPEG", quality=90), CONFIG)
    assert (result.width, result.height) == (768, 512)
    assert (result.source_width, result.source_height) == (2400, 1600)
    # Draft decoding and resizing keep the content: the hash stays near the directly resized image's.
    direct = big.resize((768, 512), Image.Resampling.LANCZOS)
    assert imagehash.phash(_decode(result.image).convert("RGB")) - imagehash.phash(direct) <= 4


def test_exif_orientation_is_applied(product_photos: list[bytes]) -> None:
    upright = _photo(product_photos).crop((0, 0, 288, 260))  # landscape 288x260
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; display needs 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # portrait 260x288 on disk
    result = normalize_image(_encode(stored, "JPEG", quality=95, exif=exif), CONFIG)
    assert (result.width, result.height) == (288, 260)
    assert imagehash.phash(_decode(result.image)) - imagehash.phash(upright) <= 4


def test_alpha_is_composited_over_white(product_photos: list[bytes]) -> None:
    rgba = _photo(product_photos).convert("RGBA")
    alpha = np.full((288, 288), 255, np.uint8)
    alpha[:40, :40] = 0
    rgba.putalpha(Image.fromarray(alpha))
    result = normalize_image(_encode(rgba, "PNG"), CONFIG.__class__(output_format="PNG"))
    pixels = np.asarray(_decode(result.image))
    assert (pixels[:40, :40] == 255).all()
    assert not (pixels[100:, 100:] == 255).all()


def test_sixteen_bit_png_is_scaled_not_clipped(product_photos: list[bytes]) -> None:
    gray = np.asarray(_photo(product_photos).convert("L"))
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I")
    result = normalize_image(_encode(sixteen, "PNG"), CONFIG.__class__(output_format="PNG"))
    pixels = np.asarray(_decode(result.image).convert("L")).astype(int)
    assert np.abs(pixels - gray.astype(int)).max() <= 1


@pytest.mark.parametrize("mode, fmt, kwargs", [
    ("CMYK", "JPEG", {}),
    ("P", "GIF", {}),
    ("P", "PNG", {"transparency": 0}),
    ("L", "PNG", {}),
    ("LA", "PNG", {}),
    ("RGB", "WEBP", {"quality": 90}),
    ("RGB", "BMP", {}),
    ("RGB", "TIFF", {}),
    ("1", "PNG", {}),
    ("F", "TIFF", {}),
])
def test_every_mode_becomes_8_bit_rgb(product_photos: list[bytes], mode: str, fmt: str, kwargs: dict) -> None:
    image = _photo(product_photos).convert(mode)
    result = normalize_image(_encode(image, fmt, **kwargs), CONFIG)
    out = _decode(result.image)
    assert out.mode == "RGB" and out.size == (288, 288)
    assert np.asarray(out).std() > 5  # not a blank image


def test_first_frame_of_an_animation(product_photos: list[bytes]) -> None:
    first, second = _photo(product_photos, 0), _photo(product_photos, 1)
    frames = [first.convert("P"), second.convert("P")]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    result = normalize_image(data, CONFIG)
    out = _decode(result.image)
    assert imagehash.phash(out) - imagehash.phash(first) < imagehash.phash(out) - imagehash.phash(second)


def test_every_image_reject_reason_from_a_real_file(sample_rows: list[dict]) -> None:
    """Each broken image of the bundled sample is refused with the reason it was planted for."""
    image_reasons = {"missing_image", "decode_error", "truncated_image", "unsupported_format",
                     "decompression_bomb", "too_small", "bad_aspect_ratio"}
    seen = set()
    for row in sample_rows:
        if row["expected"] in image_reasons:
            with pytest.raises(Rejected) as caught:
                normalize_image(row["image"] or b"", CONFIG)
            assert caught.value.reason == row["expected"], row["note"]
            seen.add(row["expected"])
    assert seen == image_reasons


def test_file_too_large(product_photos: list[bytes]) -> None:
    with pytest.raises(Rejected) as caught:
        normalize_image(product_photos[0], NormalizeConfig(max_bytes=1000))
    assert caught.value.reason == "file_too_large"


def test_bomb_is_refused_before_decoding(product_photos: list[bytes]) -> None:
    # Far over Pillow's own hard limit too: the header alone must decide, no pixel is decoded.
    bomb = _encode(Image.new("1", (20000, 20000)), "PNG", optimize=True)
    assert len(bomb) < 100_000
    with pytest.raises(Rejected) as caught:
        normalize_image(bomb, CONFIG)
    assert caught.value.reason == "decompression_bomb"
    # And our own, lower limit applies to an ordinary photo.
    with pytest.raises(Rejected) as caught:
        normalize_image(product_photos[0], NormalizeConfig(max_pixels=70_000))
    assert caught.value.reason == "decompression_bomb"


@pytest.mark.parametrize("size, reason", [((255, 400), "too_small"), ((256, 513), "bad_aspect_ratio")])
def test_size_bounds(product_photos: list[bytes], size: tuple[int, int], reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        normalize_image(_encode(_photo(product_photos).resize(size), "JPEG"), CONFIG)
    assert caught.value.reason == reason
    ok = (256, 256) if reason == "too_small" else (256, 512)
    assert normalize_image(_encode(_photo(product_photos).resize(ok), "JPEG"), CONFIG).width == ok[0]


def test_output_format_and_quality(product_photos: list[bytes]) -> None:
    webp = normalize_image(product_photos[0], NormalizeConfig(output_format="WEBP", quality=80))
    assert _decode(webp.image).format == "WEBP"
    low = normalize_image(product_photos[0], NormalizeConfig(quality=30))
    high = normalize_image(product_photos[0], NormalizeConfig(quality=95))
    assert len(low.image) < len(high.image)


@pytest.mark.parametrize("kwargs", [{"output_format": "GIF"}, {"quality": 0}, {"min_side": 800},
                                    {"max_aspect_ratio": 0.5}, {"max_pixels": 10}])
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        NormalizeConfig(**kwargs)


# --- the stage ----------------------------------------------------------------------------------------

def test_normalize_stage_routes_records_and_counts_reasons(product_photos: list[bytes]) -> None:
    good = InputRecord("r1", "s:1", "HTTPS://Shop.Example.com/p?utm_source=x", "u1", "alt", product_photos[0])
    bad_url = InputRecord("r2", "s:2", "/relative", "u2", None, product_photos[1])
    bad_image = InputRecord("r3", "s:3", "https://shop.example.com/p", "u3", None, b"<html>404</html>")
    with TestPipeline() as p:
        images, rejects = (p | beam.Create([good, bad_url, bad_image])
                           | Normalize(NormalizeConfig()))
        assert_that(images | "Ids" >> beam.Map(lambda im: (im.record_id, im.page_url, im.domain, im.text)),
                    equal_to([("r1", "https://shop.example.com/p", "shop.example.com", "alt")]), label="Images")
        assert_that(rejects | "Reasons" >> beam.Map(lambda r: (r.id, r.stage, r.reason, r.source)),
                    equal_to([("r2", "normalize", "relative_page_url", "s:2"),
                              ("r3", "normalize", "unsupported_format", "s:3")]), label="Rejects")
    counters = {c.key.metric.name: c.committed for c in p.result.metrics().query()["counters"]
                if c.key.metric.namespace == "normalize"}
    assert counters == {"images": 1, "relative_page_url": 1, "unsupported_format": 1}
