"""Seconds per cluster of DreamBooth synthesis at Stable Diffusion 1.5's size: each speed switch against the
plain diffusers DreamBooth-LoRA loop, in one run (part of ``benchmarks/gpu_check.sh``).

The recipe is the pipeline's: LoRA rank 4 at 512 px, 500 training steps, then 16 renders (4 prompts x 4) at
25 DPM-Solver++ steps, on real DreamBench clusters of the bundled sample. The model has SD 1.5's
architecture (its UNet, VAE and text encoder config values) with random weights: no weights can be fetched,
and the time of a step depends on the shapes, not on the values.

Training is measured on ``--measure-steps`` steps after a warm-up subject and scaled to the recipe's 500
(a step costs the same at step 40 and at step 400; the per-subject set-up inside the training part is
scaled with it, so the figure errs high); sampling always runs in full. Per cluster the seconds are split
into ``latents`` (VAE encoding of the photos), ``train``, ``sample`` and ``other`` (decoding the photos,
putting the adapters on and off, releasing memory).

Variants, in the order they run (each one is skipped, and says so, when the time left would not hold it):

* ``fast`` -- every switch that needs no compiler: bf16, SDPA attention, encodings cached once per cluster,
  fused AdamW, the loss read back every 25 steps, all 16 renders in one pipeline call; 1 warm-up and 3
  timed clusters, GPU memory after each.
* ``plain_diffusers_loop`` -- :mod:`benchmarks.plain_dreambooth`, the example script's loop (float32, VAE
  and text encoder every step, one image per call).
* ``adapters_K`` -- ``fast`` with K clusters trained and rendered in one UNet batch (adapter slots).
* ``processes_P`` -- ``fast`` in P worker processes sharing the GPU at once (Beam's SDK processes per worker).
* ``compiled`` -- ``fast`` with the UNet compiled once (torch.compile, inductor) and reused; the compilation
  is the warm-up's time, reported apart (once per worker, not per cluster).
* ``fast_without_*`` -- ``fast`` with one switch back at the plain setting: what that switch is worth.

    python -m benchmarks.synth_speed --output /tmp/synth.json             # on a GPU
    python -m benchmarks.synth_speed --smoke --output /tmp/synth.json     # tiny shapes, CPU, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import multiprocessing
import os
import queue as queue_module
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

LOG = logging.getLogger("synth_speed")
MIB = 2**20


@dataclass(frozen=True)
class Shape:
    """Widths of the model: SD 1.5's (from its config.json files), or tiny ones for the CPU smoke run."""

    unet_channels: tuple[int, ...]
    unet_heads: int
    layers_per_block: int
    vae_channels: tuple[int, ...]
    norm_groups: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_ff: int


SD15 = Shape((320, 640, 1280, 1280), 8, 2, (128, 256, 512, 512), 32, 768, 12, 12, 3072)
TINY = Shape((16, 32, 32, 32), 4, 1, (8, 16, 16, 16), 4, 32, 2, 4, 64)


@dataclass(frozen=True)
class Recipe:
    """What one cluster costs in production, and how much of it the benchmark runs."""

    train_steps: int = 500
    measure_steps: int = 40
    resolution: int = 512
    lora_rank: int = 4
    prompts: int = 4
    images_per_prompt: int = 4
    sample_steps: int = 25

    @property
    def renders(self) -> int:
        return self.prompts * self.images_per_prompt

    @property
    def scale(self) -> float:
        return self.train_steps / self.measure_steps


GPU_RECIPE = Recipe()
SMOKE_RECIPE = Recipe(train_steps=20, measure_steps=4, resolution=64, prompts=2, images_per_prompt=2, sample_steps=2)


