"""Stage *normalize*: page URL canonicalization and safe image normalization, on real files."""

from __future__ import annotations

import io

import apache_beam as beam
import imagehash
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageEnhance, ImageOps

from schemas.ids import content_id
from schemas.records import InputRecord
from transforms.normalize import (
    Normalize,
    NormalizeConfig,
    NormalizeFn,
    Rejected,
    canonicalize_page_url,
    cap_text,
    fit_size,
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


# --- decoding paths: OpenCV for JPEG, Pillow for the rest; the same pictures ---------------------------

def _reference(data: bytes, max_side: int = 768) -> Image.Image:
    """What normalize did with Pillow alone: EXIF-transpose, RGB, Lanczos thumbnail."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


@pytest.mark.parametrize("size", [(1000, 750), (700, 1024), (2400, 1600), (6000, 4000)])
def test_jpeg_output_matches_a_pillow_only_normalization(product_photos: list[bytes], size) -> None:
    """Real photos, at the sizes crawls serve (and 24 MP, decoded at 1/4 scale): same size and picture as the
    Pillow-only path, up to resampling (area averaging instead of Lanczos)."""
    for photo in product_photos[:4]:
        data = _encode(_photo(product_photos, product_photos.index(photo)).resize(size, Image.Resampling.BICUBIC),
                       "JPEG", quality=90)
        result = normalize_image(data, CONFIG)
        reference = _reference(data)
        out = _decode(result.image)
        assert (result.width, result.height) == out.size == reference.size
        assert imagehash.phash(out) - imagehash.phash(reference) <= 2
        assert np.abs(np.asarray(out, dtype=int) - np.asarray(reference, dtype=int)).mean() < 2.5


def test_phash_is_imagehash_phash_of_the_stored_picture(product_photos: list[bytes]) -> None:
    """With a lossless output the stored picture is exactly what was hashed: the hash is imagehash's."""
    config = NormalizeConfig(output_format="PNG")
    for i in range(6):
        data = _encode(_photo(product_photos, i).resize((1000, 800), Image.Resampling.BICUBIC), "JPEG", quality=90)
        result = normalize_image(data, config)
        assert result.phash == str(imagehash.phash(_decode(result.image)))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt, size", [("JPEG", (360, 300)), ("JPEG", (2000, 1000)), ("PNG", (360, 300)),
                                       ("WEBP", (360, 300))])
