"""Fine-tuning a base model on one subject: LoRA adapters or the full UNet, and the training loop.

The logic is that of diffusers' ``examples/dreambooth/train_dreambooth_lora.py`` (and
``train_dreambooth.py`` for the full fine-tune, ``train_dreambooth_lora_sdxl.py`` for SDXL
conditioning), lifted into functions that take a :class:`~dreambooth_synth.config.TrainConfig` instead
of reading a global ``args``:

* :func:`fine_tuning` -- a context manager that makes the right parameters trainable (peft LoRA adapters
  on the UNet attention projections ``to_q/to_k/to_v/to_out.0``, optionally on the text encoders'
  ``q/k/v/out_proj``; or every UNet weight in full mode) and, on exit, puts the model back exactly as it
  was: adapters unloaded (the original modules back in place), or full weights copied back from a CPU
  snapshot. Whatever happens inside -- including a diverged loss or an out-of-memory error.
* :func:`train` -- the denoising loss on noised latents (epsilon or v-prediction target, from the
  model's scheduler config), plus the class-prior loss when prior preservation is on; AdamW with gradient
  clipping and a warm-up; bf16 autocast on GPU. A non-finite loss stops training at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dreambooth_synth.config import TrainConfig
from dreambooth_synth.data import LatentDistribution
from dreambooth_synth.errors import NonFiniteLossError
from dreambooth_synth.sample import autocast

LOG = logging.getLogger(__name__)

ADAPTER = "dreambooth"
UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class TrainResult:
    steps: int
    losses: tuple[float, ...]
    """The loss of every step, in order."""
    learning_rate: float
    trainable_parameters: int

    @property
    def final_loss(self) -> float:
        """Mean loss of the last tenth of the steps (one step's loss is noise: a random timestep)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return float(sum(tail) / len(tail))

    @property
    def initial_loss(self) -> float:
        """Mean loss of the first tenth of the steps."""
        head = self.losses[:max(1, len(self.losses) // 10)]
        return float(sum(head) / len(head))


# --- what is trained, and putting it back ---------------------------------------------------------------


class WeightSnapshot:
    """A CPU copy of modules' weights (pinned on a CUDA host, for fast copies back), restored exactly."""

    def __init__(self, modules: Sequence[Any], pin: bool) -> None:
        import torch

        self._modules = list(modules)
        self._saved = []
        with torch.no_grad():
            for module in self._modules:
                state = {}
                for key, value in module.state_dict().items():
                    copy = value.detach().to("cpu", copy=True)
                    state[key] = copy.pin_memory() if pin else copy
                self._saved.append(state)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for state in self._saved for t in state.values())

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for module, state in zip(self._modules, self._saved, strict=True):
                module.load_state_dict(state, strict=True)  # copies into the existing tensors


def trained_modules(model: Any, config: TrainConfig) -> list[Any]:
    """The modules whose weights a fine-tune changes (what full mode snapshots)."""
    return [model.unet] + (model.text_encoders if config.train_text_encoder else [])


def _lora_config(config: TrainConfig, targets: Sequence[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=config.lora_rank, lora_alpha=config.effective_lora_alpha, init_lora_weights="gaussian",
                      target_modules=list(targets))


def _attach_lora(model: Any, config: TrainConfig, seed: int) -> list[Any]:
    import torch
    from peft import inject_adapter_in_model

    modules = [model.unet]
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    # peft draws the initial lora_A weights from torch's global generator: seed it (in a fork, so the
    # caller's random state is left alone) to make a subject's fine-tune reproducible.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.unet.add_adapter(_lora_config(config, UNET_LORA_TARGETS), adapter_name=ADAPTER)
        if config.train_text_encoder:
            for encoder in model.text_encoders:
                # peft directly rather than transformers' add_adapter, whose peft version floor moves faster.
                inject_adapter_in_model(_lora_config(config, TEXT_ENCODER_LORA_TARGETS), encoder,
                                        adapter_name=ADAPTER)
                modules.append(encoder)
    params = []
    for module in modules:
        for name, param in module.named_parameters():
            if "lora_" in name:
                # Adapters train in float32 even over bfloat16 base weights (diffusers' cast_training_params).
                param.data = param.data.to(torch.float32)
                param.requires_grad_(True)
                params.append(param)
    return params


def _remove_lora(model: Any) -> None:
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    model.unet.unload_lora()  # puts the original Linear modules back (their weights were never touched)
    for encoder in model.text_encoders:
        if any(isinstance(m, BaseTunerLayer) for m in encoder.modules()):
            recurse_remove_peft_layers(encoder)
        if hasattr(encoder, "peft_config"):
            del encoder.peft_config


def _set_checkpointing(model: Any, config: TrainConfig, enabled: bool) -> None:
    if not config.gradient_checkpointing:
        return
    if enabled:
        model.unet.enable_gradient_checkpointing()
    else:
        model.unet.disable_gradient_checkpointing()
    if config.train_text_encoder:
        for encoder in model.text_encoders:
            # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*.
            prefix = "activation" if hasattr(encoder, "activation_checkpointing_enable") else "gradient"
            getattr(encoder, f"{prefix}_checkpointing_{'enable' if enabled else 'disable'}")()


@contextlib.contextmanager
def fine_tuning(model: Any, config: TrainConfig, snapshot: WeightSnapshot | None = None,
                seed: int = 0) -> Iterator[list[Any]]:
    """Make the model trainable for one subject; yields the parameters to optimize.

    ``seed`` seeds the initial LoRA weights.

    On exit (normal or not) the model is the base model again: LoRA adapters are unloaded, or, in full
    mode, ``snapshot`` (taken once, before the first subject) is copied back. Gradients are dropped and
    every weight is frozen again.
    """
    if config.mode == "full" and snapshot is None:
        raise ValueError("full fine-tuning needs a WeightSnapshot of the base weights to restore")
    modules = trained_modules(model, config)
    try:
        if config.mode == "lora":
            params = _attach_lora(model, config, seed)
        else:
            params = [p for module in modules for p in module.parameters()]
            for param in params:
                param.requires_grad_(True)
        _set_checkpointing(model, config, True)
        yield params
    finally:
        for module in modules:
            module.eval()
            for param in module.parameters():
                param.grad = None
                param.requires_grad_(False)
        _set_checkpointing(model, config, False)
        if config.mode == "lora":
            _remove_lora(model)
        elif snapshot is not None:
            snapshot.restore()


# --- the loop ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conditioning:
    hidden: Any
    """``[P, T, D]`` text encoder hidden states, one row per prompt."""
    pooled: Any = None
    """``[P, D']`` pooled text embeddings (SDXL), else ``None``."""


def encode_conditioning(model: Any, prompts: Sequence[str]) -> Conditioning:
    """The UNet's text conditioning of ``prompts``, through the pipeline's own ``encode_prompt`` (so SD's
    last hidden state and SDXL's two-encoder penultimate states plus pooled embedding are what sampling uses)."""
    if model.family == "sdxl":
        hidden, _, pooled, _ = model.pipe.encode_prompt(
            prompt=list(prompts), device=model.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Conditioning(hidden, pooled)
    hidden, _ = model.pipe.encode_prompt(list(prompts), model.device, 1, False)
    return Conditioning(hidden)


class _Order:
    """Indices of ``n`` items in a fresh random order each epoch (a DataLoader with ``shuffle=True``)."""

    def __init__(self, n: int, generator: Any) -> None:
        self._n = n
        self._generator = generator
        self._queue: list[int] = []

    def take(self, k: int) -> list[int]:
        import torch

        out = []
        while len(out) < k:
            if not self._queue:
                self._queue = torch.randperm(self._n, generator=self._generator).tolist()
            out.append(self._queue.pop())
        return out


def _unet_kwargs(model: Any, cond: Conditioning, rows: list[int], resolution: int) -> dict[str, Any]:
    import torch

    kwargs: dict[str, Any] = {"encoder_hidden_states": cond.hidden[rows]}
    if model.family == "sdxl":
        # (original size, crop top-left, target size): the photos are resized and centre-cropped to a
        # square, which is what SDXL sees at (R, R), (0, 0), (R, R).
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(rows),
                                device=model.device, dtype=cond.hidden.dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled[rows], "time_ids": time_ids}
    return kwargs


def evaluate_loss(model: Any, latents: LatentDistribution, prompt: str, *, seed: int, resolution: int,
                  n: int = 16) -> float:
    """The denoising loss of ``latents`` under ``prompt`` on ``n`` fixed (latent sample, noise, timestep)
    draws per image: the same draws every time it is called with the same ``seed``, so it measures what
    the model learnt, without the per-step noise of the training loss."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator(model.device).manual_seed(seed)
    n_timesteps = int(model.noise_scheduler.config.num_train_timesteps)
    total = 0.0
    with torch.no_grad():
        cond = encode_conditioning(model, [prompt])
        for _ in range(n):
            x = latents.sample(list(range(len(latents))), generator)
            noise = torch.randn(x.shape, generator=generator, device=model.device, dtype=x.dtype)
            timesteps = torch.randint(0, n_timesteps, (x.shape[0],), generator=generator, device=model.device)
            noisy = model.noise_scheduler.add_noise(x, noise, timesteps)
            with autocast(model):
                pred = model.unet(noisy.to(model.unet.dtype), timesteps,
                                  **_unet_kwargs(model, cond, [0] * x.shape[0], resolution), return_dict=False)[0]
            target = (model.noise_scheduler.get_velocity(x, noise, timesteps)
                      if model.prediction_type == "v_prediction" else noise)
            total += float(F.mse_loss(pred.float(), target))
    return total / n


def train(model: Any, config: TrainConfig, params: Sequence[Any], instance: LatentDistribution,
          instance_prompt: str, *, seed: int, resolution: int, prior: LatentDistribution | None = None,
          class_prompt: str | None = None, label: str = "") -> TrainResult:
    """Run ``config.steps`` optimizer steps on one subject (inside :func:`fine_tuning`).

    Args:
        model: the :class:`~dreambooth_synth.models.LoadedModel`.
        config: the training settings.
        params: the parameters to optimize (what :func:`fine_tuning` yields).
        instance: latents of the subject's photos.
        instance_prompt: their prompt ("a photo of sks teapot").
        seed: seeds the image order, noise and timesteps.
        resolution: the training resolution (SDXL's size conditioning).
        prior: latents of the class images, for prior preservation.
        class_prompt: their prompt ("a photo of teapot").
        label: how log lines name the subject.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite.
    """
    import torch
    import torch.nn.functional as F

    if prior is not None and class_prompt is None:
        raise ValueError("prior preservation needs the class prompt")
    device = model.device
    lr = config.effective_learning_rate
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    warmup = config.lr_warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    prompts = [instance_prompt] + ([class_prompt] if prior is not None else [])
    cond = None
    if not config.train_text_encoder:
        with torch.no_grad():
            cond = encode_conditioning(model, prompts)  # frozen encoders: once, not every step
    noise_scheduler = model.noise_scheduler
    n_timesteps = int(noise_scheduler.config.num_train_timesteps)
    generator = torch.Generator(device).manual_seed(seed)
    order = _Order(len(instance), torch.Generator().manual_seed(seed))
    class_order = _Order(len(prior), torch.Generator().manual_seed(seed + 1)) if prior is not None else None
    batch = config.batch_size
    rows = [0] * batch + ([1] * batch if prior is not None else [])
    for module in trained_modules(model, config):
        module.train()
    n_params = sum(p.numel() for p in params)
    losses: list[float] = []
    started = last_log = time.monotonic()
    last_step = 0
    for step in range(1, config.steps + 1):
        latents = instance.sample(order.take(batch), generator)
        if prior is not None and class_order is not None:
            latents = torch.cat([latents, prior.sample(class_order.take(batch), generator)])
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        timesteps = torch.randint(0, n_timesteps, (latents.shape[0],), generator=generator, device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        step_cond = cond if cond is not None else encode_conditioning(model, prompts)
        with autocast(model):
            pred = model.unet(noisy.to(model.unet.dtype), timesteps,
                              **_unet_kwargs(model, step_cond, rows, resolution), return_dict=False)[0]
        if model.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = pred.float()
        if prior is not None:
            pred, pred_prior = pred.chunk(2)
            target, target_prior = target.chunk(2)
            loss = F.mse_loss(pred, target) + config.prior_loss_weight * F.mse_loss(pred_prior, target_prior)
        else:
            loss = F.mse_loss(pred, target)
        value = float(loss.detach().item())
        if not math.isfinite(value):
            raise NonFiniteLossError(step, value)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value)
        if step % config.log_every_steps == 0 or step == config.steps:
            now = time.monotonic()
            window = losses[-config.log_every_steps:]
            LOG.info("%strain step %d/%d: loss %.4f (mean of the last %d), %.2f steps/s", label, step,
                     config.steps, sum(window) / len(window), len(window),
                     (step - last_step) / max(now - last_log, 1e-9))
            last_log, last_step = now, step
    del optimizer, scheduler, cond
    LOG.debug("%strained %d parameters for %d steps in %.1f s", label, n_params, config.steps,
              time.monotonic() - started)
    return TrainResult(steps=len(losses), losses=tuple(losses), learning_rate=lr, trainable_parameters=n_params)