def build_model(root: str, shape: Shape, device: str) -> str:
    """SD 1.5's pipeline at ``shape`` with random weights, saved (bfloat16 files: half the bytes to write and
    read; the loader casts them to the precision of each run) for ``load_model`` to read like a real model."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dreambooth_synth.tiny import write_clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):  # random initialisation of 1 B parameters is seconds on a GPU, a minute on a CPU
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=shape.unet_channels, layers_per_block=shape.layers_per_block,
            cross_attention_dim=shape.text_hidden, attention_head_dim=shape.unet_heads,
            norm_num_groups=shape.norm_groups,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(block_out_channels=shape.vae_channels, layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            norm_num_groups=shape.norm_groups, sample_size=512)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=shape.text_hidden, intermediate_size=shape.text_ff,
            num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads, max_position_embeddings=77,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu",
            projection_dim=shape.text_hidden))
    # Stable Diffusion 1.5's scheduler config.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    write_clip_tokenizer(os.path.join(root, "tokenizer-files"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer-files"))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(device="cpu", dtype=torch.bfloat16)
    path = os.path.join(root, "sd15")
    pipe.save_pretrained(path)
    del pipe, unet, vae, text_encoder
    gc.collect()
    return path


def sample_subjects(recipe: Recipe, n: int) -> list[Any]:
    """``n`` clusters of real DreamBench photos from the bundled sample (one per product page), with
    ``recipe.prompts`` prompts each from the prompts stage's template grammar."""
    import pyarrow.parquet as pq

    from dreambooth_synth import Subject
    from schemas.ids import stable_id
    from transforms.prompts import template_prompts

    pages: dict[str, list[bytes]] = {}
    for row in pq.read_table(os.path.join(REPO, "sample", "crawl.parquet"),
                             columns=["image", "expected", "expected_page"]).to_pylist():
        if row["expected"] == "kept":
            pages.setdefault(row["expected_page"], []).append(row["image"])
    subjects = []
    for page, images in sorted(pages.items()):
        if len(images) < 3 or "/products/" not in page or "?" in page:
            continue
        key = stable_id("bench-cluster", page)
        noun = page.rstrip("/").rsplit("/", 1)[-1].replace("-", " ")
        prompts = template_prompts(key, noun, False, recipe.prompts)
        subjects.append(Subject(key=key, class_noun=noun, images=tuple(images),
                                prompts=tuple((p.prompt, p.skill) for p in prompts)))
    if len(subjects) < n:
        raise RuntimeError(f"the sample has {len(subjects)} product clusters, {n} needed")
    return subjects[:n]


# --- variants ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    precision: str = "bf16"
    """``synth.model.mixed_precision`` (``no``: float32)."""
    speed: dict[str, Any] = field(default_factory=dict)
    """``synth.speed`` settings."""
    sample_batch: int = 0
    """``synth.sample.batch_size`` (0: all of a cluster's renders in one call)."""
    processes: int = 1
    timed: int = 1
    """Timed clusters (batches of ``clusters_per_batch`` with adapter slots), after one warm-up."""


FAST_SPEED = {"attention": "sdpa", "cache_encodings": True, "optimizer": "fused", "loss_check_every": 25}


def variants(adapters: Sequence[int], processes: Sequence[int], compile_backend: str) -> list[Variant]:
    """Every variant, most important first (a short budget cuts the end of the list)."""
    out = [Variant("fast", "bf16, SDPA, encodings cached per cluster, fused AdamW, the loss read back every 25 "
                           "steps, all renders in one call", speed=FAST_SPEED, timed=3),
           PLAIN]
    out += [Variant(f"adapters_{k}", f"fast, {k} clusters trained and rendered in one UNet batch (adapter slots)",
                    speed={**FAST_SPEED, "clusters_per_batch": k}) for k in adapters]
    out += [Variant(f"processes_{p}", f"fast, {p} worker processes sharing the GPU", speed=FAST_SPEED,
                    processes=p, timed=2) for p in processes]
    out.append(Variant("compiled", f"fast with the UNet compiled once ({compile_backend}) and reused for every "
                                   "cluster; warmup_seconds is mostly the compilation",
                       speed={**FAST_SPEED, "compile_unet": True, "compile_backend": compile_backend}, timed=3))
    out += [
        Variant("fast_without_bf16", "fast in float32", precision="no", speed=FAST_SPEED),
        Variant("fast_without_sdpa", "fast with eager attention", speed={**FAST_SPEED, "attention": "eager"}),
        Variant("fast_without_cached_encodings", "fast with the VAE and text encoder at every step",
                speed={**FAST_SPEED, "cache_encodings": False}),
        Variant("fast_without_fused_adamw", "fast with torch's default AdamW (foreach on a GPU)",
                speed={**FAST_SPEED, "optimizer": "auto"}),
        Variant("fast_without_batched_sampling", "fast with one image per pipeline call", speed=FAST_SPEED,
                sample_batch=1),
        Variant("fast_without_deferred_loss_check", "fast reading the loss back every step",
                speed={**FAST_SPEED, "loss_check_every": 1}),
    ]
    return out