def test_every_exif_orientation_as_pillow_applies_it(product_photos: list[bytes], orientation: int, fmt: str,
                                                     size: tuple[int, int]) -> None:
    stored = _photo(product_photos, 2).resize(size, Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(stored, fmt, exif=exif, **({"quality": 95} if fmt != "PNG" else {}))
    reference = _reference(data)
    result = normalize_image(data, CONFIG)
    assert (result.width, result.height) == reference.size
    assert imagehash.phash(_decode(result.image)) - imagehash.phash(reference) <= 2


def test_greyscale_jpeg_is_grey_rgb(product_photos: list[bytes]) -> None:
    grey = _photo(product_photos).convert("L").resize((900, 700))
    out = np.asarray(_decode(normalize_image(_encode(grey, "JPEG", quality=90), CONFIG).image), dtype=int)
    assert out.shape[2] == 3 and np.abs(out[..., 0] - out[..., 1]).max() <= 3  # chroma is JPEG noise only
    assert np.abs(out[..., 0] - np.asarray(_reference(_encode(grey, "JPEG", quality=90)).convert("L"), dtype=int)
                  ).mean() < 2


def test_jpeg_with_bytes_after_its_end_marker(product_photos: list[bytes]) -> None:
    """Some servers pad JPEGs; Pillow decodes them (OpenCV is not asked: the data does not end in EOI)."""
    padded = normalize_image(product_photos[0] + b"\x00" * 64, CONFIG)
    plain = normalize_image(product_photos[0], CONFIG)
    assert imagehash.hex_to_hash(padded.phash) - imagehash.hex_to_hash(plain.phash) <= 1


def test_truncated_jpeg_is_refused_not_filled_in(product_photos: list[bytes]) -> None:
    """OpenCV fills a cut JPEG with grey; the cut must still be refused, at any length."""
    data = _encode(_photo(product_photos).resize((900, 900)), "JPEG", quality=90)
    for cut in (0.3, 0.7, 0.99):
        with pytest.raises(Rejected) as caught:
            normalize_image(data[:int(len(data) * cut)], CONFIG)
        assert caught.value.reason == "truncated_image"


@pytest.mark.parametrize("size, max_side, expected", [((2400, 1600), 768, (768, 512)), ((1600, 2400), 768, (512, 768)),
                                                      ((1000, 333), 768, (768, 256)), ((333, 1000), 768, (256, 768)),
                                                      ((500, 400), 768, (500, 400)), ((1001, 999), 100, (100, 100))])
def test_fit_size_rounds_as_pillow_thumbnail(size, max_side, expected) -> None:
    assert fit_size(*size, max_side) == expected
    image = Image.new("L", size)
    image.thumbnail((max_side, max_side))
    assert image.size == expected


# --- low-information input -------------------------------------------------------------------------------

def _uniform(colour, size=(800, 600), noise: float = 0.0, seed: int = 0) -> Image.Image:
    pixels = np.zeros((size[1], size[0], 3)) + np.array(colour, dtype=float)
    if noise:
        pixels += np.random.default_rng(seed).normal(0, noise, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("name, image, fmt", [
    ("black", _uniform((0, 0, 0)), "PNG"),
    ("white", _uniform((255, 255, 255)), "JPEG"),
    ("one colour", _uniform((200, 30, 30)), "WEBP"),
    ("grey palette", _uniform((128, 128, 128)).convert("P"), "GIF"),
    ("black bilevel", _uniform((0, 0, 0)).convert("1"), "PNG"),
    ("transparent", Image.new("RGBA", (800, 600), (10, 200, 30, 0)), "PNG"),  # white once composited
    ("near uniform, sensor noise, JPEG q75", _uniform((120, 140, 160), noise=4), "JPEG"),
    ("near uniform, strong noise, JPEG q60", _uniform((90, 90, 90), size=(3000, 2000), noise=8), "JPEG"),
])
def test_blank_and_single_colour_images_are_refused(name: str, image: Image.Image, fmt: str) -> None:
    kwargs = {"quality": 75 if "q75" in name else 60} if fmt == "JPEG" else {}
    with pytest.raises(Rejected) as caught:
        normalize_image(_encode(image, fmt, **kwargs), CONFIG)
    assert caught.value.reason == "blank_image", name
    assert NormalizeConfig(min_contrast=None) and normalize_image(_encode(image, fmt, **kwargs),
                                                                 NormalizeConfig(min_contrast=None)).width > 0


def test_every_photo_the_sample_keeps_passes_the_blank_check(sample_rows: list[dict]) -> None:
    """All real photos of the bundled sample (DreamBench), the low-contrast ones included (a silver clock on
    a white ground measures 0.075, the lowest), are kept."""
    photos = [row["image"] for row in sample_rows if row["expected"] in ("kept", "gallery", "duplicate_exact",
                                                                           "duplicate_near", "cluster_too_small")]
    assert len(photos) > 200
    for data in photos:
        normalize_image(data, CONFIG)


def test_real_low_contrast_photos_are_kept(product_photos: list[bytes]) -> None:
    """The sample's photos with their contrast cut to a third (fog, haze, a white product on white) still
    pass, with room to spare; the same photo cut to 2% does not."""
    for i in range(len(product_photos)):
        faded = ImageEnhance.Contrast(_photo(product_photos, i)).enhance(0.33)
        normalize_image(_encode(faded, "JPEG", quality=90), CONFIG)
    flat = ImageEnhance.Contrast(_photo(product_photos, 0)).enhance(0.02)
    with pytest.raises(Rejected) as caught:
        normalize_image(_encode(flat, "JPEG", quality=90), CONFIG)
    assert caught.value.reason == "blank_image"


def test_two_colours_of_equal_luma_are_not_blank() -> None:
    pixels = np.zeros((600, 800, 3), np.uint8)
    pixels[:, :400] = (200, 0, 0)  # luma 59.8
    pixels[:, 400:] = (0, 102, 0)  # luma 59.9
    data = _encode(Image.fromarray(pixels), "PNG")
    assert normalize_image(data, CONFIG).width == 768


def test_a_large_black_png_is_refused() -> None:
    """A 4,000 x 3,000 black PNG (a few kB) goes through the strip reduction and is refused (peak memory of
    the 9,400 x 9,400 one: bench_normalize.py)."""
    data = _encode(Image.new("RGB", (4000, 3000)), "PNG")
    assert len(data) < 100_000
    with pytest.raises(Rejected) as caught:
        normalize_image(data, CONFIG)
    assert caught.value.reason == "blank_image"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16", "F"])
def test_strip_reduction_equals_whole_image_reduction(product_photos: list[bytes], mode: str) -> None:
    """Large images are converted and reduced in strips of rows; the pixels are those of the whole image
    converted and reduced at once."""
    photo = _photo(product_photos).resize((1900, 1500), Image.Resampling.BICUBIC)
    if mode == "RGBA":
        image = photo.convert("RGBA")
        alpha = np.asarray(image)[..., 3].copy()
        alpha[::7] = 0
        image.putalpha(Image.fromarray(alpha))
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 200)
    elif mode == "F":
        image = Image.fromarray(np.asarray(photo.convert("L")).astype(np.float32) * 0.01 - 1)
    else:
        image = photo.convert(mode)
    from transforms import normalize

    whole = np.asarray(normalize._to_rgb(image).reduce(4))
    old = normalize._STRIP_PIXELS
    try:
        normalize._STRIP_PIXELS = 1900 * 4 * 7  # strips of 28 rows: 54 of them, the last one short
        strips = normalize._rgb_reduced(image, (475, 375))
    finally:
        normalize._STRIP_PIXELS = old
    assert strips.shape == whole.shape == (375, 475, 3)
    assert np.array_equal(strips, whole)


# --- alt text -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, limit, expected, cut", [
    (None, 10, None, False),
    ("red teapot", 10, "red teapot", False),
    ("red teapot", None, "red teapot", False),
    ("a red ceramic teapot on a table", 20, "a red ceramic teapot", True),  # the next character is a space
    ("a red ceramic teapot on a table", 18, "a red ceramic teap", True),    # no space in the last tenth: hard cut
    ("a red ceramic teapot on a table", 14, "a red ceramic", True),         # back to the space in the last tenth
    ("x" * 95 + " " + "y" * 10, 100, "x" * 95, True),
    ("a red ceramic teapot", 20, "a red ceramic teapot", False),
])
def test_cap_text(text, limit, expected, cut) -> None:
    assert cap_text(text, limit) == (expected, cut)


