"""Benchmark of per-cluster DreamBooth synthesis: where a cluster's time goes, and memory across clusters.

Default (CPU, the tiny-random model, real DreamBench clusters from the bundled sample):

* the model load (once per worker) and, per cluster, the time of each part -- load (decode and crop the
  photos), latents, prior, train, sample, cleanup -- in LoRA and in full mode;
* resident memory after each of several clusters, which must stay flat (the run fails otherwise), and
  the peak;
* two plain baselines in the same run: diffusers' DreamBooth-LoRA example loop as it runs
  (``train_dreambooth_lora.py``: photo transforms, VAE and text encoder at every step, one image per
  pipeline call; :mod:`benchmarks.plain_dreambooth`) on the same model, clusters, steps and renders,
  taking turns with ours one cluster at a time and four per UNet batch
  (``synth.speed.clusters_per_batch=4``): ``plain_diffusers_loop.ratio_plain_over_ours*``; and, for the
  training alone, the scripts' VAE pass at every step against latents encoded once per cluster.

The GPU figures (SD 1.5's size, bf16, every speed switch) come from ``benchmarks/gpu_check.sh``.

    python benchmarks/bench_synth.py --output benchmarks/results/synth.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import header, write_results  # noqa: E402

MIB = 2**20


def sample_clusters(n: int) -> list[Any]:
    """Phase 1 (demo profile) on the bundled sample; the first ``n`` clusters by id."""
    import pyarrow.parquet as pq

    from pipeline.run import run
    from schemas.parquet import cluster_from_row

    with tempfile.TemporaryDirectory() as out:
        run(["--input", os.path.join(REPO, "sample", "crawl.parquet"), "--output", out, "--phases", "clusters"])
        rows = pq.read_table(os.path.join(out, "clusters")).to_pylist()
    clusters = sorted((cluster_from_row(r) for r in rows), key=lambda c: c.cluster_id)
    return clusters[:n]


def subject(cluster: Any, prompts: int) -> Any:
    from dreambooth_synth import Subject
    from transforms.prompts import template_prompts

    scenes = template_prompts(cluster.cluster_id, cluster.class_noun, bool(cluster.is_live), prompts)
    return Subject(key=cluster.cluster_id, class_noun=cluster.class_noun,
                   images=tuple(im.image for im in cluster.images),
                   prompts=tuple((p.prompt, p.skill) for p in scenes))


def run_clusters(model: Any, train_config: Any, sample_config: Any, clusters: list[Any], prompts: int,
                 warmup: int, speed: Any = None) -> dict[str, Any]:
    """Synthesize every cluster on one model, as a worker does; per-cluster seconds and memory."""
    from dreambooth_synth import PARTS, Synthesizer

    synthesizer = Synthesizer(model, train_config, sample_config, speed=speed)
    per_cluster = []
    try:
        results = synthesizer.synthesize_many([subject(cluster, prompts) for cluster in clusters])
    finally:
        synthesizer.close()
    for cluster, result in zip(clusters, results, strict=True):
        if not hasattr(result, "renders"):
            raise RuntimeError(f"cluster {cluster.cluster_id} failed: {result!r}")
        after, peak = result.after, result.peak
        per_cluster.append({
            "cluster_id": cluster.cluster_id, "n_images": result.n_images, "renders": len(result.renders),
            "seconds": result.seconds, "train_steps_per_s": round(result.train.steps / result.seconds["train"], 2),
            "images_per_s": round(len(result.renders) / result.seconds["sample"], 2),
            "final_loss": round(result.train.final_loss, 4),
            "rss_after_mib": round(after.rss / MIB, 1), "peak_rss_mib": round(after.peak_rss / MIB, 1),
            "cuda_allocated_after_mib": None if after.cuda_allocated is None else round(after.cuda_allocated / MIB, 1),
            "cuda_peak_mib": None if peak.cuda_peak_allocated is None else round(peak.cuda_peak_allocated / MIB, 1),
        })
    steady = per_cluster[warmup:]
    mean = {part: round(sum(c["seconds"][part] for c in steady) / len(steady), 4) for part in (*PARTS, "total")}
    rss = [c["rss_after_mib"] for c in per_cluster]
    growth = round(max(rss[warmup:]) - min(rss[warmup:]), 1)
    cuda = [c["cuda_allocated_after_mib"] for c in per_cluster if c["cuda_allocated_after_mib"] is not None]
    cuda_growth = round(max(cuda[warmup:]) - min(cuda[warmup:]), 1) if cuda else None
    return {
        "clusters": per_cluster,
        "mean_seconds_after_warmup": mean,
        "share_of_time": {part: round(mean[part] / mean["total"], 3) for part in PARTS},
        "train_steps_per_s": round(sum(c["train_steps_per_s"] for c in steady) / len(steady), 2),
        "images_per_s": round(sum(c["images_per_s"] for c in steady) / len(steady), 2),
        "rss_after_each_cluster_mib": rss,
        "rss_growth_after_warmup_mib": growth,
        "cuda_allocated_after_each_cluster_mib": cuda or None,
        "cuda_growth_after_warmup_mib": cuda_growth,
        "peak_rss_mib": max(c["peak_rss_mib"] for c in per_cluster),
        "cuda_peak_mib": max((c["cuda_peak_mib"] for c in per_cluster if c["cuda_peak_mib"] is not None),
                             default=None),
    }


class PerStepVAE:
    """The diffusers scripts' data path: every step encodes its photos with the VAE (the baseline)."""

    def __init__(self, model: Any, pixels: Any) -> None:
        self._model = model
        self._pixels = pixels

    def __len__(self) -> int:
        return int(self._pixels.shape[0])

    def sample(self, indices: Any, generator: Any) -> Any:
        import torch

        vae = self._model.vae
        with torch.no_grad():
            batch = self._pixels[indices].to(self._model.device, dtype=vae.dtype)
            latents = vae.encode(batch).latent_dist.sample(generator)
        return latents.float() * float(vae.config.scaling_factor)


