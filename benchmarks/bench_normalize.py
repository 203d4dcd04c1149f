#!/usr/bin/env python3
"""Throughput of the normalize stage against a plain Pillow loop and against img2dataset, and its peak
memory on a huge blank PNG, in the same run.

    make peers   # once: img2dataset in its own virtualenv, .venv-peers
    python benchmarks/bench_normalize.py --output benchmarks/results/normalize.json

Three image sets, all from the bundled sample's real photos:

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

* ``peer``: the sample's JPEG photos enlarged to 640-1024 px on the longest side (aspect ratios 1-1.5,
  landscape and portrait), JPEG q90, as crawls serve them. ``normalize_image`` (fit to 768 px, JPEG q90,
  SHA-256 and pHash) against img2dataset 1.47.0's own ``Resizer`` doing the same (OpenCV decode,
  ``INTER_AREA`` shrink to 768 px, JPEG q90, the same size and aspect bounds) plus the same two hashes.
  img2dataset runs in its own virtualenv (``--peer-python``, default ``.venv-peers/bin/python``; ``make
  peers`` creates it), so ``benchmarks/peer_img2dataset.py`` times it in a subprocess on the same Parquet
  file. Both run on one thread (OpenCV's pool set to 1, as img2dataset sets it), rounds interleaved so that
  both see the same machine load; the best round of each counts. The outputs are compared too: images
  kept by both, of the same size, and the pHash distance between the two decoded outputs of each image.

Memory: a 9,400 x 9,400 black PNG (just under the pixel limit; RGB, RGBA, greyscale and bilevel), each
normalized in a fresh process: the peak RSS (Linux ``VmHWM``, reset just before) over the RSS before, for
``normalize_image`` and for the Pillow-only whole-image path it replaced (decode, EXIF-transpose, convert
to RGB, thumbnail: the plain loop's work, with transparency over white).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import apache_beam as beam
import cv2
import imagehash
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image, ImageOps

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.common import header, write_results  # noqa: E402
from transforms.normalize import Normalize, NormalizeConfig, Rejected, normalize_image  # noqa: E402
from transforms.read import InputFile, ReadConfig, ReadPairs  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SAMPLE = os.path.join(REPO, "sample", "crawl.parquet")
PEER_SCRIPT = os.path.join(REPO, "benchmarks", "peer_img2dataset.py")


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def load_sets(repeat: int, n_large: int, n_peer: int) -> dict[str, list[bytes]]:
    rows = pq.read_table(SAMPLE, columns=["image", "expected"]).to_pylist()
    photos = [r["image"] for r in rows if r["expected"] in ("kept", "gallery")]
    large = [_jpeg(Image.open(io.BytesIO(data)).convert("RGB").resize((4000, 3000), Image.Resampling.BILINEAR))
             for data in photos[:n_large]]
    jpegs = [data for data in photos if Image.open(io.BytesIO(data)).format == "JPEG"]
    rng = random.Random(0)
    peer = []
    for i in range(n_peer):
        long = rng.randint(640, 1024)
        short = round(long / rng.uniform(1.0, 1.5))
        size = (long, short) if i % 2 else (short, long)
        peer.append(_jpeg(Image.open(io.BytesIO(jpegs[i % len(jpegs)])).resize(size, Image.Resampling.BICUBIC)))
    return {"sample": photos * repeat, "large": large, "peer": peer}


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


def normalize_loop(path: str, config: NormalizeConfig) -> list:
    """``normalize_image`` on every image of the file, as a plain loop: the result for each image kept."""
    kept = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=["image"]):
        for data in batch.column(0).to_pylist():
            try:
                kept.append(normalize_image(data, config))
            except Rejected:
                pass
    return kept


def peer_round(peer_python: str, path: str, config: NormalizeConfig) -> dict:
    """One timed round of img2dataset's resizer on ``path``, in the peers' virtualenv."""
    command = [peer_python, PEER_SCRIPT, path, "--rounds", "1", "--max-side", str(config.max_side),
               "--quality", str(config.quality), "--min-side", str(config.min_side),
               "--max-aspect-ratio", str(config.max_aspect_ratio), "--max-pixels", str(config.max_pixels)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_with_img2dataset(path: str, config: NormalizeConfig, rounds: int, peer_python: str) -> dict:
    """``normalize_image`` and img2dataset's resizer on the same file, rounds interleaved."""
    cv2.setNumThreads(1)  # img2dataset's Resizer sets the same
    normalize_loop(path, config)  # warm-up
    ours_best, peer_best, kept, peer = float("inf"), None, [], {}
    for _ in range(rounds):
        start = time.perf_counter()
        kept = normalize_loop(path, config)
        ours_best = min(ours_best, time.perf_counter() - start)
        peer = peer_round(peer_python, path, config)
        if peer_best is None or peer["seconds"] < peer_best["seconds"]:
            peer_best = peer
    ours = {"images": len(kept), "seconds": round(ours_best, 3), "images_per_s": round(len(kept) / ours_best, 1)}
    theirs = {"images": peer_best["images"], "seconds": peer_best["seconds"],
              "images_per_s": peer_best["images_per_s"],
              "resizer_share": round(peer_best["resizer_seconds"] / peer_best["seconds"], 3)}
    # normalize_image hashes its picture before encoding; img2dataset's output can only be hashed decoded.
    # Compare both: a few photos' hashes move by several bits under JPEG re-encoding alone.
    decoded = [str(imagehash.phash(Image.open(io.BytesIO(result.image)))) for result in kept]

    def distances(ours_hashes: list[str]) -> list[int]:
        return [(int(a, 16) ^ int(b, 16)).bit_count() for a, b in zip(ours_hashes, peer["phashes"], strict=True)]

    stored, same_decoding = distances([result.phash for result in kept]), distances(decoded)
    same_size = sum([r.width, r.height] == size for r, size in zip(kept, peer["sizes"], strict=True))
    return {"normalize_image": ours, "img2dataset": theirs,
            "ratio_normalize_to_img2dataset": round(ours["images_per_s"] / theirs["images_per_s"], 3),
            "outputs": {"kept_by_both": len(stored), "same_size": same_size,
                        "phash_distance_of_decoded_outputs": {"mean": round(sum(same_decoding) / len(kept), 3),
                                                              "max": max(same_decoding)},
                        "phash_distance_stored_to_peer": {"mean": round(sum(stored) / len(kept), 3),
                                                          "max": max(stored)}}}


