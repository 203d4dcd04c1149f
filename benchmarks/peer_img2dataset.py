#!/usr/bin/env python3
"""img2dataset's own resizer on a crawl file, timed: the peer side of ``bench_normalize.py``.

Runs in the peers' virtualenv (``make peers``: img2dataset 1.47.0 with its pinned OpenCV, plus Pillow and
ImageHash for the same two hashes as ours), not in the project's, so img2dataset and its dependencies never
enter the project's environment. It imports nothing from this repository.

    .venv-peers/bin/python benchmarks/peer_img2dataset.py crawl.parquet --rounds 3

Per image it does what ``normalize_image`` does: img2dataset's ``Resizer`` (OpenCV decode, shrink to the
longest side with ``INTER_AREA`` only when larger, the same size and aspect-ratio bounds, JPEG encode), then
the SHA-256 of the encoded bytes and the perceptual hash of the result. The resizer returns encoded bytes only,
so the perceptual hash decodes them first: that is what a user of img2dataset's output has to do. Prints one
JSON object: images resized, the best round's seconds, the resizer's share, and each image's perceptual hash
and size (to compare the outputs).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import time

import imagehash
import pyarrow.parquet as pq
from img2dataset.resizer import Resizer
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="Parquet file with an `image` binary column")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-side", type=int, default=768)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-aspect-ratio", type=float, default=2.0)
    parser.add_argument("--max-pixels", type=int, default=89_478_485)
    args = parser.parse_args()

    resizer = Resizer(image_size=args.max_side, resize_mode="keep_ratio_largest", resize_only_if_bigger=True,
                      encode_quality=args.quality, encode_format="jpg", min_image_size=args.min_side,
                      max_image_area=args.max_pixels, max_aspect_ratio=args.max_aspect_ratio)
    path = args.input

    def run() -> tuple[int, float, list[str], list[list[int]]]:
        done, resizing, phashes, sizes = 0, 0.0, [], []
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=["image"]):
            for data in batch.column(0).to_pylist():
                start = time.perf_counter()
                encoded, width, height, *_, error = resizer(io.BytesIO(data))
                resizing += time.perf_counter() - start
                if error is not None:
                    continue
                hashlib.sha256(encoded).hexdigest()
                phashes.append(str(imagehash.phash(Image.open(io.BytesIO(encoded)))))
                sizes.append([width, height])
                done += 1
        return done, resizing, phashes, sizes

    run()  # warm-up: imports, codecs, albumentations' first call
    best, resizer_seconds, done, phashes, sizes = float("inf"), 0.0, 0, [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        done, resizing, phashes, sizes = run()
        seconds = time.perf_counter() - start
        if seconds < best:
            best, resizer_seconds = seconds, resizing
    print(json.dumps({"images": done, "seconds": round(best, 3), "images_per_s": round(done / best, 1),
                      "resizer_seconds": round(resizer_seconds, 3), "phashes": phashes, "sizes": sizes}))


if __name__ == "__main__":
    main()