PLAIN = Variant("plain_diffusers_loop", "diffusers' train_dreambooth_lora.py loop and final inference: float32, "
                "VAE and text encoder every step, one image per pipeline call", precision="no", sample_batch=1)


# --- measuring -----------------------------------------------------------------------------------------------------


def _configs(variant: Variant, recipe: Recipe) -> tuple[Any, Any, Any]:
    from dreambooth_synth import SampleConfig, SpeedConfig, TrainConfig

    train = TrainConfig(steps=recipe.measure_steps, lora_rank=recipe.lora_rank, resolution=recipe.resolution,
                        log_every_steps=max(recipe.measure_steps, 1))
    sample = SampleConfig(steps=recipe.sample_steps, images_per_prompt=recipe.images_per_prompt,
                          batch_size=variant.sample_batch)
    return train, sample, SpeedConfig(**variant.speed)


def scaled(seconds: dict[str, float], recipe: Recipe) -> dict[str, float]:
    """A cluster's measured seconds as the recipe's: the training part scaled to its steps; ``other`` is the
    rest of the cluster's time (decoding photos, putting adapters on and off, releasing memory)."""
    latents = seconds.get("latents", 0.0)
    other = max(seconds["total"] - latents - seconds["train"] - seconds["sample"], 0.0)
    parts = {"latents": latents, "train": seconds["train"] * recipe.scale, "sample": seconds["sample"],
             "other": other}
    return {**{k: round(v, 3) for k, v in parts.items()}, "total": round(sum(parts.values()), 3)}


def _mean(dicts: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: round(sum(d[k] for d in dicts) / len(dicts), 3) for k in dicts[0]}


def _memory(result: Any) -> dict[str, float | None]:
    after, peak = result.after, result.peak

    def mib(value: int | None) -> float | None:
        return None if value is None else round(value / MIB, 1)

    return {"gpu_allocated_after_mib": mib(after.cuda_allocated), "gpu_reserved_after_mib": mib(after.cuda_reserved),
            "gpu_peak_mib": mib(peak.cuda_peak_allocated), "rss_after_mib": mib(after.rss)}


def warm_up(synthesizer: Any, subjects: Sequence[Any]) -> float:
    """One subject (a batch with adapter slots) at a few steps: kernels loaded, allocator pools grown, the
    UNet compiled; returns the seconds."""
    train, sample = synthesizer.train_config, synthesizer.sample_config
    synthesizer.train_config = dataclasses.replace(train, steps=min(3, train.steps))
    synthesizer.sample_config = dataclasses.replace(sample, steps=min(2, sample.steps))
    started = time.perf_counter()
    try:
        for outcome in synthesizer.synthesize_many(list(subjects)):
            if not hasattr(outcome, "renders"):
                raise RuntimeError(f"warm-up subject failed: {outcome!r}")
    finally:
        synthesizer.train_config, synthesizer.sample_config = train, sample
    return time.perf_counter() - started


