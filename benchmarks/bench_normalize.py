#!/usr/bin/env python3
"""Throughput of the normalize stage against a plain Pillow loop, in the same run.

    python benchmarks/bench_normalize.py --output benchmarks/results/normalize.json

Two image sets, both from the bundled sample's real photos:

* ``sample``: the sample's decodable images as they are (288-1024 px JPEG, PNG, GIF, WebP);
* ``large``: the same photos enlarged to 4000x3000 and saved as JPEG q90 (a typical phone/DSLR
  upload, 12 megapixels), where decoding dominates.

Each set is written to a Parquet crawl file first, and both contenders read that file: the Beam
pipeline as a real run does (``ReadPairs`` -> ``Normalize`` on the DirectRunner, in-memory, one
worker, with records, dead-letter routing and counters), the plain loop with pyarrow, one row group at
a time, doing the obvious work per image (open, EXIF-transpose, convert to RGB, thumbnail, encode JPEG,
SHA-256, pHash). Images/s for both and their ratio go to the JSON output. (Feeding Beam with
``beam.Create`` instead would measure the pickling of every image into the pipeline graph, not the
stage.)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tempfile
import time

import apache_beam as beam
import imagehash
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image, ImageOps

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.common import header, write_results  # noqa: E402
from transforms.normalize import Normalize, NormalizeConfig  # noqa: E402
from transforms.read import InputFile, ReadConfig, ReadPairs  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample", "crawl.parquet")


def load_sets(repeat: int, n_large: int) -> dict[str, list[bytes]]:
    rows = pq.read_table(SAMPLE, columns=["image", "expected"]).to_pylist()
    photos = [r["image"] for r in rows if r["expected"] in ("kept", "gallery")]
    large = []
    for data in photos[:n_large]:
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((4000, 3000), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        large.append(buffer.getvalue())
    return {"sample": photos * repeat, "large": large}


def write_crawl(images: list[bytes], path: str) -> str:
    pq.write_table(pa.table({
        "page_url": ["https://shop.example.com/p"] * len(images),
        "image_url": [f"https://shop.example.com/{i}.jpg" for i in range(len(images))],
        "text": [None] * len(images),
        "image": pa.array(images, pa.binary()),
    }), path, row_group_size=64)
    return path


def plain_loop(path: str, config: NormalizeConfig) -> int:
    done = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=["image"]):
        for data in batch.column(0).to_pylist():
            image = Image.open(io.BytesIO(data))
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((config.max_side, config.max_side), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=config.quality)
            hashlib.sha256(buffer.getvalue()).hexdigest()
            str(imagehash.phash(image))
            done += 1
    return done


def beam_stage(path: str, config: NormalizeConfig) -> int:
    options = PipelineOptions(["--direct_running_mode", "in_memory", "--direct_num_workers", "1"])
    with beam.Pipeline(options=options) as p:
        records, _ = p | ReadPairs([InputFile(path, "parquet")], ReadConfig())
        normalized, _ = records | Normalize(config)
        normalized | "CountImages" >> beam.combiners.Count.Globally()
    counters = {c.key.metric.name: c.committed for c in p.result.metrics().query()["counters"]
                if c.key.metric.namespace == "normalize"}
    return counters.get("images", 0)


def measure(fn, path: str, config: NormalizeConfig, rounds: int) -> dict:
    best = float("inf")
    done = 0
    for _ in range(rounds):
        start = time.perf_counter()
        done = fn(path, config)
        best = min(best, time.perf_counter() - start)
    return {"images": done, "seconds": round(best, 3), "images_per_s": round(done / best, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="benchmarks/results/normalize.json")
    parser.add_argument("--repeat", type=int, default=10, help="copies of the sample set (default 10)")
    parser.add_argument("--large", type=int, default=40, help="number of 12-megapixel JPEGs (default 40)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best is kept (default 3)")
    args = parser.parse_args()

    config = NormalizeConfig()
    sets = load_sets(args.repeat, args.large)
    results = {**header("normalize"), "config": {"max_side": config.max_side, "quality": config.quality}, "sets": {}}
    workdir = tempfile.mkdtemp(prefix="bench_normalize_")
    for name, images in sets.items():
        path = write_crawl(images, os.path.join(workdir, f"{name}.parquet"))
        plain_loop(write_crawl(images[:5], os.path.join(workdir, "warmup.parquet")), config)  # imports, codecs
        plain = measure(plain_loop, path, config, args.rounds)
        stage = measure(beam_stage, path, config, args.rounds)
        assert stage["images"] == plain["images"] == len(images), (stage, plain)
        results["sets"][name] = {"plain_loop": plain, "beam_stage": stage,
                                 "ratio_beam_to_plain": round(stage["images_per_s"] / plain["images_per_s"], 3)}
        print(f"{name:7s} {len(images):4d} images  plain {plain['images_per_s']:7.1f}/s  "
              f"beam {stage['images_per_s']:7.1f}/s  ratio {results['sets'][name]['ratio_beam_to_plain']:.2f}")
    write_results(args.output, results)


if __name__ == "__main__":
    main()
