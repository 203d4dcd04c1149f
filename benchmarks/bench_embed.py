"""Benchmark: CLIP embedding throughput of the Beam stage against a plain loop, in the same run.

Both sides embed the same preprocessed images -- real photos of the bundled sample, run once through the
model's eval transform into a pool -- with the same model object settings:

* **plain loop**: batches of ``batch_size`` images stacked from the pool, ``model.encode_image`` and
  L2 normalization under ``torch.inference_mode`` (and autocast where the stage uses it);
* **Beam stage**: ``RunInference`` with :class:`transforms.models.clip.OpenClipImageHandler` on the in-memory
  DirectRunner, one element per cluster of ``images_per_element`` images (as the stage batches),
  ``BatchElements`` weighted by image count.

The Beam figure is the steady state: images after the first batch over the time from the first result to
the last (stamped into a Beam distribution), which leaves out the fixed cost of a pipeline (graph
construction, runner start-up, model load) -- it does not grow with the data -- and keeps every per-element
cost of the stage (element handling, batching, concatenation, RunInference's bookkeeping). The end-to-end
figure, start-up included, is written too. Each side runs ``--repeats`` times, interleaved; the best run of
each counts (the machine may be shared, and the best run is the least disturbed one, as with ``timeit``).

CPU (default): ``tiny-random`` and ``ViT-B-32`` with random weights (``pretrained=None``, so nothing is
downloaded). ``--device cuda``: ``ViT-L-14`` (random weights) in bf16, first sweeping batch sizes with the
plain loop to find the fastest, then the Beam stage at that batch size.

    python benchmarks/bench_embed.py --output benchmarks/results/embed.json
    python benchmarks/bench_embed.py --device cuda --output benchmarks/results/embed-gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import apache_beam as beam  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from benchmarks.common import header, write_results  # noqa: E402
from transforms.models.clip import (  # noqa: E402
    ImagePixels,
    decode_image,
    embed_inference,
    image_transform,
    load_image_encoder,
)
from transforms.normalize import NormalizeConfig, normalize_image  # noqa: E402
from transforms.settings import EmbedConfig  # noqa: E402

LOG = logging.getLogger("bench_embed")


def photo_pool(config: EmbedConfig, folder: str, limit: int = 0) -> str:
    """The sample's photos (the first ``limit``; 0: all) through normalize and the model's eval transform, saved
    as ``float32 [P, 3, H, W]``."""
    transform = image_transform(config)
    pixels = []
    for row in pq.read_table(REPO / "sample" / "crawl.parquet", columns=["image", "expected"]).to_pylist():
        if row["expected"] != "kept" or (limit and len(pixels) >= limit):
            continue
        pixels.append(transform(decode_image(normalize_image(row["image"], NormalizeConfig()).image)).numpy())
    path = os.path.join(folder, f"pool-{config.model}.npy")
    np.save(path, np.stack(pixels))
    return path


class PoolPixelsFn(beam.DoFn):
    """Element index -> ``ImagePixels`` of ``k`` consecutive pool images (a cluster's worth)."""

    def __init__(self, pool_path: str, k: int) -> None:
        self._path = pool_path
        self._k = k

    def setup(self) -> None:
        self._images = load_pool(self._path)

    def process(self, i: int):
        start = (i * self._k) % (len(self._images) - self._k)
        yield ImagePixels(i, tuple(self._images[start:start + self._k]))


def load_pool(path: str) -> list[torch.Tensor]:
    """The pool as one tensor per image, as the stage's preparation step leaves them."""
    pool = np.load(path)
    return [torch.from_numpy(pool[i].copy()) for i in range(len(pool))]


def stamp(result: Any) -> int:
    """Records when each result leaves RunInference, in wall-clock and process CPU time (Beam distributions:
    their min and max are the first and last output times), and passes on its image count."""
    beam.metrics.Metrics.distribution("bench", "done_us").update(time.time_ns() // 1000)
    beam.metrics.Metrics.distribution("bench", "done_cpu_us").update(time.process_time_ns() // 1000)
    return len(result.inference)


def beam_run(config: EmbedConfig, pool_path: str, n_images: int, k: int) -> tuple[float, float, float]:
    """``(steady-state images/s, images per CPU second, end-to-end seconds)`` of a pipeline embedding
    ``n_images`` pool images, ``k`` per element. Steady state: the images after the first batch over the time
    from the first output to the last, which leaves out runner start-up and model load and keeps every
    per-element cost of the stage. (The in-memory runner runs in this process: its CPU time is ours.)"""
    options = PipelineOptions(["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    started = time.perf_counter()
    p = beam.Pipeline(options=options)
    _ = (
        p
        | "Elements" >> beam.Create(range(n_images // k))
        | "Pixels" >> beam.ParDo(PoolPixelsFn(pool_path, k)).with_output_types(ImagePixels)
        | "Embed" >> embed_inference(config)
        | "Stamp" >> beam.Map(stamp)
        | "Total" >> beam.CombineGlobally(sum)
    )
    result = p.run()
    result.wait_until_finish()
    wall = time.perf_counter() - started
    stamps = {d.key.metric.name: d.committed for d in result.metrics().query()["distributions"]
              if d.key.metric.namespace == "bench"}
    images = n_images - config.batch_size
    wall_done, cpu_done = stamps["done_us"], stamps["done_cpu_us"]
    return (images / max((wall_done.max - wall_done.min) / 1e6, 1e-9),
            images / max((cpu_done.max - cpu_done.min) / 1e6, 1e-9), wall)


def plain_loop(config: EmbedConfig, pool_path: str, n_images: int, batch_size: int) -> tuple[float, float]:
    """``(seconds, CPU seconds)`` of ``model.encode_image`` over ``n_images`` pool images in batches of
    ``batch_size``."""
    import torch.nn.functional as F

    encoder = load_image_encoder(config)
    model, device, dtype = encoder.model, encoder.device, encoder.autocast_dtype
    per_image = load_pool(pool_path)

    def batch(j: int) -> torch.Tensor:
        return torch.stack([per_image[(j * batch_size + i) % len(per_image)] for i in range(batch_size)])

    def step(x: torch.Tensor) -> np.ndarray:
        autocast = torch.autocast(device_type=device, dtype=dtype) if dtype is not None else _null()
        with torch.inference_mode(), autocast:
            features = model.encode_image(x.to(device, non_blocking=True))
        return F.normalize(features.float(), dim=-1).cpu().numpy()

    step(batch(0))  # warm-up (kernel selection, allocator), as the Beam side's first batch also pays it
    n_batches = n_images // batch_size
    started, cpu_started = time.perf_counter(), time.process_time()
    for j in range(n_batches):
        step(batch(j))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, time.process_time() - cpu_started


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def bench_model(config: EmbedConfig, n_images: int, k: int, folder: str, repeats: int,
                pool_images: int = 0) -> dict[str, Any]:
    """Best of ``repeats`` interleaved runs of each side (the machine may be shared: the best run is the one
    least disturbed, as with ``timeit``)."""
    pool = photo_pool(config, folder, pool_images)
    n_images -= n_images % config.batch_size
    loop_rates, loop_cpu_rates, beam_rates, beam_cpu_rates, beam_walls = [], [], [], [], []
    for attempt in range(repeats):
        seconds, cpu_seconds = plain_loop(config, pool, n_images, config.batch_size)
        loop_rates.append(n_images / seconds)
        loop_cpu_rates.append(n_images / cpu_seconds)
        steady, per_cpu_second, wall = beam_run(config, pool, n_images, k)
        beam_rates.append(steady)
        beam_cpu_rates.append(per_cpu_second)
        beam_walls.append(wall)
        LOG.info("%s run %d: plain loop %.1f img/s (%.1f per CPU s), beam %.1f img/s (%.1f per CPU s, %.1f s end "
                 "to end)", config.model, attempt + 1, loop_rates[-1], loop_cpu_rates[-1], steady, per_cpu_second,
                 wall)
    loop_rate, beam_rate, beam_wall = max(loop_rates), max(beam_rates), min(beam_walls)
    loop_cpu_rate, beam_cpu_rate = max(loop_cpu_rates), max(beam_cpu_rates)
    return {
        "model": config.model,
        "pretrained": config.pretrained,
        "device": config.device,
        "precision": config.precision,
        "batch_size": config.batch_size,
        "images_per_element": k,
        "images": n_images,
        "repeats": repeats,
        "plain_loop_images_per_s": round(loop_rate, 1),
        "beam_images_per_s": round(beam_rate, 1),
        "ratio": round(beam_rate / loop_rate, 3),
        "plain_loop_images_per_cpu_s": round(loop_cpu_rate, 1),
        "beam_images_per_cpu_s": round(beam_cpu_rate, 1),
        "ratio_cpu": round(beam_cpu_rate / loop_cpu_rate, 3),
        "beam_end_to_end_images_per_s": round(n_images / beam_wall, 1),
        "ratio_end_to_end": round(n_images / beam_wall / loop_rate, 3),
        "all_runs": {"plain_loop_images_per_s": [round(r, 1) for r in loop_rates],
                     "beam_images_per_s": [round(r, 1) for r in beam_rates],
                     "plain_loop_images_per_cpu_s": [round(r, 1) for r in loop_cpu_rates],
                     "beam_images_per_cpu_s": [round(r, 1) for r in beam_cpu_rates],
                     "beam_end_to_end_s": [round(w, 2) for w in beam_walls]},
    }


def best_batch_size(config: EmbedConfig, pool: str, sizes: list[int], n_images: int) -> tuple[int, dict[int, float]]:
    rates = {}
    for size in sizes:
        try:
            n = max(size * 4, n_images - n_images % size)
            rates[size] = round(n / plain_loop(dataclasses.replace(config, batch_size=size), pool, n, size)[0], 1)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return max(rates, key=rates.get), rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "embed.json"))
    parser.add_argument("--images-per-element", type=int, default=4, help="Images per cluster element.")
    parser.add_argument("--tiny-images", type=int, default=8192)
    parser.add_argument("--vit-images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gpu-batch-sizes", default="32,64,128,256,512,1024")
    parser.add_argument("--sweep-images", type=int, default=4096, help="Images per batch size of the sweep.")
    parser.add_argument("--sweep", action="store_true",
                        help="Run the GPU variant (batch-size sweep, then the stage at the best size) on --device; "
                             "with --device cpu and --model tiny-random --precision fp32: a smoke test of that code.")
    parser.add_argument("--model", default="ViT-L-14", help="Model of the GPU variant.")
    parser.add_argument("--pool-images", type=int, default=0, help="GPU variant: photos in the pool (0: all).")
    parser.add_argument("--precision", default="bf16", help="Precision of the GPU variant.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)

    results = []
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as folder:
        if args.device == "cpu" and not args.sweep:
            for model, n in (("tiny-random", args.tiny_images), ("ViT-B-32", args.vit_images)):
                config = EmbedConfig(model=model, pretrained=None, device="cpu", precision="fp32",
                                     batch_size=args.batch_size)
                results.append(bench_model(config, n, args.images_per_element, folder, args.repeats))
        else:
            if args.device == "cuda" and not torch.cuda.is_available():
                parser.error("--device cuda: no CUDA device is visible")
            config = EmbedConfig(model=args.model, pretrained=None, device=args.device, precision=args.precision)
            pool = photo_pool(config, folder, args.pool_images)
            sizes = [int(s) for s in args.gpu_batch_sizes.split(",")]
            best, rates = best_batch_size(config, pool, sizes, args.sweep_images)
            extra["batch_size_sweep_images_per_s"] = rates
            results.append(bench_model(dataclasses.replace(config, batch_size=best), 16 * best,
                                       args.images_per_element, folder, args.repeats, args.pool_images))

    report = {
        **header("embed"),
        "what": "images/s of CLIP image embedding: Beam RunInference stage (steady state, and end to end) vs a "
                "plain loop over model.encode_image on the same preprocessed batches, same process",
        "versions": {"torch": torch.__version__, "apache_beam": beam.__version__, "python": platform.python_version()},
        "results": results,
        **extra,
    }
    if args.device == "cpu" and not torch.cuda.is_available():
        report["gpu"] = "no GPU in this environment; run with --device cuda for ViT-L-14 bf16 with the best batch size"
    write_results(args.output, report)
    for r in results:
        print(f"{r['model']:12} loop {r['plain_loop_images_per_s']:9.1f} img/s   beam {r['beam_images_per_s']:9.1f} "
              f"img/s   ratio {r['ratio']:.3f}   (per CPU second {r['ratio_cpu']:.3f}; end to end, with start-up: "
              f"{r['ratio_end_to_end']:.3f})")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