def run_ours(model: Any, variant: Variant, subjects: Sequence[Any], recipe: Recipe) -> dict[str, Any]:
    """``variant`` through the library's :class:`~dreambooth_synth.Synthesizer`: a warm-up, then the timed
    clusters; per cluster the scaled seconds and the memory after it."""
    from dreambooth_synth import Synthesizer

    train, sample, speed = _configs(variant, recipe)
    synthesizer = Synthesizer(model, train, sample, speed=speed)
    per_batch = synthesizer.clusters_per_batch
    try:
        warmup_seconds = warm_up(synthesizer, subjects[:per_batch])
        clusters = []
        for start in range(per_batch, per_batch * (1 + variant.timed), per_batch):
            for result in synthesizer.synthesize_many(list(subjects[start:start + per_batch])):
                if not hasattr(result, "renders"):
                    raise RuntimeError(f"cluster failed: {result!r}")
                clusters.append({"measured": result.seconds, "scaled": scaled(result.seconds, recipe),
                                 "renders": len(result.renders), **_memory(result)})
    finally:
        synthesizer.close()
    return _summary(variant, clusters, warmup_seconds, model)


def _summary(variant: Variant, clusters: list[dict[str, Any]], warmup_seconds: float, model: Any) -> dict[str, Any]:
    per_cluster = _mean([c["scaled"] for c in clusters])
    allocated = [c["gpu_allocated_after_mib"] for c in clusters]
    rss = [c["rss_after_mib"] for c in clusters]
    growth = (max(allocated) - min(allocated)) if None not in allocated else None
    return {
        "description": variant.description, "precision": str(model.weight_dtype).replace("torch.", ""),
        "speed": variant.speed, "sample_batch_size": variant.sample_batch, "processes": variant.processes,
        "warmup_seconds": round(warmup_seconds, 2),
        "seconds_per_cluster": per_cluster,
        "clusters_per_gpu_hour": round(3600 * variant.processes / per_cluster["total"], 1),
        "gpu_peak_mib": max((c["gpu_peak_mib"] or 0 for c in clusters), default=None) or None,
        "gpu_allocated_after_each_cluster_mib": allocated if None not in allocated else None,
        "gpu_growth_mib": None if growth is None else round(growth, 1),
        "rss_after_each_cluster_mib": rss,
        "clusters": clusters,
    }


def run_plain(model: Any, subjects: Sequence[Any], recipe: Recipe) -> dict[str, Any]:
    """The example script's loop (:mod:`benchmarks.plain_dreambooth`) on float32 weights: a short warm-up,
    then one timed cluster."""
    import torch

    from benchmarks.plain_dreambooth import plain_dreambooth_lora
    from dreambooth_synth.data import decode_images
    from dreambooth_synth.prompts import render_prompt, sample_seed

    def one(subject: Any, steps: int, sample_steps: int, renders: int | None = None) -> dict[str, Any]:
        photos, _ = decode_images(subject.images)
        prompts = [(template, k) for template, _ in subject.prompts for k in range(recipe.images_per_prompt)]
        prompts = prompts[:renders] if renders else prompts
        texts = [render_prompt(template, f"sks {subject.class_noun}") for template, _ in prompts]
        seeds = [sample_seed(subject.key, template, k) for template, k in prompts]
        return plain_dreambooth_lora(model.pipe, photos, f"a photo of sks {subject.class_noun}", texts, seeds,
                                     steps=steps, rank=recipe.lora_rank, resolution=recipe.resolution,
                                     sample_steps=sample_steps)

    cuda = model.device.type == "cuda"
    started = time.perf_counter()
    one(subjects[0], min(3, recipe.measure_steps), min(2, recipe.sample_steps), renders=1)
    warmup_seconds = time.perf_counter() - started
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run = one(subjects[1], recipe.measure_steps, recipe.sample_steps)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    from dreambooth_synth.memory import snapshot

    after = snapshot(model.device)
    cluster = {"measured": run["seconds"], "scaled": scaled(run["seconds"], recipe), "renders": len(run["images"]),
               "gpu_allocated_after_mib": None if after.cuda_allocated is None
               else round(after.cuda_allocated / MIB, 1),
               "gpu_reserved_after_mib": None, "rss_after_mib": round(after.rss / MIB, 1),
               "gpu_peak_mib": round(torch.cuda.max_memory_allocated() / MIB, 1) if cuda else None}
    return _summary(PLAIN, [cluster], warmup_seconds, model)


