"""One subject in, its prompts rendered by a DreamBooth of it out: the library's entry point.

A :class:`Synthesizer` holds one loaded base model (load it once per process with
:func:`~dreambooth_synth.models.load_model`) and synthesizes subjects one after another::

    model = load_model(ModelConfig(name="tiny-random"))
    synthesizer = Synthesizer(model, TrainConfig(steps=20), SampleConfig(steps=4, images_per_prompt=2))
    result = synthesizer.synthesize(Subject(key="c1", class_noun="teapot", images=(jpeg1, jpeg2, jpeg3),
                                            prompts=(("{subject} on a beach", "recontextualization"),)))

For each subject: decode and crop the photos, encode their VAE latents once, fetch (or render once
per class) the class images when prior preservation is on, fine-tune (LoRA or full), render every
prompt K times with seeds derived from (subject key, prompt, k), then put the model back to the base
weights and release memory -- also when the subject fails, so a worker can go through thousands of
subjects without its memory growing. A subject that fails raises a
:class:`~dreambooth_synth.errors.SynthesisError` whose ``reason`` says why.

:meth:`Synthesizer.synthesize_many` takes several subjects; with ``speed.clusters_per_batch`` = K it trains
and renders K of them at a time in one UNet batch, each in its own LoRA adapter slot
(:mod:`dreambooth_synth.slots`), and returns each subject's result or error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dreambooth_synth import memory
from dreambooth_synth.config import SampleConfig, SpeedConfig, TrainConfig
from dreambooth_synth.data import EncodeEveryStep, decode_images, encode_latents, to_pixels
from dreambooth_synth.errors import NoUsableImagesError, OutOfMemoryError, SynthesisError, is_out_of_memory
from dreambooth_synth.models import LoadedModel
from dreambooth_synth.prior import ClassImageCache
from dreambooth_synth.prompts import (
    class_image_seed,
    class_noun_or_default,
    class_prompt,
    instance_prompt,
    render_prompt,
    sample_seed,
    subject_phrase,
    training_seed,
)
from dreambooth_synth.sample import encode_image, render, sampling_scheduler
from dreambooth_synth.storage import SharedStorage
from dreambooth_synth.train import (
    UNET_LORA_TARGETS,
    TrainJob,
    TrainResult,
    WeightSnapshot,
    fine_tuning,
    slot_fine_tuning,
    train_many,
    trained_modules,
)

if TYPE_CHECKING:
    from dreambooth_synth.slots import LoRASlots

LOG = logging.getLogger(__name__)

PARTS = ("load", "latents", "prior", "train", "sample", "cleanup")
"""The parts of a subject's time: decode/crop photos, VAE latents, class images, training, sampling,
restoring the model and releasing memory."""


@dataclass(frozen=True)
class Subject:
    """What the library needs of a cluster."""

    key: str
    """Stable identifier (the cluster id): seeds derive from it."""
    class_noun: str | None
    """DreamBooth class ("teapot"); empty or ``None`` becomes "object"."""
    images: tuple[bytes, ...] = field(repr=False)
    """Encoded photos of the subject (3-5 in the reference recipe)."""
    prompts: tuple[tuple[str, str], ...]
    """``(template, skill)`` pairs; ``{subject}`` in a template becomes "sks <class noun>"."""


@dataclass(frozen=True)
class Render:
    """One rendered image of one prompt."""

    prompt_index: int
    template: str
    """The prompt as given, with its ``{subject}`` placeholder."""
    prompt: str
    """The prompt as rendered ("sks teapot on a beach")."""
    skill: str
    k: int
    """Which of the prompt's K images (0-based)."""
    seed: int
    image: bytes = field(repr=False)
    width: int
    height: int
    nsfw: bool | None


@dataclass(frozen=True)
class SynthesisResult:
    key: str
    class_noun: str
    subject_phrase: str
    instance_prompt: str
    renders: tuple[Render, ...]
    train: TrainResult
    seconds: dict[str, float]
    """Seconds per part (see :data:`PARTS`) and ``total``."""
    n_images: int
    """Photos trained on."""
    skipped_images: tuple[str, ...]
    """Photos that could not be decoded, and why."""
    prior_rendered: bool | None
    """Class images: rendered by this subject (True), from the cache (False), not used (None)."""
    peak: memory.MemorySnapshot
    """Memory at the end of sampling (with the CUDA peak of this subject)."""
    after: memory.MemorySnapshot
    """Memory after the model was restored and memory released: what must not grow across subjects."""