def latent_baseline(model: Any, train_config: Any, cluster: Any, resolution: int,
                    repeats: int = 3) -> dict[str, Any]:
    """Training time with per-step VAE encoding (diffusers' scripts) versus latents cached once per cluster."""
    import statistics

    from dreambooth_synth.data import decode_images, encode_latents, to_pixels
    from dreambooth_synth.train import fine_tuning, train

    photos, _ = decode_images([im.image for im in cluster.images])
    pixels = to_pixels(photos, resolution)
    runs: dict[str, list[float]] = {"baseline_vae_every_step": [], "ours_latents_once": []}
    for _ in range(repeats):  # alternate the two, so that drifting machine load hits both alike
        for name, times in runs.items():
            with fine_tuning(model, train_config, seed=0) as params:
                started = time.perf_counter()
                data = PerStepVAE(model, pixels) if name.startswith("baseline") else encode_latents(model, pixels)
                train(model, train_config, params, data, "a photo of sks object", seed=0, resolution=resolution)
                synchronize(model)
                times.append(time.perf_counter() - started)
    medians = {name: round(statistics.median(times), 3) for name, times in runs.items()}
    return {**{f"{name}_seconds": value for name, value in medians.items()}, "steps": train_config.steps,
            "repeats": repeats,
            "speedup": round(medians["baseline_vae_every_step"] / medians["ours_latents_once"], 2)}


def synchronize(model: Any) -> None:
    import torch

    if model.device.type == "cuda":
        torch.cuda.synchronize()


def tiny_cpu(args: argparse.Namespace) -> dict[str, Any]:
    from dreambooth_synth import ModelConfig, SampleConfig, SpeedConfig, TrainConfig, load_model
    from dreambooth_synth.tiny import materialize_preset

    clusters = sample_clusters(args.clusters)
    with tempfile.TemporaryDirectory() as root:
        path = materialize_preset("tiny-random", root)
        started = time.perf_counter()
        model = load_model(ModelConfig(name=path))
        load_seconds = time.perf_counter() - started
        gc.collect()
        gc.freeze()  # as the Beam worker does after loading (transforms/synthesize.py)
        sample = SampleConfig(steps=args.sample_steps, images_per_prompt=args.k, batch_size=8)
        out: dict[str, Any] = {
            "model": "tiny-random (SD 1.5 layout, 64 px)", "device": str(model.device),
            "model_load_seconds": round(load_seconds, 3),
            "settings": {"clusters": len(clusters), "train_steps": args.steps, "prompts": args.prompts,
                         "images_per_prompt": args.k, "sample_steps": args.sample_steps,
                         "warmup_clusters": args.warmup,
                         "torch_threads": __import__("torch").get_num_threads()},
        }
        out["lora"] = run_clusters(model, TrainConfig(steps=args.steps, learning_rate=1e-2), sample, clusters,
                                   args.prompts, warmup=args.warmup)
        out["full"] = run_clusters(model, TrainConfig(mode="full", steps=args.steps, learning_rate=1e-3), sample,
                                   clusters, args.prompts, warmup=args.warmup)
        out["latents_baseline"] = latent_baseline(model, TrainConfig(steps=args.steps, learning_rate=1e-2),
                                                  clusters[0], model.native_resolution)
        out["lora_4_per_batch"] = run_clusters(model, TrainConfig(steps=args.steps, learning_rate=1e-2), sample,
                                               clusters, args.prompts, warmup=args.warmup,
                                               speed=SpeedConfig(clusters_per_batch=4))
        out["plain_diffusers_loop"] = plain_comparison(model, TrainConfig(steps=args.steps, learning_rate=1e-2),
                                                       sample, clusters, args)
        gc.unfreeze()
    return out