def _process_worker(model_dir: str, variant: Variant, recipe: Recipe, subjects: Sequence[Any], barrier: Any,
                    queue: Any, threads: int) -> None:
    """One of ``variant.processes`` workers sharing the device: load, warm up, wait for the others, time."""
    try:
        import torch

        from dreambooth_synth import ModelConfig, Synthesizer, load_model

        if threads:
            torch.set_num_threads(threads)
        model = load_model(ModelConfig(name=model_dir, mixed_precision=variant.precision))
        train, sample, speed = _configs(variant, recipe)
        synthesizer = Synthesizer(model, train, sample, speed=speed)
        warmup_seconds = warm_up(synthesizer, subjects[:1])
        barrier.wait(timeout=600)
        started = time.time()
        clusters = []
        for subject in subjects[1:1 + variant.timed]:
            result = synthesizer.synthesize(subject)
            clusters.append({"measured": result.seconds, "scaled": scaled(result.seconds, recipe),
                             "renders": len(result.renders), **_memory(result)})
        queue.put({"clusters": clusters, "warmup_seconds": warmup_seconds, "started": started,
                   "finished": time.time(), "precision": str(model.weight_dtype)})
    except BaseException as error:  # noqa: BLE001 -- reported to the parent, which records it
        barrier.abort()
        queue.put({"error": f"{type(error).__name__}: {error}"})