def _detached(error: BaseException) -> Any:
    """``error`` without its traceback and chained exceptions, whose frames hold the failed subject's
    tensors: dropped before memory is released, or an out-of-memory error would keep that memory."""
    error.__traceback__ = error.__context__ = error.__cause__ = None
    return error


class _Timer:
    def __init__(self, device: Any = None) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._started = time.monotonic()
        self._cuda = device is not None and getattr(device, "type", None) == "cuda"

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            if self._cuda:
                # GPU work is queued: without waiting for it, a part's time would show up in the next part.
                import torch

                torch.cuda.synchronize()
            self.seconds[name] += time.monotonic() - started

    def result(self) -> dict[str, float]:
        seconds = {k: round(v, 4) for k, v in self.seconds.items()}
        return {**seconds, "total": round(time.monotonic() - self._started, 4)}


class Synthesizer:
    """Fine-tunes and samples subject after subject on one loaded model (not thread-safe: one at a time).

    Args:
        model: the base model; the synthesizer owns it from now on (full mode keeps its trained modules
            in float32 and snapshots them; the speed switches set its attention, may compile its UNet and
            put adapter slots on it until :meth:`close`).
        train_config: how subjects are learned.
        sample_config: how their prompts are rendered.
        speed: the speed switches (default: all at their defaults).
        storage: shared storage for the class images of prior preservation (required with it).
        class_image_dir: the directory of those class images in ``storage``.
    """

    def __init__(self, model: LoadedModel, train_config: TrainConfig, sample_config: SampleConfig, *,
                 speed: SpeedConfig | None = None, storage: SharedStorage | None = None,
                 class_image_dir: str = "") -> None:
        import torch

        from dreambooth_synth.slots import LoRASlots, SlotLoRALinear

        speed = speed or SpeedConfig()
        speed.check(train_config)
        self.model = model
        self.train_config = train_config
        self.sample_config = sample_config
        self.speed = speed
        self.resolution = train_config.resolution or model.native_resolution
        self.width = sample_config.width or self.resolution
        self.height = sample_config.height or self.resolution
        self.class_images: ClassImageCache | None = None
        if train_config.prior_preservation:
            if storage is None or not class_image_dir:
                raise ValueError("prior preservation needs shared storage and a class image directory")
            self.class_images = ClassImageCache(storage, class_image_dir, self.class_images_key())
        model.pipe.scheduler = sampling_scheduler(sample_config.scheduler, model.scheduler_config)
        set_attention(model, speed.attention)
        self._snapshot: WeightSnapshot | None = None
        if train_config.mode == "full":
            modules = trained_modules(model, train_config)
            for module in modules:
                module.to(torch.float32)  # master weights for AdamW; autocast computes in bf16 on GPU
            self._snapshot = WeightSnapshot(modules, pin=model.device.type == "cuda")
            LOG.info("full fine-tuning: %.0f MB of base weights kept on the CPU to restore after each subject",
                     self._snapshot.nbytes / 2**20)
        self.slots: LoRASlots | None = None
        if any(isinstance(m, SlotLoRALinear) for m in model.unet.modules()):
            raise ValueError("the UNet already has adapter slots: close() the synthesizer that put them there")
        if train_config.mode == "lora" and speed.adapter_slots:
            self.slots = LoRASlots(model.unet, UNET_LORA_TARGETS, speed.clusters_per_batch, train_config.lora_rank,
                                   train_config.effective_lora_alpha)
        if speed.compile_unet:
            # Compiled in place (the pipeline keeps its UNet object); the graphs are built on the first
            # subject -- one for training, one per sampling batch shape -- and reused by every later one.
            model.unet.compile(backend=speed.compile_backend)

    def close(self) -> None:
        """Give the model back as it came: adapter slots removed, the UNet no longer compiled."""
        if self.slots is not None:
            self.slots.remove()
            self.slots = None
        if self.speed.compile_unet:
            self.model.unet._compiled_call_impl = None  # what nn.Module.compile() set

    @property
    def clusters_per_batch(self) -> int:
        return self.slots.slots if self.slots is not None else 1

    def class_images_key(self) -> str:
        """Everything besides the class noun that determines the class images."""
        model, sample = self.model, self.sample_config
        return json.dumps({"model": model.name, "dtype": str(model.weight_dtype), "resolution": self.resolution,
                           "prompt": self.train_config.class_prompt, "count": self.train_config.num_class_images,
                           "scheduler": sample.scheduler, "steps": sample.steps, "guidance": sample.guidance_scale,
                           "negative": sample.negative_prompt}, sort_keys=True)

    # --- one subject ----------------------------------------------------------------------------------

    def synthesize(self, subject: Subject) -> SynthesisResult:
        """Fine-tune on ``subject`` and render its prompts; the model is the base model again afterwards.

        Raises:
            SynthesisError: (or a subclass, with its ``reason``) the subject failed; the next can go on.
        """
        if self.slots is not None:
            (outcome,) = self.synthesize_many([subject])
            if isinstance(outcome, SynthesisError):
                raise outcome
            return outcome
        timer = _Timer(self.model.device)
        memory.reset_peak(self.model.device)
        failure: SynthesisError | None = None
        try:
            result = self._synthesize(subject, timer)
        except Exception as error:  # noqa: BLE001 -- one subject's failure must not end the worker
            failure = _failure(error, subject.key)
        finally:
            with timer.part("cleanup"):
                memory.release(self.model.device)
        if failure is not None:
            failure.seconds = timer.result()
            raise failure
        seconds = timer.result()
        return self._finish(subject, result, seconds, memory.snapshot(self.model.device))

    def _finish(self, subject: Subject, result: dict[str, Any], seconds: dict[str, float],
                after: memory.MemorySnapshot) -> SynthesisResult:
        LOG.info("subject %s: %d images of %d prompts in %.1f s (%s); final loss %.4f", subject.key,
                 len(result["renders"]), len(subject.prompts), seconds["total"],
                 ", ".join(f"{k} {seconds[k]:.1f}" for k in PARTS), result["train"].final_loss)
        return SynthesisResult(seconds=seconds, after=after, **result)

    def _prepare(self, subject: Subject, timer: _Timer) -> dict[str, Any]:
        """Photos decoded and encoded, class images fetched: everything before training."""
        config = self.train_config
        noun = class_noun_or_default(subject.class_noun)
        if not subject.prompts:
            raise SynthesisError("no prompts to render")
        with timer.part("load"):
            photos, problems = decode_images(subject.images)
            if not photos:
                raise NoUsableImagesError(f"none of the {len(subject.images)} images decodes: {'; '.join(problems)}")
            pixels = to_pixels(photos, self.resolution, config.center_crop)
        with timer.part("latents"):
            instance = self._latents(pixels)
        prior = prior_rendered = None
        if config.prior_preservation:
            with timer.part("prior"):
                prior, prior_rendered = self._class_latents(noun)
        return {"subject": subject, "noun": noun, "phrase": subject_phrase(config, noun), "instance": instance,
                "prior": prior, "prior_rendered": prior_rendered, "n_images": len(photos), "problems": problems,
                "seed": training_seed(config.seed, subject.key)}

    def _latents(self, pixels: Any) -> Any:
        if self.speed.cache_encodings:
            return encode_latents(self.model, pixels)
        return EncodeEveryStep(self.model, pixels)

    def _job(self, prepared: dict[str, Any], slot: int = 0) -> TrainJob:
        config, noun = self.train_config, prepared["noun"]
        return TrainJob(instance=prepared["instance"], instance_prompt=instance_prompt(config, noun),
                        seed=prepared["seed"], prior=prepared["prior"], class_prompt=class_prompt(config, noun),
                        slot=slot, label=f"subject {prepared['subject'].key}: ")

    def _outcome(self, prepared: dict[str, Any], trained: TrainResult, renders: tuple[Render, ...],
                 peak: memory.MemorySnapshot) -> dict[str, Any]:
        return {"key": prepared["subject"].key, "class_noun": prepared["noun"], "subject_phrase": prepared["phrase"],
                "instance_prompt": instance_prompt(self.train_config, prepared["noun"]), "renders": renders,
                "train": trained, "n_images": prepared["n_images"], "skipped_images": tuple(prepared["problems"]),
                "prior_rendered": prepared["prior_rendered"], "peak": peak}

    def _synthesize(self, subject: Subject, timer: _Timer) -> dict[str, Any]:
        model, config = self.model, self.train_config
        prepared = self._prepare(subject, timer)
        job = self._job(prepared)
        with fine_tuning(model, config, self._snapshot, seed=prepared["seed"]) as params:
            with timer.part("train"):
                (trained,) = train_many(model, config, params, [job], resolution=self.resolution,
                                        optimizer=self.speed.optimizer, cache_text=self.speed.cache_encodings,
                                        check_every=self.speed.loss_check_every)
                if isinstance(trained, SynthesisError):
                    raise trained
            with timer.part("sample"):
                (renders,) = self._render_prompts([prepared])
                peak = memory.snapshot(model.device)
        return self._outcome(prepared, trained, renders, peak)

    # --- several subjects in adapter slots ----------------------------------------------------------------

    def synthesize_many(self, subjects: Sequence[Subject]) -> list[SynthesisResult | SynthesisError]:
        """Synthesize ``subjects``, ``speed.clusters_per_batch`` at a time in one UNet batch (adapter slots).

        A subject's failure (undecodable photos, a diverged loss) is its own: the others go on. A failure
        of the shared batch (out of memory) fails every subject in it. The training and sampling time of a
        batch is divided evenly among its subjects in their ``seconds``.

        Returns:
            Per subject, in order: its result, or the :class:`SynthesisError` it failed with (``seconds`` set).
        """
        if self.slots is None:
            out: list[SynthesisResult | SynthesisError] = []
            for subject in subjects:
                try:
                    out.append(self.synthesize(subject))
                except SynthesisError as error:
                    out.append(error)
            return out
        outcomes: list[SynthesisResult | SynthesisError] = []
        for start in range(0, len(subjects), self.slots.slots):
            outcomes += self._synthesize_group(list(subjects[start:start + self.slots.slots]))
        return outcomes

    def _synthesize_group(self, subjects: list[Subject]) -> list[SynthesisResult | SynthesisError]:
        assert self.slots is not None
        model, config, slots = self.model, self.train_config, self.slots
        memory.reset_peak(model.device)
        timers = [_Timer(model.device) for _ in subjects]
        failures: dict[int, SynthesisError] = {}
        prepared: dict[int, dict[str, Any]] = {}
        for i, subject in enumerate(subjects):
            try:
                prepared[i] = self._prepare(subject, timers[i])
            except Exception as error:  # noqa: BLE001 -- the subject's own failure
                failures[i] = _failure(error, subject.key)
        shared = _Timer(model.device)
        results: dict[int, dict[str, Any]] = {}
        members = list(prepared)  # the subjects that share the batch (and its time)
        try:
            if members:
                # One slot per subject; with one slot, rows need no routing (the layers' single-slot path).
                routed = slots.slots > 1
                jobs = [self._job(prepared[i], slot) for slot, i in enumerate(members)]
                seeds = {job.slot: job.seed for job in jobs}
                with slot_fine_tuning(model, config, slots, seeds) as params:
                    with shared.part("train"):
                        trained = train_many(model, config, params, jobs, resolution=self.resolution,
                                             slots=slots if routed else None, optimizer=self.speed.optimizer,
                                             cache_text=self.speed.cache_encodings,
                                             check_every=self.speed.loss_check_every)
                    done = []
                    for i, outcome in zip(members, trained, strict=True):
                        if isinstance(outcome, SynthesisError):
                            failures[i] = outcome
                        else:
                            done.append((i, outcome))
                    with shared.part("sample"):
                        slot_of = {i: slot for slot, i in enumerate(members)}
                        renders = self._render_prompts([prepared[i] for i, _ in done],
                                                       [slot_of[i] for i, _ in done] if routed else None)
                        peak = memory.snapshot(model.device)
                    for (i, outcome), rendered in zip(done, renders, strict=True):
                        results[i] = self._outcome(prepared[i], outcome, rendered, peak)
        except Exception as error:  # noqa: BLE001 -- the batch failed: each of its subjects is rejected
            failure = _failure(error, ", ".join(subjects[i].key for i in members))
            for i in members:
                if i not in failures:
                    failures[i] = _clone(failure)  # each subject's own (its own seconds)
            results.clear()
        finally:
            with shared.part("cleanup"):
                memory.release(model.device)
        after = memory.snapshot(model.device)
        share = {part: value / max(len(members), 1) for part, value in shared.seconds.items()}
        out: list[SynthesisResult | SynthesisError] = []
        for i, subject in enumerate(subjects):
            own = timers[i].seconds
            parts = {part: round(own[part] + (share[part] if i in members else 0.0), 4) for part in PARTS}
            if i not in members:
                parts["cleanup"] = round(own["cleanup"], 4)
            seconds = {**parts, "total": round(sum(parts.values()), 4)}
            if i in results:
                out.append(self._finish(subject, results[i], seconds, after))
            else:
                failures[i].seconds = seconds
                out.append(failures[i])
        return out

    def _class_latents(self, noun: str) -> tuple[Any, bool]:
        assert self.class_images is not None
        count = self.train_config.num_class_images
        prompt = class_prompt(self.train_config, noun)

        def render_class_images() -> list[bytes]:
            seeds = [class_image_seed(noun, i) for i in range(count)]
            images = render(self.model, [prompt] * count, seeds, self.sample_config, self.resolution, self.resolution)
            return [encode_image(r.image, SampleConfig(image_format="png")) for r in images]

        cached = self.class_images.get_or_render(noun, count, render_class_images)
        photos, problems = decode_images(cached.images)
        if problems:
            raise SynthesisError(f"class images of {noun!r} in {cached.path} do not decode: {problems[0]}")
        pixels = to_pixels(photos, self.resolution, center_crop=True)
        return self._latents(pixels), cached.rendered

    def _render_prompts(self, subjects: Sequence[dict[str, Any]],
                        slots: Sequence[int] | None = None) -> list[tuple[Render, ...]]:
        """Every prompt of every prepared subject, K times, in as few pipeline calls as the batch size allows
        (each image through its subject's adapter slot when ``slots`` are given); renders per subject."""
        K = self.sample_config.images_per_prompt
        jobs = [(n, i, template, skill, k) for n, prepared in enumerate(subjects)
                for i, (template, skill) in enumerate(prepared["subject"].prompts) for k in range(K)]
        texts = [render_prompt(template, subjects[n]["phrase"]) for n, _, template, _, _ in jobs]
        seeds = [sample_seed(subjects[n]["subject"].key, template, k) for n, _, template, _, k in jobs]
        routes = [slots[n] for n, *_ in jobs] if slots is not None else None
        images = render(self.model, texts, seeds, self.sample_config, self.width, self.height,
                        slots=self.slots if routes is not None else None, routes=routes)
        out: list[list[Render]] = [[] for _ in subjects]
        for (n, i, template, skill, k), text, seed, image in zip(jobs, texts, seeds, images, strict=True):
            out[n].append(Render(prompt_index=i, template=template, prompt=text, skill=skill, k=k, seed=seed,
                                 image=encode_image(image.image, self.sample_config), width=image.image.width,
                                 height=image.image.height, nsfw=image.nsfw))
        return [tuple(renders) for renders in out]