def plain_comparison(model: Any, train_config: Any, sample_config: Any, clusters: list[Any],
                     args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per cluster of diffusers' DreamBooth-LoRA example loop (:mod:`benchmarks.plain_dreambooth`)
    against ours -- one cluster at a time, and four per UNet batch -- on the same model, clusters, steps and
    renders. The three take turns on the same four clusters, ``--repeats`` rounds; the best round of each
    counts (the machine may be shared: the best round is the least disturbed one, as with ``timeit``).
    Ours includes its per-cluster set-up (decoding the photos, encoding their latents once, releasing
    memory); the plain loop's seconds are its training and sampling."""
    from benchmarks.plain_dreambooth import plain_dreambooth_lora
    from dreambooth_synth import SpeedConfig, Synthesizer
    from dreambooth_synth.data import decode_images
    from dreambooth_synth.prompts import render_prompt, sample_seed

    def plain(cluster: Any) -> float:
        s = subject(cluster, args.prompts)
        noun = s.class_noun or "object"
        photos, _ = decode_images(s.images)
        jobs = [(template, k) for template, _ in s.prompts for k in range(args.k)]
        run = plain_dreambooth_lora(model.pipe, photos, f"a photo of sks {noun}",
                                    [render_prompt(t, f"sks {noun}") for t, _ in jobs],
                                    [sample_seed(s.key, t, k) for t, k in jobs], steps=train_config.steps,
                                    rank=train_config.lora_rank, learning_rate=train_config.effective_learning_rate,
                                    resolution=model.native_resolution, sample_steps=sample_config.steps)
        return run["seconds"]["total"]

    def ours(batch: list[Any], per_batch: int) -> list[float]:
        synthesizer = Synthesizer(model, train_config, sample_config, speed=SpeedConfig(clusters_per_batch=per_batch))
        try:
            results = synthesizer.synthesize_many([subject(c, args.prompts) for c in batch])
        finally:
            synthesizer.close()
        return [r.seconds["total"] for r in results]

    warmup, timed = clusters[:4], clusters[args.warmup:args.warmup + 4]
    plain(warmup[0])
    ours(warmup, 4)
    rounds: dict[str, list[float]] = {"plain_diffusers_loop": [], "ours": [], "ours_4_per_batch": []}
    for round_ in range(args.repeats):
        # Cluster by cluster, the plain loop and ours in turn (which goes first alternates), then the four as
        # one batch: load that drifts during the round hits all three alike.
        sides: dict[str, float] = {"plain_diffusers_loop": 0.0, "ours": 0.0}
        for i, cluster in enumerate(timed):
            for side in (("ours", "plain_diffusers_loop") if (i + round_) % 2 else ("plain_diffusers_loop", "ours")):
                sides[side] += plain(cluster) if side == "plain_diffusers_loop" else ours([cluster], 1)[0]
        for side, total in sides.items():
            rounds[side].append(total / len(timed))
        rounds["ours_4_per_batch"].append(sum(ours(timed, 4)) / len(timed))
    best = {name: round(min(values), 4) for name, values in rounds.items()}
    return {
        "what": "seconds per cluster (train + sample); plain: train_dreambooth_lora.py's loop (float32, photo "
                "transforms, VAE and text encoder every step) and final inference (one image per pipeline call)",
        "clusters": len(timed), "repeats": args.repeats,
        "seconds_per_cluster": best,
        "all_rounds": {name: [round(v, 4) for v in values] for name, values in rounds.items()},
        "ratio_plain_over_ours": round(best["plain_diffusers_loop"] / best["ours"], 2),
        "ratio_plain_over_ours_4_per_batch": round(best["plain_diffusers_loop"] / best["ours_4_per_batch"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    import logging

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "synth.json"))
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4,
                        help="clusters before memory must stay flat (allocator pools grow with new shapes)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--k", type=int, default=2, help="images per prompt")
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the plain-loop comparison")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads on CPU (the tiny model gains nothing from more, and a "
                             "shared machine makes multi-threaded timings erratic); 0: torch's default")
    parser.add_argument("--max-growth-mib", type=float, default=16.0,
                        help="fail when memory after a cluster grows more than this after the warm-up")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)

    results: dict[str, Any] = {
        **header("synth"),
    }
    results["tiny_cpu"] = tiny_cpu(args)
    runs = [results["tiny_cpu"][name] for name in ("lora", "full", "lora_4_per_batch")]
    flat = all(r["rss_growth_after_warmup_mib"] <= args.max_growth_mib and
               (r["cuda_growth_after_warmup_mib"] or 0) <= 1 for r in runs)
    results["memory_flat"] = flat
    write_results(args.output, results)
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1)[:4000])
    plain = results["tiny_cpu"]["plain_diffusers_loop"]
    print(f"plain diffusers loop / ours, seconds per cluster: {plain['ratio_plain_over_ours']} (one at a time), "
          f"{plain['ratio_plain_over_ours_4_per_batch']} (four per batch)")
    print(f"written to {args.output}; memory flat across clusters: {flat}")
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
