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
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dreambooth_synth import memory
from dreambooth_synth.config import SampleConfig, TrainConfig
from dreambooth_synth.data import decode_images, encode_latents, to_pixels
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
from dreambooth_synth.train import TrainResult, WeightSnapshot, fine_tuning, train, trained_modules

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
    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._started = time.monotonic()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] += time.monotonic() - started

    def result(self) -> dict[str, float]:
        seconds = {k: round(v, 4) for k, v in self.seconds.items()}
        return {**seconds, "total": round(time.monotonic() - self._started, 4)}


class Synthesizer:
    """Fine-tunes and samples subject after subject on one loaded model (not thread-safe: one at a time).

    Args:
        model: the base model; the synthesizer owns it from now on (full mode keeps its trained modules
            in float32 and snapshots them).
        train_config: how subjects are learned.
        sample_config: how their prompts are rendered.
        storage: shared storage for the class images of prior preservation (required with it).
        class_image_dir: the directory of those class images in ``storage``.
    """

    def __init__(self, model: LoadedModel, train_config: TrainConfig, sample_config: SampleConfig, *,
                 storage: SharedStorage | None = None, class_image_dir: str = "") -> None:
        import torch

        self.model = model
        self.train_config = train_config
        self.sample_config = sample_config
        self.resolution = train_config.resolution or model.native_resolution
        self.width = sample_config.width or self.resolution
        self.height = sample_config.height or self.resolution
        self.class_images: ClassImageCache | None = None
        if train_config.prior_preservation:
            if storage is None or not class_image_dir:
                raise ValueError("prior preservation needs shared storage and a class image directory")
            self.class_images = ClassImageCache(storage, class_image_dir, self.class_images_key())
        model.pipe.scheduler = sampling_scheduler(sample_config.scheduler, model.scheduler_config)
        self._snapshot: WeightSnapshot | None = None
        if train_config.mode == "full":
            modules = trained_modules(model, train_config)
            for module in modules:
                module.to(torch.float32)  # master weights for AdamW; autocast computes in bf16 on GPU
            self._snapshot = WeightSnapshot(modules, pin=model.device.type == "cuda")
            LOG.info("full fine-tuning: %.0f MB of base weights kept on the CPU to restore after each subject",
                     self._snapshot.nbytes / 2**20)

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
        timer = _Timer()
        memory.reset_peak(self.model.device)
        failure: SynthesisError | None = None
        try:
            result = self._synthesize(subject, timer)
        except SynthesisError as error:
            failure = _detached(error)
        except Exception as error:  # noqa: BLE001 -- one subject's failure must not end the worker
            if is_out_of_memory(error):
                failure = OutOfMemoryError(f"{type(error).__name__}: {error}")
            else:
                LOG.warning("subject %s failed", subject.key, exc_info=True)
                failure = SynthesisError(f"{type(error).__name__}: {error}")
            _detached(error)
        finally:
            with timer.part("cleanup"):
                memory.release(self.model.device)
        if failure is not None:
            failure.seconds = timer.result()
            raise failure
        seconds = timer.result()
        after = memory.snapshot(self.model.device)
        LOG.info("subject %s: %d images of %d prompts in %.1f s (%s); final loss %.4f", subject.key,
                 len(result["renders"]), len(subject.prompts), seconds["total"],
                 ", ".join(f"{k} {seconds[k]:.1f}" for k in PARTS), result["train"].final_loss)
        return SynthesisResult(seconds=seconds, after=after, **result)

    def _synthesize(self, subject: Subject, timer: _Timer) -> dict[str, Any]:
        config = self.train_config
        model = self.model
        noun = class_noun_or_default(subject.class_noun)
        phrase = subject_phrase(config, noun)
        label = f"subject {subject.key}: "
        if not subject.prompts:
            raise SynthesisError("no prompts to render")
        with timer.part("load"):
            photos, problems = decode_images(subject.images)
            if not photos:
                raise NoUsableImagesError(f"none of the {len(subject.images)} images decodes: {'; '.join(problems)}")
            pixels = to_pixels(photos, self.resolution, config.center_crop)
        with timer.part("latents"):
            instance = encode_latents(model, pixels)
        prior = prior_rendered = None
        if config.prior_preservation:
            with timer.part("prior"):
                prior, prior_rendered = self._class_latents(noun)
        seed = training_seed(config.seed, subject.key)
        with fine_tuning(model, config, self._snapshot, seed=seed) as params:
            with timer.part("train"):
                trained = train(model, config, params, instance, instance_prompt(config, noun),
                                seed=seed, resolution=self.resolution,
                                prior=prior, class_prompt=class_prompt(config, noun), label=label)
            with timer.part("sample"):
                renders = self._render_prompts(subject, phrase)
                peak = memory.snapshot(model.device)
        return {"key": subject.key, "class_noun": noun, "subject_phrase": phrase,
                "instance_prompt": instance_prompt(config, noun), "renders": renders, "train": trained,
                "n_images": len(photos), "skipped_images": tuple(problems), "prior_rendered": prior_rendered,
                "peak": peak}

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
        return encode_latents(self.model, pixels), cached.rendered

    def _render_prompts(self, subject: Subject, phrase: str) -> tuple[Render, ...]:
        K = self.sample_config.images_per_prompt
        jobs = [(i, template, skill, k) for i, (template, skill) in enumerate(subject.prompts) for k in range(K)]
        texts = [render_prompt(template, phrase) for _, template, _, _ in jobs]
        seeds = [sample_seed(subject.key, template, k) for _, template, _, k in jobs]
        images = render(self.model, texts, seeds, self.sample_config, self.width, self.height)
        return tuple(
            Render(prompt_index=i, template=template, prompt=text, skill=skill, k=k, seed=seed,
                   image=encode_image(out.image, self.sample_config), width=out.image.width,
                   height=out.image.height, nsfw=out.nsfw)
            for (i, template, skill, k), text, seed, out in zip(jobs, texts, seeds, images, strict=True))


def base_weights(modules: Sequence[Any]) -> dict[str, Any]:
    """A CPU copy of modules' state dicts (tests and benchmarks compare the model against it)."""
    out = {}
    for i, module in enumerate(modules):
        for key, value in module.state_dict().items():
            out[f"{i}.{key}"] = value.detach().to("cpu", copy=True)
    return out