def test_a_long_caption_is_cut_and_flagged(product_photos: list[bytes]) -> None:
    """A 5 MB alt text (a page's whole text stuffed into one attribute) is stored cut to max_text_chars."""
    words = "handmade ceramic teapot with a bamboo handle, glazed in deep red "
    huge = words * (5_000_000 // len(words))
    assert len(huge) > 4_900_000
    fn = NormalizeFn(NormalizeConfig())
    fn.setup()
    (image,) = fn.process(InputRecord("r1", "s:1", "https://shop.example.com/p", "u1", huge, product_photos[0]))
    assert image.text_truncated and 900 <= len(image.text) <= 1000 and huge.startswith(image.text)
    assert huge[len(image.text)] == " "  # cut between words
    (image,) = fn.process(InputRecord("r2", "s:2", "https://shop.example.com/p", "u2", "red teapot",
                                      product_photos[1]))
    assert (image.text, image.text_truncated) == ("red teapot", False)


def test_truncations_are_counted(product_photos: list[bytes]) -> None:
    records = [InputRecord(f"r{i}", f"s:{i}", "https://shop.example.com/p", f"u{i}", text, product_photos[i])
               for i, text in enumerate(["teapot " * 200, "red teapot", None])]
    with TestPipeline() as p:
        images, _ = p | beam.Create(records) | Normalize(NormalizeConfig(max_text_chars=100))
        assert_that(images | "Flags" >> beam.Map(lambda im: (im.record_id, im.text_truncated, len(im.text or ""))),
                    equal_to([("r0", True, 97), ("r1", False, 10), ("r2", False, 0)]))
    counters = {c.key.metric.name: c.committed for c in p.result.metrics().query()["counters"]
                if c.key.metric.namespace == "normalize"}
    assert counters == {"images": 3, "texts_truncated": 1}
