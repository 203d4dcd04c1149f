"""Rendering prompts with a (fine-tuned) pipeline: batched, one seed per image, reproducible."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dreambooth_synth.config import SampleConfig


def sampling_scheduler(name: str, scheduler_config: Any) -> Any:
    """The sampler ``name`` built from the model's scheduler config (``default``: the model's own class)."""
    import diffusers

    classes = {
        "dpm++": "DPMSolverMultistepScheduler",
        "ddim": "DDIMScheduler",
        "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
        "pndm": "PNDMScheduler",
        "unipc": "UniPCMultistepScheduler",
    }
    class_name = classes.get(name) or scheduler_config["_class_name"]
    return getattr(diffusers, class_name).from_config(scheduler_config)


@dataclass(frozen=True)
class RenderedImage:
    image: Any
    """PIL image."""
    nsfw: bool | None
    """The model's safety checker flagged it (its pixels are then black); ``None`` without a checker."""


def autocast(model: Any) -> Any:
    """Autocast to the model's mixed-precision dtype on its device, or nothing in float32."""
    import torch

    if model.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=model.device.type, dtype=model.autocast_dtype)


def render(model: Any, prompts: Sequence[str], seeds: Sequence[int], config: SampleConfig, width: int,
           height: int, *, slots: Any = None, routes: Sequence[int] | None = None) -> list[RenderedImage]:
    """One image per (prompt, seed), in order, ``config.batch_size`` per pipeline call (0: all in one).

    Each image has its own CPU ``torch.Generator`` (diffusers' advice for reproducibility across devices),
    so its starting noise depends on its seed, not on which other images share its batch (batched kernels
    may still round differently: pixels can differ in the last bit across batch layouts).

    With adapter ``slots`` (:class:`~dreambooth_synth.slots.LoRASlots`), ``routes`` gives the slot of each
    image: one call renders several subjects, each image through its own subject's adapter.
    """
    import torch

    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if (slots is None) != (routes is None) or (routes is not None and len(routes) != len(prompts)):
        raise ValueError("routes go with slots, one route per prompt")
    out: list[RenderedImage] = []
    negative = config.negative_prompt.strip() or None
    size = config.batch_size or max(len(prompts), 1)
    # Classifier-free guidance runs the UNet on [unconditional rows; conditional rows] (diffusers' pipelines
    # do it when the scale is above 1): both halves of an image go through its subject's adapter.
    guided = config.guidance_scale > 1
    for start in range(0, len(prompts), size):
        batch = list(prompts[start:start + size])
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:start + size]]
        routing = contextlib.nullcontext()
        if slots is not None and routes is not None:
            chunk = list(routes[start:start + size])
            routing = slots.route(chunk + chunk if guided else chunk)
        with torch.no_grad(), autocast(model), routing:
            result = model.pipe(
                prompt=batch, negative_prompt=[negative] * len(batch) if negative else None,
                num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                width=width, height=height, generator=generators, output_type="pil")
        flags = getattr(result, "nsfw_content_detected", None)
        for i, image in enumerate(result.images):
            out.append(RenderedImage(image=image, nsfw=None if flags is None else bool(flags[i])))
    return out


def encode_image(image: Any, config: SampleConfig) -> bytes:
    buffer = io.BytesIO()
    if config.image_format == "jpeg":
        image.convert("RGB").save(buffer, "JPEG", quality=config.jpeg_quality)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()
