"""Loading the base model once per process through diffusers ``from_pretrained``.

Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``) and SDXL (``StableDiffusionXLPipeline``) are
supported; which one a model is comes from its ``model_index.json``. The ``tiny-random`` presets are
built from configs (:mod:`dreambooth_synth.tiny`), saved to a directory and loaded from there through
the very same call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from dreambooth_synth.config import ModelConfig
from dreambooth_synth.tiny import is_preset, materialize_preset

LOG = logging.getLogger(__name__)

_FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}


class ModelLoadError(RuntimeError):
    """The base model cannot be loaded (not found, not downloadable, or an unsupported pipeline)."""


@dataclass
class LoadedModel:
    """A base pipeline on its device, with what training needs to know about it."""

    pipe: Any
    """The diffusers pipeline (its scheduler is the sampling scheduler)."""
    family: str
    """``sd`` or ``sdxl``."""
    name: str
    """The model as configured (``synth.model.name``)."""
    path: str
    """What ``from_pretrained`` loaded (the preset's directory for presets)."""
    device: Any
    weight_dtype: Any
    """dtype of the frozen weights (bfloat16 on GPU with mixed precision, else float32)."""
    autocast_dtype: Any
    """dtype of autocast regions, or ``None`` when computing in float32."""
    noise_scheduler: Any
    """``DDPMScheduler`` from the model's scheduler config: the forward process used in training."""
    scheduler_config: Any
    """The model's own scheduler config (sampling schedulers are built from it)."""
    vae_scale_factor: int
    native_resolution: int
    """The resolution the model was trained at (UNet sample size x VAE factor): 512 SD 1.5, 1024 SDXL."""
    load_seconds: float

    @property
    def unet(self) -> Any:
        return self.pipe.unet

    @property
    def vae(self) -> Any:
        return self.pipe.vae

    @property
    def text_encoders(self) -> list[Any]:
        encoders = [self.pipe.text_encoder]
        if self.family == "sdxl":
            encoders.append(self.pipe.text_encoder_2)
        return [e for e in encoders if e is not None]

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)


def resolve_device(config: ModelConfig) -> Any:
    import torch

    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelLoadError("synth.model.device is cuda but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtypes(config: ModelConfig, device: Any) -> tuple[Any, Any]:
    """(weight dtype, autocast dtype) for the configured mixed precision on ``device``."""
    import torch

    bf16 = config.mixed_precision == "bf16" or (
        config.mixed_precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if bf16:
        return torch.bfloat16, torch.bfloat16
    return torch.float32, None


def _read_model_index(path: str, config: ModelConfig) -> dict[str, Any]:
    from diffusers import DiffusionPipeline

    kwargs = {"revision": config.revision} if config.revision else {}
    try:
        return dict(DiffusionPipeline.load_config(path, **kwargs))
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"cannot load model {config.name!r}: {error}. If this machine cannot reach the Hugging Face Hub, "
            f"download the model elsewhere (huggingface-cli download {config.name}) and set synth.model.name "
            f"to that directory, or set HF_HUB_OFFLINE=1 with a populated HF_HOME cache.") from error


def _dtype_keyword() -> str:
    # diffusers renamed from_pretrained's torch_dtype to dtype (and warns on the old name); older
    # releases, which setup.py still allows, only know torch_dtype.
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load_model(config: ModelConfig, preset_root: str | None = None) -> LoadedModel:
    """Load the configured base pipeline onto its device, frozen, in eval mode.

    Args:
        config: which model, device and precision.
        preset_root: where ``tiny-random`` presets are materialized (default: the system temp directory).
    """
    from diffusers import DDPMScheduler, DiffusionPipeline

    started = time.monotonic()
    device = resolve_device(config)
    if device.type == "cpu" and config.cpu_threads:
        import torch

        torch.set_num_threads(config.cpu_threads)  # a process-wide setting: this process is the worker
    weight_dtype, autocast_dtype = resolve_dtypes(config, device)
    path = materialize_preset(config.name, preset_root) if is_preset(config.name) else config.name
    index = _read_model_index(path, config)
    class_name = index.get("_class_name", "")
    family = _FAMILIES.get(class_name)
    if family is None:
        raise ModelLoadError(f"model {config.name!r} is a {class_name or 'unknown'} pipeline; supported: "
                             f"{', '.join(_FAMILIES)}")
    kwargs: dict[str, Any] = {_dtype_keyword(): weight_dtype}
    if config.revision:
        kwargs["revision"] = config.revision
    if config.variant:
        kwargs["variant"] = config.variant
    if family == "sd" and not config.safety_checker and index.get("safety_checker", [None])[0]:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    except OSError as error:
        raise ModelLoadError(f"cannot load model {config.name!r}: {error}") from error
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in [pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]:
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    scheduler_config = pipe.scheduler.config
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    loaded = LoadedModel(
        pipe=pipe, family=family, name=config.name, path=path, device=device, weight_dtype=weight_dtype,
        autocast_dtype=autocast_dtype, noise_scheduler=noise_scheduler, scheduler_config=scheduler_config,
        vae_scale_factor=vae_scale_factor, native_resolution=int(pipe.unet.config.sample_size) * vae_scale_factor,
        load_seconds=time.monotonic() - started)
    LOG.info("loaded %s (%s, %s) on %s in %s in %.1f s", config.name, class_name,
             f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f} M UNet parameters", device,
             str(weight_dtype).replace("torch.", ""), loaded.load_seconds)
    return loaded
