"""Benchmark of per-cluster DreamBooth synthesis: where a cluster's time goes, and memory across clusters.

Default (CPU, the tiny-random model, real DreamBench clusters from the bundled sample):

* the model load (once per worker) and, per cluster, the time of each part -- load (decode and crop the
  photos), latents, prior, train, sample, cleanup -- in LoRA and in full mode;
* resident memory after each of several clusters, which must stay flat (the run fails otherwise), and
  the peak;
* a plain baseline in the same run: the training loop of diffusers' DreamBooth scripts, which pushes
  every step's photos through the VAE encoder, against ours, which encodes each photo once per cluster
  and samples from its cached latent distribution.

``--sd15`` runs the GPU variant: a UNet, VAE and text encoder of Stable Diffusion 1.5's sizes with
random weights, bf16 on CUDA, LoRA versus full: training steps/s, sampling images/s, peak and
after-cluster GPU memory. (``--sd15 --divisor 8`` shrinks every width 8x: a smoke test of that code on
a CPU.)

    python benchmarks/bench_synth.py --output benchmarks/results/synth.json
    python benchmarks/bench_synth.py --sd15 --output benchmarks/results/synth-gpu.json
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
                 warmup: int) -> dict[str, Any]:
    """Synthesize every cluster on one model, as a worker does; per-cluster seconds and memory."""
    from dreambooth_synth import PARTS, Synthesizer

    synthesizer = Synthesizer(model, train_config, sample_config)
    per_cluster = []
    for cluster in clusters:
        result = synthesizer.synthesize(subject(cluster, prompts))
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
    from dreambooth_synth import ModelConfig, SampleConfig, TrainConfig, load_model
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
        gc.unfreeze()
    return out


def sd15_sized(args: argparse.Namespace) -> dict[str, Any]:
    """SD-1.5-sized random-weight model (bf16 on CUDA), LoRA versus full."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dreambooth_synth import ModelConfig, SampleConfig, TrainConfig, load_model
    from dreambooth_synth.tiny import write_clip_tokenizer

    d = args.divisor
    torch.manual_seed(0)
    # Stable Diffusion 1.5's architecture (its config.json values), random weights.
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=tuple(c // d for c in (320, 640, 1280, 1280)), layers_per_block=2,
        cross_attention_dim=768 // d, attention_head_dim=8, norm_num_groups=32 // min(d, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=tuple(c // d for c in (128, 256, 512, 512)), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=32 // min(d, 32), sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768 // d, intermediate_size=3072 // d, num_hidden_layers=12,
        num_attention_heads=12 // min(d, 12), max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, hidden_act="quick_gelu", projection_dim=768 // d))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    clusters = sample_clusters(args.clusters)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as root:
        write_clip_tokenizer(os.path.join(root, "tok"))
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(root, "tok"))
        StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(os.path.join(root, "sd15"))
        del unet, vae, text_encoder
        gc.collect()
        resolution = args.resolution or 512
        sample = SampleConfig(steps=args.sample_steps, images_per_prompt=args.k, batch_size=8)
        for mode, lr in (("lora", 1e-4), ("full", 5e-6)):
            started = time.perf_counter()
            model = load_model(ModelConfig(name=os.path.join(root, "sd15")))
            load_seconds = round(time.perf_counter() - started, 2)
            gc.collect()
            gc.freeze()  # as the Beam worker does after loading
            train_config = TrainConfig(mode=mode, steps=args.steps, learning_rate=lr, resolution=resolution,
                                       gradient_checkpointing=args.gradient_checkpointing)
            result = run_clusters(model, train_config, sample, clusters, args.prompts,
                                  warmup=min(args.warmup, len(clusters) - 1))
            results[mode] = {"model_load_seconds": load_seconds, "device": str(model.device),
                             "precision": str(model.weight_dtype), **result}
            if mode == "lora":
                results["latents_baseline"] = latent_baseline(model, train_config, clusters[0], resolution)
            del model
            gc.unfreeze()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return {"model": f"SD 1.5 architecture, random weights, widths / {d}", "resolution": resolution,
            "settings": {"clusters": len(clusters), "train_steps": args.steps, "prompts": args.prompts,
                         "images_per_prompt": args.k, "sample_steps": args.sample_steps,
                         "gradient_checkpointing": args.gradient_checkpointing}, **results}


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
    parser.add_argument("--sd15", action="store_true", help="the SD-1.5-sized variant (meant for a GPU)")
    parser.add_argument("--divisor", type=int, default=1, help="--sd15: divide every width (CPU smoke test)")
    parser.add_argument("--resolution", type=int, default=0, help="--sd15: training/render size (default 512)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
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
    if args.sd15:
        results["sd15"] = sd15_sized(args)
        runs = [results["sd15"]["lora"], results["sd15"]["full"]]
    else:
        results["tiny_cpu"] = tiny_cpu(args)
        runs = [results["tiny_cpu"]["lora"], results["tiny_cpu"]["full"]]
    flat = all(r["rss_growth_after_warmup_mib"] <= args.max_growth_mib and
               (r["cuda_growth_after_warmup_mib"] or 0) <= 1 for r in runs)
    results["memory_flat"] = flat
    write_results(args.output, results)
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1)[:4000])
    print(f"written to {args.output}; memory flat across clusters: {flat}")
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
