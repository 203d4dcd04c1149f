#!/usr/bin/env python3
"""Build the bundled sample crawl, ``sample/crawl.parquet``, from the DreamBench photos.

    python scripts/build_sample.py --dreambench ../shared/data/dreambench --output sample/

The sample is a small, fictional crawl of shop and blog pages on reserved example domains
(RFC 2606), made of the real DreamBench photos (CC BY 4.0 / Unsplash License; see
sample/ATTRIBUTION.md) with the noise a real crawl has:

* one product page per DreamBench subject on three shops, reached through URL variants (case, default
  port, tracking parameters, fragments, query order, an IDN host);
* the same product on a second shop (near-identical photos on a URL-unrelated page);
* a blog post showing four different products (a visually incoherent page);
* a gallery with more images than the per-page cap;
* a shop logo on every page of its shop and a badge on every page of every shop (boilerplate);
* exact duplicates (the same bytes under two image URLs, a lossless PNG of a JPEG) and near duplicates
  (a re-encoded smaller copy, a slightly cropped copy);
* valid images in awkward encodings (RGBA and palette PNG with transparency, CMYK JPEG, animated GIF,
  16-bit PNG, WebP, EXIF-rotated and progressive JPEG, a large JPEG);
* pages too small to be a cluster, and broken records of every kind the pipeline rejects.

Each row carries three extra columns (readers ignore extra columns): ``expected`` -- ``kept`` or the
reason code phase 1 (without models) must reject it with, or ``gallery`` for gallery images (kept
unless over the cap); ``expected_page`` -- the canonical page URL for rows with a valid page URL; and
``note`` -- what was planted. The output is deterministic for a given DreamBench copy and Pillow.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import shutil

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SIDE = 288          # product photos are stored at 288 px (above the 256 px minimum side)
QUALITY = 75

SHOP_A = "https://shop.example.com"
SHOP_B = "https://store.example.net"
SHOP_IDN = "https://möbel.example"
SHOP_IDN_ASCII = "https://" + "möbel".encode("idna").decode() + ".example"
BLOG = "https://blog.example.org"

# Subjects sold on the smaller shops; every other subject is on shop A.
SHOP_B_SUBJECTS = ("robot_toy", "rc_car", "monster_toy", "poop_emoji")
SHOP_IDN_SUBJECTS = ("vase", "candle")

ALT_TEXTS = (
    "{cls}",
    "IMG_{n:04d}.JPG",
    "Buy now! {cls} - FREE SHIPPING on orders over $50",
    "<b>{cls_title}</b> &amp; more | Example Shop",
    "🔥 SALE 🔥 {cls} -30% today only",
    "",
    None,
    "product photo of our best-selling {cls}",
    "{cls_title} (view {n})",
    "DSC_{n:05d}.jpeg",
)

SCHEMA = pa.schema([
    ("page_url", pa.string()),
    ("image_url", pa.string()),
    ("text", pa.string()),
    ("image", pa.binary()),
    ("expected", pa.string()),
    ("expected_page", pa.string()),
    ("note", pa.string()),
])


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        kwargs.setdefault("quality", QUALITY)
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def phash_distance(a: bytes, b: bytes) -> int:
    return int(imagehash.phash(decode(a)) - imagehash.phash(decode(b)))


class Sample:
    def __init__(self, dreambench: str) -> None:
        self.root = dreambench
        with open(os.path.join(dreambench, "subjects.csv"), newline="", encoding="utf-8") as f:
            self.subjects = {row["subject"]: row for row in csv.DictReader(f)}
        with open(os.path.join(dreambench, "images.csv"), newline="", encoding="utf-8") as f:
            self.files: dict[str, list[str]] = {}
            for row in csv.DictReader(f):
                self.files.setdefault(row["subject"], []).append(row["file"])
        self.rows: list[dict] = []
        self.rng = random.Random(20240501)
        self.alt_counter = 0

    # -- helpers -------------------------------------------------------------------------------------

    def photo(self, relative: str, side: int = SIDE) -> Image.Image:
        image = Image.open(os.path.join(self.root, relative)).convert("RGB")
        return image.resize((side, side), Image.Resampling.LANCZOS)

    def alt_text(self, subject: str) -> str | None:
        cls = self.subjects[subject]["class_name"]
        template = ALT_TEXTS[self.alt_counter % len(ALT_TEXTS)]
        self.alt_counter += 1
        if template is None:
            return None
        return template.format(cls=cls, cls_title=cls.title(), n=1000 + 37 * self.alt_counter)

    def add(self, page_url, image_url, text, image, expected, expected_page, note) -> None:
        self.rows.append({"page_url": page_url, "image_url": image_url, "text": text, "image": image,
                          "expected": expected, "expected_page": expected_page, "note": note})

    # -- pages ---------------------------------------------------------------------------------------

    def product_page(self, subject: str) -> str:
        if subject in SHOP_B_SUBJECTS:
            return f"{SHOP_B}/p/{subject.replace('_', '-')}"
        if subject in SHOP_IDN_SUBJECTS:
            return f"{SHOP_IDN_ASCII}/produkt/{subject}"
        if subject == "wolf_plushie":
            return f"{SHOP_A}/products/view?id={subject}&lang=en"
        return f"{SHOP_A}/products/{subject.replace('_', '-')}"

    def url_variants(self, subject: str, canonical: str) -> list[str]:
        """Crawled spellings of one page (all canonicalize to ``canonical``)."""
        if subject in SHOP_IDN_SUBJECTS:
            path = canonical.split(".example", 1)[1]
            return [canonical, f"https://MÖBEL.example{path}", f"https://möbel.example:443{path}#details"]
        if subject == "wolf_plushie":
            return [canonical, f"{SHOP_A}/products/view?lang=en&id={subject}",
                    f"{SHOP_A}/products/view?utm_campaign=spring&lang=en&id={subject}&fbclid=IwAR0xyz"]
        host, path = canonical.split("//", 1)[1].split("/", 1)
        return [
            canonical,
            f"HTTPS://{host.upper()}:443/{path}?utm_source=newsletter&utm_medium=email",
            f"https://{host}/{path}#reviews",
            f"https://{host}/{path}?gclid=Cj0KCQjw",
        ]

    def build(self) -> None:
        logo = self.logo()
        badge = self.badge()
        special = self.special_encodings()
        product_pages = {}
        for subject in sorted(self.files):
            canonical = self.product_page(subject)
            product_pages[subject] = canonical
            variants = self.url_variants(subject, canonical)
            for i, relative in enumerate(self.files[subject]):
                page_url = variants[i % len(variants)]
                image_url = f"{canonical.split('?')[0].rsplit('/', 1)[0]}/img/{subject}-{i:02d}.jpg"
                if relative in special:
                    data, note = special[relative]
                    image_url = image_url.rsplit(".", 1)[0] + "." + note.split()[0].lower()
                else:
                    data, note = encode(self.photo(relative)), "product photo"
                self.add(page_url, image_url, self.alt_text(subject), data, "kept", canonical,
                         f"{note}; DreamBench {relative}")
            if canonical.startswith(SHOP_A):
                self.add(variants[1], f"{SHOP_A}/static/logo.png", "Example Shop logo", logo, "boilerplate",
                         canonical, "shop A logo, on every shop A page")
            self.add(variants[0], "https://cdn.example.com/badges/free-shipping.jpg", "Free shipping badge",
                     badge, "boilerplate", canonical, "badge on every product page of every shop")
        self.duplicates(product_pages)
        self.second_shop_teapot()
        self.blog_post(product_pages)
        self.gallery()
        self.small_pages()
        self.broken_records(product_pages)

    def logo(self) -> bytes:
        image = Image.new("RGBA", (400, 280), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        draw.rounded_rectangle((10, 10, 390, 270), radius=40, fill=(32, 96, 160, 255))
        draw.ellipse((40, 60, 200, 220), fill=(250, 200, 40, 255))
        draw.polygon([(230, 220), (300, 60), (370, 220)], fill=(240, 240, 240, 255))
        draw.text((215, 235), "EXAMPLE SHOP", fill=(255, 255, 255, 255))
        return encode(image, "PNG")

    def badge(self) -> bytes:
        image = Image.new("RGB", (300, 300), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        draw.ellipse((20, 20, 280, 280), fill=(20, 140, 60))
        draw.rectangle((60, 120, 240, 180), fill=(255, 255, 255))
        draw.text((95, 140), "FREE SHIPPING", fill=(20, 140, 60))
        return encode(image, "JPEG", quality=75)

    def special_encodings(self) -> dict[str, tuple[bytes, str]]:
        """Valid product photos in awkward encodings; each must be kept."""
        out = {}
        rgba = self.photo("backpack/01.jpg").convert("RGBA")
        alpha = Image.new("L", rgba.size, 255)
        ImageDraw.Draw(alpha).ellipse((-40, -40, 60, 60), fill=0)  # a transparent corner
        rgba.putalpha(alpha)
        out["backpack/01.jpg"] = (encode(rgba, "PNG"), "png RGBA with transparency")
        out["berry_bowl/02.jpg"] = (encode(self.photo("berry_bowl/02.jpg").convert("CMYK"), "JPEG"), "jpg CMYK")
        frames = [self.photo("can/00.jpg").convert("P", palette=Image.Palette.ADAPTIVE),
                  self.photo("can/01.jpg").convert("P", palette=Image.Palette.ADAPTIVE)]
        out["can/00.jpg"] = (encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=500,
                                    loop=0), "gif animated, 2 frames")
        out["candle/01.jpg"] = (encode(self.photo("candle/01.jpg"), "WEBP", quality=80), "webp")
        gray16 = (np.asarray(self.photo("clock/00.jpg").convert("L")).astype(np.uint16) * 257)
        out["clock/00.jpg"] = (encode(Image.fromarray(gray16), "PNG"), "png 16-bit grayscale")
        upright = self.photo("colorful_sneaker/00.jpg").crop((0, 12, SIDE, SIDE - 12))
        exif = Image.Exif()
        exif[0x0112] = 6  # stored rotated: viewers must turn it 90 degrees clockwise
        out["colorful_sneaker/00.jpg"] = (encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif),
                                          "jpg EXIF orientation 6")
        palette = self.photo("duck_toy/00.jpg").convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
        out["duck_toy/00.jpg"] = (encode(palette, "PNG", transparency=0), "png palette with transparency")
        out["fancy_boot/00.jpg"] = (encode(self.photo("fancy_boot/00.jpg", side=1024), "JPEG", quality=60),
                                    "jpg large 1024 px")
        out["dog/00.jpg"] = (encode(self.photo("dog/00.jpg"), "JPEG", progressive=True), "jpg progressive")
        return out

    def duplicates(self, pages: dict[str, str]) -> None:
        """Exact and near duplicates on product pages (the originals are on the page already)."""
        original = encode(self.photo("teapot/00.jpg"))
        smaller = encode(self.photo("teapot/00.jpg", side=264), "JPEG", quality=55)
        assert phash_distance(original, smaller) <= 5, "near duplicate drifted too far"
        self.add(pages["teapot"], f"{SHOP_A}/products/img/teapot-00-small.jpg", "teapot", smaller,
                 "duplicate_near", pages["teapot"], "re-encoded smaller copy of teapot/00")

        full = self.photo("rc_car/02.jpg")
        cropped = full.crop((6, 6, SIDE - 6, SIDE - 6))
        cropped_bytes = encode(cropped)
        assert phash_distance(encode(full), cropped_bytes) <= 5, "cropped copy drifted too far"
        self.add(pages["rc_car"], f"{SHOP_B}/p/img/rc-car-02-crop.jpg", "rc car", cropped_bytes,
                 "duplicate_near", pages["rc_car"], "slightly cropped copy of rc_car/02")

        # The same bytes under a second image URL that sorts after the original's: the original stays.
        robot = encode(self.photo("robot_toy/02.jpg"))
        self.add(pages["robot_toy"], f"{SHOP_B}/p/img/zoom/robot-toy-02.jpg", "robot toy zoom", robot,
                 "duplicate_exact", pages["robot_toy"], "same bytes as robot_toy/02 under a zoom URL")

        # A lossless PNG of the JPEG's decoded pixels normalizes to the very same bytes.
        vase_jpeg = encode(self.photo("vase/01.jpg"))
        lossless = encode(decode(vase_jpeg), "PNG")
        self.add(pages["vase"], f"{SHOP_IDN_ASCII}/produkt/img/zz-vase-01.png", "vase", lossless,
                 "duplicate_exact", pages["vase"], "lossless PNG of the vase/01 JPEG")

    def second_shop_teapot(self) -> None:
        """The teapot sold on another site: near-identical photos on a URL-unrelated page."""
        page = f"{SHOP_B}/p/8812-ceramic-tea-pot"
        for i, relative in enumerate(self.files["teapot"]):
            data = encode(self.photo(relative, side=272), "JPEG", quality=70)
            self.add(page, f"{SHOP_B}/p/img/8812-{i}.jpg", self.alt_text("teapot"), data, "kept", page,
                     f"teapot on a second shop, re-encoded; DreamBench {relative}")
        self.add(page, "https://cdn.example.com/badges/free-shipping.jpg", "Free shipping badge", self.badge(),
                 "boilerplate", page, "badge on every product page of every shop")

    def blog_post(self, pages: dict[str, str]) -> None:
        """Four different products on one page: a group that is not one subject."""
        page = f"{BLOG}/2024/05/my-desk-setup"
        for relative in ("backpack/03.jpg", "clock/02.jpg", "dog2/01.jpg", "berry_bowl/04.jpg"):
            subject = relative.split("/")[0]
            data = encode(self.photo(relative))
            self.add(f"{page}?utm_source=rss", f"{BLOG}/wp-content/uploads/{subject}.jpg",
                     self.alt_text(subject), data, "kept", page,
                     f"blog post mixing products; same bytes as on the product page; DreamBench {relative}")

    def gallery(self) -> None:
        """A gallery with 34 images, two more than the default cap of 32 per page."""
        page = f"{BLOG}/gallery/all-products"
        pool = [f for subject in sorted(self.files) for f in self.files[subject]]
        for i, relative in enumerate(self.rng.sample(pool, 34)):
            image = self.photo(relative).transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((8, 8, SIDE - 8, SIDE - 8))
            self.add(page, f"{BLOG}/gallery/thumb-{i:02d}.jpg", None, encode(image, "JPEG", quality=70),
                     "gallery", page, f"mirrored crop of DreamBench {relative}")

    def small_pages(self) -> None:
        """Pages that end with fewer than 3 images."""
        page = f"{SHOP_B}/p/clearance-42"
        a = self.photo("bear_plushie/00.jpg").transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        b = self.photo("dog3/01.jpg").transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        self.add(page, f"{SHOP_B}/p/img/clearance-a.jpg", "clearance", encode(a), "cluster_too_small", page,
                 "page with two distinct images")
        self.add(page, f"{SHOP_B}/p/img/clearance-b.jpg", "clearance", encode(b), "cluster_too_small", page,
                 "page with two distinct images")
        self.add(page, f"{SHOP_B}/p/img/clearance-b2.jpg", "clearance", encode(b), "duplicate_exact", page,
                 "exact duplicate on the two-image page")
        about = f"{SHOP_A}/about"
        c = self.photo("cat2/00.jpg").transpose(Image.Transpose.ROTATE_180)
        self.add(about, f"{SHOP_A}/static/team.jpg", "our team", encode(c), "cluster_too_small", about,
                 "page with one image (and the logo)")
        self.add(about, f"{SHOP_A}/static/logo.png", "Example Shop logo", self.logo(), "boilerplate", about,
                 "shop A logo")

    def broken_records(self, pages: dict[str, str]) -> None:
        photo = encode(self.photo("shiny_sneaker/00.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        page = pages["shiny_sneaker"]

        def bad(page_url, data, reason, note, image_url=None, expected_page=None):
            self.add(page_url, image_url or f"{SHOP_A}/media/{reason}.bin", "broken", data, reason,
                     expected_page, note)

        bad(None, photo, "missing_page_url", "page_url is null")
        bad("   ", photo, "missing_page_url", "page_url is blank")
        bad("/products/shiny-sneaker", photo, "relative_page_url", "relative page URL")
        bad("ftp://shop.example.com/products/shiny-sneaker", photo, "unsupported_url_scheme", "ftp page URL")
        bad("javascript:void(0)", photo, "unsupported_url_scheme", "javascript: pseudo-URL")
        bad("http://shop example.com/products/x", photo, "malformed_page_url", "space in the host")
        bad("https://shop.example.com:99999/products/x", photo, "malformed_page_url", "port out of range")
        bad(page, None, "missing_image", "image is null", expected_page=page)
        bad(page, b"", "missing_image", "image is empty", expected_page=page)
        bad(page, b"Not Found\n", "decode_error", "text body instead of image bytes", expected_page=page)
        jpeg = encode(self.photo("shiny_sneaker/01.jpg"))
        bad(page, jpeg[: len(jpeg) * 2 // 5], "truncated_image", "JPEG cut at 40%", expected_page=page)
        svg = (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="400" '
               b'height="400"><rect width="400" height="400" fill="#c33"/></svg>\n')
        bad(page, svg, "unsupported_format", "SVG image", image_url=f"{SHOP_A}/media/icon.svg", expected_page=page)
        html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
        bad(page, html, "unsupported_format", "HTML error page served as image", expected_page=page)
        ico = encode(self.photo("shiny_sneaker/02.jpg", side=64), "ICO", sizes=[(64, 64)])
        bad(page, ico, "unsupported_format", "ICO icon (a format outside allowed_formats)", expected_page=page)
        bomb = encode(Image.new("1", (10000, 10000)), "PNG", optimize=True)
        bad(page, bomb, "decompression_bomb", "10000x10000 PNG of 12 KB", expected_page=page)
        thumb = encode(self.photo("shiny_sneaker/03.jpg", side=120))
        bad(page, thumb, "too_small", "120 px thumbnail", expected_page=page)
        banner = encode(self.photo("shiny_sneaker/03.jpg").resize((900, 300)), "JPEG", quality=60)
        bad(page, banner, "bad_aspect_ratio", "900x300 banner", expected_page=page)

    def write(self, output: str) -> None:
        os.makedirs(output, exist_ok=True)
        table = pa.Table.from_pylist(self.rows, schema=SCHEMA)
        pq.write_table(table, os.path.join(output, "crawl.parquet"), compression="zstd", row_group_size=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dreambench", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                             "data", "dreambench"))
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "..", "sample"))
    args = parser.parse_args()
    sample = Sample(args.dreambench)
    sample.build()
    sample.write(args.output)
    for name in ("ATTRIBUTION.md", "LICENSE.md", "references_and_licenses.txt"):
        shutil.copy(os.path.join(args.dreambench, name), os.path.join(args.output, f"dreambench-{name}"))
    expected = {}
    for row in sample.rows:
        expected[row["expected"]] = expected.get(row["expected"], 0) + 1
    size = os.path.getsize(os.path.join(args.output, "crawl.parquet"))
    print(f"wrote {len(sample.rows)} records ({size / 1e6:.2f} MB) to {args.output}/crawl.parquet: {expected}")


if __name__ == "__main__":
    main()