MEMORY_CHILD = """
import io, json, sys, time, warnings
sys.path.insert(0, sys.argv[1])
warnings.simplefilter("ignore")
import hashlib, imagehash
from PIL import Image, ImageOps
from transforms.normalize import NormalizeConfig, Rejected, normalize_image, _to_rgb

def pillow_whole_image(data, config):
    image = Image.open(io.BytesIO(data))
    image.load()
    image = _to_rgb(ImageOps.exif_transpose(image))
    image.thumbnail((config.max_side, config.max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=config.quality)
    hashlib.sha256(buffer.getvalue()).hexdigest()
    return str(imagehash.phash(image))

def status_kb(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))

data = open(sys.argv[3], "rb").read()
config = NormalizeConfig()
rss = status_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # reset the peak (VmHWM) to the current RSS
start = time.perf_counter()
try:
    (normalize_image if sys.argv[2] == "normalize_image" else pillow_whole_image)(data, config)
    outcome = "kept"
except Rejected as rejected:
    outcome = rejected.reason
seconds = time.perf_counter() - start
print(json.dumps({"outcome": outcome, "peak_added_mb": round((status_kb("VmHWM") - rss) / 1024),
                  "seconds": round(seconds, 2)}))
"""


def memory_of_blank_pngs(workdir: str, side: int = 9400) -> dict:
    """Peak RSS that normalizing one huge black PNG adds, for ``normalize_image`` and the Pillow-only path."""
    results = {}
    for mode in ("RGB", "RGBA", "L", "1"):
        path = os.path.join(workdir, f"black_{mode}.png")
        image = Image.new(mode, (side, side))
        image.save(path)
        del image
        decoded_mb = round(side * side * (1 if mode in ("L", "1") else 4) / 2**20)  # Pillow keeps RGB in 4 bytes
        row = {"png_bytes": os.path.getsize(path), "one_decode_mb": decoded_mb}
        for contender in ("pillow_whole_image", "normalize_image"):
            done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, REPO, contender, path], capture_output=True,
                                  text=True, check=True, timeout=300)
            row[contender] = json.loads(done.stdout.strip().splitlines()[-1])
        results[f"{side}x{side} {mode}"] = row
        print(f"black {mode:4s} PNG {side}x{side}: one decode {decoded_mb} MB; peak added: Pillow whole image "
              f"{row['pillow_whole_image']['peak_added_mb']} MB ({row['pillow_whole_image']['outcome']}), "
              f"normalize_image {row['normalize_image']['peak_added_mb']} MB ({row['normalize_image']['outcome']})")
    return results


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
    parser.add_argument("--peer", type=int, default=200, help="640-1024 px JPEGs for img2dataset (default 200)")
    parser.add_argument("--peer-python", default=os.path.join(REPO, ".venv-peers", "bin", "python"),
                        help="Python of the virtualenv holding img2dataset (`make peers`)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best is kept (default 3)")
    parser.add_argument("--parts", default="sample,large,peer,memory",
                        help="comma-separated parts to run (default: sample,large,peer,memory)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    config = NormalizeConfig()
    sets = load_sets(args.repeat, args.large, args.peer)
    results = {**header("normalize"), "load_average_start": [round(x, 2) for x in os.getloadavg()],
               "config": {"max_side": config.max_side, "quality": config.quality}, "sets": {}}
    workdir = tempfile.mkdtemp(prefix="bench_normalize_")
    if os.path.exists(args.output):  # keep the figures of the parts not run this time
        previous = json.loads(open(args.output, encoding="utf-8").read())
        results["sets"] = {k: v for k, v in previous.get("sets", {}).items() if k not in parts}
        results.update({k: previous[k] for k in ("memory",) if k in previous and k not in parts})
        kept = sorted(results["sets"]) + [k for k in ("memory",) if k in results]
        if kept:  # say which figures are older than this run, and from when
            results["kept_from_previous_run"] = {"parts": kept, "created": previous.get(
                "kept_from_previous_run", {}).get("created", previous.get("created"))}
    for name, images in sets.items():
        if name not in parts:
            continue
        path = write_crawl(images, os.path.join(workdir, f"{name}.parquet"))
        if name == "peer":
            if not os.path.exists(args.peer_python):
                sys.exit(f"{args.peer_python} not found: run `make peers` (img2dataset in .venv-peers) or pass "
                         "--peer-python, or leave `peer` out of --parts")
            row = compare_with_img2dataset(path, config, args.rounds, args.peer_python)
            results["sets"][name] = row
            print(f"peer    {len(images):4d} images  normalize_image {row['normalize_image']['images_per_s']:7.1f}/s  "
                  f"img2dataset {row['img2dataset']['images_per_s']:7.1f}/s  "
                  f"ratio {row['ratio_normalize_to_img2dataset']:.2f}  "
                  f"same size {row['outputs']['same_size']}, mean pHash distance of the outputs "
                  f"{row['outputs']['phash_distance_of_decoded_outputs']['mean']}")
            continue
        plain_loop(write_crawl(images[:5], os.path.join(workdir, "warmup.parquet")), config)  # imports, codecs
        plain = measure(plain_loop, path, config, args.rounds)
        stage = measure(beam_stage, path, config, args.rounds)
        assert stage["images"] == plain["images"] == len(images), (stage, plain)
        results["sets"][name] = {"plain_loop": plain, "beam_stage": stage,
                                 "ratio_beam_to_plain": round(stage["images_per_s"] / plain["images_per_s"], 3)}
        print(f"{name:7s} {len(images):4d} images  plain {plain['images_per_s']:7.1f}/s  "
              f"beam {stage['images_per_s']:7.1f}/s  ratio {results['sets'][name]['ratio_beam_to_plain']:.2f}")
    if "memory" in parts:
        results["memory"] = memory_of_blank_pngs(workdir)
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(args.output, results)


if __name__ == "__main__":
    main()
