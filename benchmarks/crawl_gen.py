#!/usr/bin/env python3
"""Synthetic crawls of any size, made of the bundled sample's real photos.

    python benchmarks/crawl_gen.py --records 10000 --hot-page 1000 --output /tmp/crawl10k

Pages of about ``images_per_page`` photos of one DreamBench subject, each photo a distinct variant of a
real one (random crop of 55-100% of the frame, a mirror half the time, a size of 288-448 px (``sides``), brightness and
colour jitter, JPEG q80-92), so that no two images are identical and a page's images show one subject.
One *hot* page (a gallery) holds ``hot_page`` photos of every subject. Alt texts name the subject with the
noise of a shop page; page URLs are unique per page.

The crawl is written as Parquet files of ``records_per_file`` rows (row groups of 64 rows), with the
columns the pipeline reads plus ``expected_page`` (the page each record was made for). The same
arguments always give the same bytes (seeded per record), so runs on the same crawl compare.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SAMPLE = os.path.join(REPO, "sample", "crawl.parquet")

SCHEMA = pa.schema([("page_url", pa.string()), ("image_url", pa.string()), ("text", pa.string()),
                    ("image", pa.binary()), ("expected_page", pa.string())])

_NOISE = ("", " - free shipping", " | Shop now", " IMG_{n}.JPG", " new arrival", " 20% off!", " photo {n}")


@dataclass(frozen=True)
class Spec:
    """One record to make: which page, which subject photo, and the seed of its variant."""

    page_url: str
    image_url: str
    subject: str
    photo: int
    seed: int


def subject_photos(sample: str = SAMPLE) -> dict[str, list[bytes]]:
    """The sample's decodable product photos by subject (its ``expected_page`` slug)."""
    table = pq.read_table(sample, columns=["image", "expected", "expected_page"]).to_pylist()
    photos: dict[str, list[bytes]] = {}
    for row in table:
        if row["expected"] not in ("kept", "gallery") or not row["expected_page"]:
            continue
        try:
            Image.open(io.BytesIO(row["image"])).verify()
        except Exception:  # noqa: BLE001 -- planted bad records: not sources
            continue
        slug = row["expected_page"].rstrip("/").rsplit("/", 1)[-1]
        photos.setdefault(slug, []).append(row["image"])
    return {k: v for k, v in sorted(photos.items()) if len(v) >= 2}


def plan(n_records: int, subjects: dict[str, list[bytes]], images_per_page: int, hot_page: int,
         seed: int) -> list[Spec]:
    """The records of the crawl, page by page (the hot page first)."""
    rng = random.Random(seed)
    names = sorted(subjects)
    specs: list[Spec] = []
    hot = min(hot_page, n_records)
    for i in range(hot):
        subject = names[i % len(names)]
        specs.append(Spec("https://gallery.example.org/all-products", f"https://cdn.example.org/g/{i}.jpg",
                          subject, rng.randrange(len(subjects[subject])), rng.getrandbits(32)))
    page = 0
    while len(specs) < n_records:
        subject = names[page % len(names)]
        n = min(images_per_page, n_records - len(specs))
        host = f"shop{page % 97}.example.com"
        for j in range(n):
            specs.append(Spec(f"https://{host}/products/{subject}-{page}", f"https://{host}/img/{page}-{j}.jpg",
                              subject, rng.randrange(len(subjects[subject])), rng.getrandbits(32)))
        page += 1
    return specs


def variant(photo: bytes, seed: int, sides: tuple[int, int] = (288, 448)) -> bytes:
    """A distinct JPEG variant of a real photo (see the module docstring), ``sides[0]``-``sides[1]`` px."""
    rng = random.Random(seed)
    image = Image.open(io.BytesIO(photo)).convert("RGB")
    w, h = image.size
    scale = rng.uniform(0.55, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
    image = image.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = rng.randrange(sides[0], sides[1] + 1)
    image = image.resize((side, side), Image.Resampling.BILINEAR)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=rng.randrange(80, 93))
    return out.getvalue()


_PHOTOS: dict[str, list[bytes]] = {}
_SIDES: list[tuple[int, int]] = []


def _init(photos: dict[str, list[bytes]], sides: tuple[int, int]) -> None:
    # Pool initializer: the worker process's copy of the source photos (not pickled once per record).
    _PHOTOS.update(photos)
    _SIDES.append(sides)


def _row(spec: Spec) -> dict[str, object]:
    rng = random.Random(spec.seed)
    noise = rng.choice(_NOISE).format(n=rng.randrange(1000, 9999))
    return {"page_url": spec.page_url, "image_url": spec.image_url,
            "text": f"{spec.subject.replace('_', ' ')}{noise}",
            "image": variant(_PHOTOS[spec.subject][spec.photo], spec.seed, _SIDES[0]), "expected_page": spec.page_url}


def _chunks(items: list[Spec], size: int) -> Iterator[list[Spec]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def build_crawl(output_dir: str, n_records: int, *, images_per_page: int = 10, hot_page: int = 1000,
                records_per_file: int = 2000, seed: int = 0, sides: tuple[int, int] = (288, 448),
                workers: int | None = None) -> list[str]:
    """Write the crawl to ``output_dir/part-NNNNN.parquet``; returns the files' paths."""
    photos = subject_photos()
    specs = plan(n_records, photos, images_per_page, hot_page, seed)
    # Pages spread over files (as a crawl's are), but deterministically.
    random.Random(seed + 1).shuffle(specs)
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count(), initializer=_init,
                             initargs=(photos, sides)) as pool:
        for index, chunk in enumerate(_chunks(specs, records_per_file)):
            path = os.path.join(output_dir, f"part-{index:05d}.parquet")
            rows = list(pool.map(_row, chunk, chunksize=64))
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, row_group_size=64)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--hot-page", type=int, default=1000, help="Images of the one gallery page.")
    parser.add_argument("--images-per-page", type=int, default=10)
    parser.add_argument("--records-per-file", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", type=int, nargs=2, default=(288, 448), metavar=("MIN", "MAX"),
                        help="Range of the images' side in pixels (larger: more bytes per record).")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    paths = build_crawl(args.output, args.records, images_per_page=args.images_per_page, hot_page=args.hot_page,
                        records_per_file=args.records_per_file, seed=args.seed,
                        sides=tuple(args.sides))
    print(f"{args.records} records in {len(paths)} file(s) under {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