def run_processes(model_dir: str, variant: Variant, subjects: Sequence[Any], recipe: Recipe,
                  timeout: float, threads: int, start_method: str = "spawn") -> dict[str, Any]:
    """``variant.processes`` worker processes (spawned, as Beam starts SDK processes), each with its own model
    copy on the device, timed over the same window. Each cluster's parts are measured under the others'
    contention; the device's throughput is processes / (seconds per cluster). (CUDA cannot be forked; the
    CPU smoke run forks, which saves each child a minute-long import on a busy small machine.)"""
    context = multiprocessing.get_context(start_method)
    barrier, queue = context.Barrier(variant.processes), context.Queue()
    workers = [context.Process(target=_process_worker, daemon=True,
                               args=(model_dir, variant, recipe, subjects[i::variant.processes], barrier, queue,
                                     threads))
               for i in range(variant.processes)]
    for worker in workers:
        worker.start()
    reports = []
    deadline = time.monotonic() + timeout
    try:
        while len(reports) < len(workers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{variant.name}: the worker processes did not finish in {timeout:.0f} s")
            try:
                reports.append(queue.get(timeout=1.0))
            except queue_module.Empty:
                if not any(worker.is_alive() for worker in workers) and queue.empty():
                    codes = [worker.exitcode for worker in workers]
                    raise RuntimeError(f"{variant.name}: worker processes ended without a report (exit codes "
                                       f"{codes})") from None
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise RuntimeError(f"{variant.name}: {errors[0]}")
    clusters = [c for r in reports for c in r["clusters"]]

    class _Model:  # what _summary reads of a model
        weight_dtype = reports[0]["precision"]

    summary = _summary(variant, clusters, max(r["warmup_seconds"] for r in reports), _Model())
    window = max(r["finished"] for r in reports) - min(r["started"] for r in reports)
    summary["measured_window_seconds"] = round(window, 2)
    summary["note"] = ("seconds_per_cluster: one process's cluster, measured while the others ran; the device "
                       "finishes `processes` of them in that time")
    return summary


# --- the run -------------------------------------------------------------------------------------------------------


class Budget:
    """Skips what would run past the deadline, from the measured cost of the fast variant."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.cluster_seconds = 0.0  # measured seconds of one fast cluster (as run: training not scaled)

    def left(self) -> float:
        return self.deadline - time.time()

    def allows(self, variant: Variant, fixed: float) -> tuple[bool, float]:
        factor = {"no": 3.0}.get(variant.precision, 1.0) * (2.0 if variant.sample_batch == 1 else 1.0)
        clusters = (1 + variant.timed) * int(variant.speed.get("clusters_per_batch", 1))
        estimate = fixed + clusters * self.cluster_seconds * factor
        return estimate < self.left(), estimate


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks.common import header
    from dreambooth_synth import ModelConfig, load_model

    smoke = args.smoke
    recipe = SMOKE_RECIPE if smoke else dataclasses.replace(GPU_RECIPE, measure_steps=args.measure_steps)
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    if not smoke and device != "cuda":
        raise SystemExit("no CUDA device is visible: run with --smoke for the CPU check of this code")
    deadline = time.time() + args.budget
    budget = Budget(deadline)
    adapters = [int(k) for k in args.adapters.split(",") if k]
    processes = [int(p) for p in args.processes.split(",") if p]
    out: dict[str, Any] = {
        **header("synth_speed"), "mode": "cpu-smoke" if smoke else "gpu",
        "model": "SD 1.5 architecture, random weights" if not smoke else "SD 1.5 layout at tiny widths (smoke)",
        "recipe": {**dataclasses.asdict(recipe), "renders": recipe.renders, "train_scale": recipe.scale},
        "variants": {}, "skipped": {},
    }

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(out, handle, indent=2)

    with tempfile.TemporaryDirectory(prefix="synth-speed-") as scratch:
        root = args.model_dir or scratch
        model_dir = os.path.join(root, "sd15")
        started = time.perf_counter()
        if not os.path.exists(os.path.join(model_dir, "model_index.json")):
            model_dir = build_model(root, TINY if smoke else SD15, device)
        out["build_seconds"] = round(time.perf_counter() - started, 2)
        n = 1 + 3 + max([*adapters, 1]) * 2
        subjects = sample_subjects(recipe, n)
        only = [name for name in args.only.split(",") if name]
        skip = [name for name in args.skip.split(",") if name]
        started = time.perf_counter()
        bf16 = load_model(ModelConfig(name=model_dir, mixed_precision="bf16"))
        out["load_seconds"] = round(time.perf_counter() - started, 2)
        gc.collect()
        gc.freeze()  # as the Beam worker does after loading (transforms/synthesize.py)
        fp32 = None
        todo = variants(adapters, processes, args.compile_backend)
        for variant in todo:
            if (only and variant.name not in only) or variant.name in skip:
                continue
            if variant.processes > 1:
                fixed = 25.0  # start-up of the worker processes
            elif variant.speed.get("compile_unet"):
                fixed = 150.0  # compiling the UNet's training and sampling graphs
            else:
                fixed = 8.0 if variant.precision == "no" and fp32 is None else 1.0
            ok, estimate = budget.allows(variant, 0.0 if smoke else fixed)
            if budget.cluster_seconds and not ok:
                out["skipped"][variant.name] = f"about {estimate:.0f} s needed, {budget.left():.0f} s left"
                LOG.warning("skipping %s: %s", variant.name, out["skipped"][variant.name])
                continue
            LOG.info("running %s", variant.name)
            started = time.perf_counter()
            resident = torch.cuda.memory_allocated() / MIB if device == "cuda" else None
            try:
                if variant.precision == "no" and fp32 is None:
                    fp32 = load_model(ModelConfig(name=model_dir, mixed_precision="no"))
                if variant.name == "plain_diffusers_loop":
                    result = run_plain(fp32, subjects, recipe)
                elif variant.processes > 1:
                    result = run_processes(model_dir, variant, subjects[1:], recipe, timeout=max(budget.left(), 30),
                                           threads=args.threads, start_method="fork" if smoke else "spawn")
                else:
                    result = run_ours(fp32 if variant.precision == "no" else bf16, variant, subjects, recipe)
            except Exception as error:  # noqa: BLE001 -- one variant's failure is recorded, the others run
                LOG.exception("%s failed", variant.name)
                out["variants"][variant.name] = {"description": variant.description,
                                                 "error": f"{type(error).__name__}: {error}",
                                                 "traceback": traceback.format_exc()[-4000:]}
                save()
                continue
            result["wall_seconds"] = round(time.perf_counter() - started, 2)
            # The models already on the device when the variant started (bf16, and float32 once loaded): the
            # variant's own working memory is its peak minus this.
            result["gpu_resident_before_mib"] = None if resident is None else round(resident, 1)
            out["variants"][variant.name] = result
            if variant.name == "fast":
                budget.cluster_seconds = result["wall_seconds"] / (1 + variant.timed)
            save()
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        out.update(compare(out["variants"]))
        save()
    return out


def compare(variants: dict[str, Any]) -> dict[str, Any]:
    """Ratios against the plain loop, what each switch is worth, and which way of running several clusters
    per GPU gives more clusters per GPU-hour."""
    done = {name: v for name, v in variants.items() if "seconds_per_cluster" in v}
    if not done:
        return {}
    plain = done.get("plain_diffusers_loop")
    for v in done.values():
        if plain:
            v["speedup_vs_plain"] = round(plain["seconds_per_cluster"]["total"] / v["seconds_per_cluster"]["total"]
                                          * v["processes"], 2)
    fast = done.get("fast")
    switches = {}
    if fast:
        for name, v in done.items():
            if name.startswith("fast_without_"):
                switches[name.removeprefix("fast_without_")] = {
                    "seconds_per_cluster_without": v["seconds_per_cluster"]["total"],
                    "seconds_per_cluster_with": fast["seconds_per_cluster"]["total"],
                    "saves_seconds_per_cluster": round(v["seconds_per_cluster"]["total"]
                                                       - fast["seconds_per_cluster"]["total"], 3)}
    several = {name: v["clusters_per_gpu_hour"] for name, v in done.items()
               if name.startswith(("adapters_", "processes_"))}
    best_of = {"adapter_batch": max((v for k, v in several.items() if k.startswith("adapters_")), default=None),
               "worker_processes": max((v for k, v in several.items() if k.startswith("processes_")), default=None)}
    winner = max((k for k, v in best_of.items() if v is not None), key=lambda k: best_of[k], default=None)
    best = max(done, key=lambda k: done[k]["clusters_per_gpu_hour"])
    seconds_per_cluster = round(3600 / done[best]["clusters_per_gpu_hour"], 3)
    return {
        "switches": switches,
        "several_clusters_per_gpu": {"clusters_per_gpu_hour": several, "best_of_each_way": best_of,
                                     "more_clusters_per_gpu_hour": winner,
                                     "one_at_a_time_clusters_per_gpu_hour": fast["clusters_per_gpu_hour"]
                                     if fast else None},
        "best": {"variant": best, "gpu_seconds_per_cluster": seconds_per_cluster,
                 "clusters_per_gpu_hour": done[best]["clusters_per_gpu_hour"],
                 "speedup_vs_plain": round(plain["seconds_per_cluster"]["total"] / seconds_per_cluster, 2)
                 if plain else None,
                 "target_15s_met": seconds_per_cluster <= 15.0},
        "memory_flat": all(v["gpu_growth_mib"] is None or v["gpu_growth_mib"] <= 1.0 for v in done.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the code, not the speed")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds this run may take")
    parser.add_argument("--measure-steps", type=int, default=40, help="training steps timed per cluster")
    parser.add_argument("--adapters", default="4", help="clusters per UNet batch to try, comma-separated")
    parser.add_argument("--processes", default="2", help="worker processes per GPU to try, comma-separated")
    parser.add_argument("--only", default="", help="run only these variants (comma-separated names)")
    parser.add_argument("--skip", default="", help="leave these variants out (comma-separated names)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--model-dir", default="", help="where to build the model, or find it built by an earlier run "
                                                        "(default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process on CPU (0: default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("dreambooth_synth", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transforms.models.diffusion import _quiet_library_progress_bars

    _quiet_library_progress_bars()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = run(args)
    print(json.dumps({k: out.get(k) for k in ("best", "several_clusters_per_gpu", "switches", "skipped")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