def set_attention(model: LoadedModel, attention: str) -> None:
    """Attention of the UNet and the VAE: ``sdpa`` (torch's fused kernels) or ``eager`` (written out)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for module in (model.unet, model.vae):
        processors = set(type(p).__name__ for p in module.attn_processors.values())
        if not processors <= {"AttnProcessor", "AttnProcessor2_0"}:
            LOG.warning("attention %s not set: the model's %s attention processors are %s", attention,
                        type(module).__name__, ", ".join(sorted(processors)))
            continue
        module.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())


def _clone(error: SynthesisError) -> SynthesisError:
    """A copy of ``error`` (errors such as :class:`NonFiniteLossError` take other arguments than their message)."""
    clone = type(error).__new__(type(error))
    clone.__dict__.update(error.__dict__)
    clone.args = error.args
    return clone


def _failure(error: BaseException, key: str) -> SynthesisError:
    """``error`` as the :class:`SynthesisError` to report, detached from its traceback (see :func:`_detached`)."""
    if isinstance(error, SynthesisError):
        return _detached(error)
    if is_out_of_memory(error):
        failure: SynthesisError = OutOfMemoryError(f"{type(error).__name__}: {error}")
    else:
        LOG.warning("subject %s failed", key, exc_info=error)
        failure = SynthesisError(f"{type(error).__name__}: {error}")
    _detached(error)
    return failure


def base_weights(modules: Sequence[Any]) -> dict[str, Any]:
    """A CPU copy of modules' state dicts (tests and benchmarks compare the model against it)."""
    out = {}
    for i, module in enumerate(modules):
        for key, value in module.state_dict().items():
            out[f"{i}.{key}"] = value.detach().to("cpu", copy=True)
    return out
