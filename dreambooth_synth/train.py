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
* :func:`slot_fine_tuning` -- the same for adapters in persistent slots (:mod:`dreambooth_synth.slots`):
  the slots of the subjects are re-initialized, and zeroed again on exit.
* :func:`train_many` -- the denoising loss on noised latents (epsilon or v-prediction target, from the
  model's scheduler config), plus the class-prior loss when prior preservation is on; AdamW with gradient
  clipping and a warm-up; bf16 autocast on GPU. One subject, or several in adapter slots of one UNet,
  each sample through its own subject's slot; a subject whose loss becomes non-finite stops at once (the
  others go on). :func:`train` is the one-subject call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dreambooth_synth.config import TrainConfig
from dreambooth_synth.data import LatentDistribution
from dreambooth_synth.errors import NonFiniteLossError
from dreambooth_synth.sample import autocast

if TYPE_CHECKING:
    from dreambooth_synth.slots import LoRASlots

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

    from dreambooth_synth.slots import lora_init

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
    # The adapters then start from lora_init(seed), as adapter slots do: a subject gets the same initial
    # adapter on either path (what the tests of the speed switches compare).
    layers = _peft_layers(modules)
    shapes = [tuple(m.lora_A[ADAPTER].weight.shape) for m in layers]
    with torch.no_grad():
        for layer, weight in zip(layers, lora_init(shapes, seed), strict=True):
            layer.lora_A[ADAPTER].weight.copy_(weight)
    params = []
    for module in modules:
        for name, param in module.named_parameters():
            if "lora_" in name:
                # Adapters train in float32 even over bfloat16 base weights (diffusers' cast_training_params).
                param.data = param.data.to(torch.float32)
                param.requires_grad_(True)
                params.append(param)
    return params


def _peft_layers(modules: Sequence[Any]) -> list[Any]:
    """peft LoRA layers holding our adapter, in module order."""
    from torch import nn

    return [m for module in modules for m in module.modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and ADAPTER in m.lora_A]


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


@contextlib.contextmanager
def slot_fine_tuning(model: Any, config: TrainConfig, slots: LoRASlots, seeds: dict[int, int]) -> Iterator[list[Any]]:
    """:func:`fine_tuning` for adapters in persistent slots: slot ``k`` starts as a fresh adapter seeded by
    ``seeds[k]``; yields the parameters to optimize (every slot's, stacked; plus the text encoders' peft
    adapters with ``train_text_encoder``, one subject only). On exit every slot is zero again (the UNet
    computes the base model), gradients are dropped and every weight is frozen; the slots stay attached."""
    import torch

    from dreambooth_synth.slots import lora_init

    if config.mode != "lora":
        raise ValueError("adapter slots are LoRA adapters: train.mode must be lora")
    if config.train_text_encoder and (len(seeds) > 1 or slots.slots > 1):
        raise ValueError("training the text encoder trains one subject at a time")
    encoders = model.text_encoders if config.train_text_encoder else []
    try:
        params = slots.parameters()
        text_params = []
        if config.train_text_encoder:
            from peft import inject_adapter_in_model

            for encoder in encoders:
                inject_adapter_in_model(_lora_config(config, TEXT_ENCODER_LORA_TARGETS), encoder,
                                        adapter_name=ADAPTER)
                for name, param in encoder.named_parameters():
                    if "lora_" in name:
                        param.data = param.data.to(torch.float32)
                        text_params.append(param)
            ((slot, seed),) = seeds.items()
            # One draw for the UNet slot and the text encoders' adapters, in the order fine_tuning draws them.
            layers = _peft_layers(encoders)
            weights = lora_init(slots.shapes + [tuple(m.lora_A[ADAPTER].weight.shape) for m in layers], seed)
            slots.reset(slot, seed, weights[:len(slots.shapes)])
            with torch.no_grad():
                for layer, weight in zip(layers, weights[len(slots.shapes):], strict=True):
                    layer.lora_A[ADAPTER].weight.copy_(weight)
        else:
            for slot, seed in seeds.items():
                slots.reset(slot, seed)
        params = params + text_params
        for param in params:
            param.requires_grad_(True)
        _set_checkpointing(model, config, True)
        yield params
    finally:
        for module in [model.unet, *encoders]:
            module.eval()
        slots.clear()
        _set_checkpointing(model, config, False)
        if config.train_text_encoder:
            from diffusers.utils import recurse_remove_peft_layers

            for encoder in encoders:
                recurse_remove_peft_layers(encoder)
                if hasattr(encoder, "peft_config"):
                    del encoder.peft_config


def make_optimizer(params: Sequence[Any], config: TrainConfig, implementation: str = "auto") -> Any:
    """AdamW over ``params`` with the configured hyper-parameters, in the chosen implementation
    (:attr:`~dreambooth_synth.config.SpeedConfig.optimizer`)."""
    import torch

    kwargs = {"auto": {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    if implementation not in kwargs:
        raise ValueError(f"unknown optimizer implementation {implementation!r}")
    return torch.optim.AdamW(params, lr=config.effective_learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                             weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
                             **kwargs[implementation])


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


@dataclass(frozen=True)
class TrainJob:
    """One subject of :func:`train_many`."""

    instance: Any
    """Latents of the subject's photos: a :class:`~dreambooth_synth.data.LatentDistribution`, or anything
    with its ``__len__`` and ``sample(indices, generator)`` (:class:`~dreambooth_synth.data.EncodeEveryStep`)."""
    instance_prompt: str
    seed: int
    """Seeds the image order, noise and timesteps."""
    prior: Any = None
    """Latents of the class images, for prior preservation."""
    class_prompt: str | None = None
    slot: int = 0
    """The adapter slot the subject trains (with ``slots``)."""
    label: str = ""
    """How log lines name the subject."""


class _Stream:
    """A subject's reproducible draws: image order, latent samples, noise and timesteps -- the same whether
    it trains alone or next to others."""

    def __init__(self, job: TrainJob, device: Any, batch: int, n_timesteps: int) -> None:
        import torch

        self.job = job
        self.generator = torch.Generator(device).manual_seed(job.seed)
        self.order = _Order(len(job.instance), torch.Generator().manual_seed(job.seed))
        self.class_order = (_Order(len(job.prior), torch.Generator().manual_seed(job.seed + 1))
                            if job.prior is not None else None)
        self.batch = batch
        self.n_timesteps = n_timesteps
        self.device = device
        self.losses: list[float] = []

    def draw(self) -> tuple[Any, Any, Any]:
        """(latents, noise, timesteps) of the next step: ``batch`` instance rows, then as many class rows."""
        import torch

        latents = self.job.instance.sample(self.order.take(self.batch), self.generator)
        if self.job.prior is not None and self.class_order is not None:
            latents = torch.cat([latents, self.job.prior.sample(self.class_order.take(self.batch), self.generator)])
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device, dtype=latents.dtype)
        timesteps = torch.randint(0, self.n_timesteps, (latents.shape[0],), generator=self.generator,
                                  device=self.device)
        return latents, noise, timesteps


def train_many(model: Any, config: TrainConfig, params: Sequence[Any], jobs: Sequence[TrainJob], *,
               resolution: int, slots: LoRASlots | None = None, optimizer: str = "auto",
               cache_text: bool = True, check_every: int = 1) -> list[TrainResult | NonFiniteLossError]:
    """Run ``config.steps`` optimizer steps on each subject of ``jobs`` (inside :func:`fine_tuning` or
    :func:`slot_fine_tuning`), all subjects in one UNet batch.

    Args:
        model: the :class:`~dreambooth_synth.models.LoadedModel`.
        config: the training settings.
        params: the parameters to optimize (what the fine-tuning context yields).
        jobs: the subjects; more than one needs ``slots`` with a slot for each.
        resolution: the training resolution (SDXL's size conditioning).
        slots: the adapter slots the subjects train in (``None``: the model's own trainable weights).
        optimizer: AdamW implementation (:attr:`~dreambooth_synth.config.SpeedConfig.optimizer`).
        cache_text: encode the prompts once (frozen text encoders), not at every step.
        check_every: read the losses back from the device (and stop subjects whose loss is no longer
            finite) every this many steps; 1: every step, before the update.

    Returns:
        Per subject, in order: its :class:`TrainResult`, or the :class:`NonFiniteLossError` that stopped it
        (the other subjects went on).
    """
    import torch
    import torch.nn.functional as F

    from dreambooth_synth.slots import clip_per_slot

    if not jobs:
        return []
    if check_every < 1:
        raise ValueError(f"check_every must be at least 1, got {check_every}")
    many = len(jobs) > 1 or (slots is not None and slots.slots > 1)
    if many and slots is None:
        raise ValueError("training several subjects at once needs adapter slots")
    for job in jobs:
        if job.prior is not None and job.class_prompt is None:
            raise ValueError("prior preservation needs the class prompt")
    device = model.device
    lr = config.effective_learning_rate
    opt = make_optimizer(params, config, optimizer)
    warmup = config.lr_warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    # Every subject's prompts, one conditioning row each: [instance, class] per subject.
    prompts: list[str] = []
    prompt_rows: list[tuple[int, int | None]] = []
    for job in jobs:
        prompt_rows.append((len(prompts), len(prompts) + 1 if job.prior is not None else None))
        prompts += [job.instance_prompt] + ([job.class_prompt] if job.prior is not None else [])
    cond = None
    if cache_text and not config.train_text_encoder:
        with torch.no_grad():
            cond = encode_conditioning(model, prompts)  # frozen encoders: once, not every step
    noise_scheduler = model.noise_scheduler
    n_timesteps = int(noise_scheduler.config.num_train_timesteps)
    batch = config.batch_size
    streams = [_Stream(job, device, batch, n_timesteps) for job in jobs]
    failures: dict[int, NonFiniteLossError] = {}
    for module in trained_modules(model, config):
        module.train()
    n_params = sum(p.numel() for p in params) // (slots.slots if slots is not None else 1)
    started = last_log = time.monotonic()
    last_step = 0
    label = jobs[0].label if len(jobs) == 1 else f"{len(jobs)} subjects: "
    pending: list[tuple[int, list[int], Any]] = []  # (step, subjects, their losses on the device)

    def settle() -> None:
        """Read the pending losses back (one device sync), record them, fail the subjects gone non-finite."""
        if not pending:
            return
        values = torch.cat([on_device for _, _, on_device in pending]).tolist()
        at = 0
        for at_step, subjects, _ in pending:
            for i, value in zip(subjects, values[at:at + len(subjects)], strict=True):
                if i in failures:
                    continue
                if math.isfinite(value):
                    streams[i].losses.append(value)
                else:
                    failures[i] = NonFiniteLossError(at_step, value)
            at += len(subjects)
        pending.clear()

    for step in range(1, config.steps + 1):
        active = [i for i in range(len(jobs)) if i not in failures]
        if not active:
            break
        latents, noise, timesteps, rows, route = [], [], [], [], []
        for i in active:
            x, eps, t = streams[i].draw()
            latents.append(x)
            noise.append(eps)
            timesteps.append(t)
            instance_row, class_row = prompt_rows[i]
            rows += [instance_row] * batch + ([class_row] * batch if class_row is not None else [])
            route += [jobs[i].slot] * x.shape[0]
        sizes = [x.shape[0] for x in latents]
        latents_all, noise_all, timesteps_all = torch.cat(latents), torch.cat(noise), torch.cat(timesteps)
        noisy = noise_scheduler.add_noise(latents_all, noise_all, timesteps_all)
        if cond is not None:
            step_cond = cond
        elif config.train_text_encoder:
            step_cond = encode_conditioning(model, prompts)
        else:
            with torch.no_grad():
                step_cond = encode_conditioning(model, prompts)  # diffusers' scripts: every step
        routing = slots.route(route) if many and slots is not None else contextlib.nullcontext()
        with routing, autocast(model):
            pred = model.unet(noisy.to(model.unet.dtype), timesteps_all,
                              **_unet_kwargs(model, step_cond, rows, resolution), return_dict=False)[0]
        if model.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents_all, noise_all, timesteps_all)
        else:
            target = noise_all
        losses = []
        for i, pred_i, target_i in zip(active, pred.float().split(sizes), target.split(sizes), strict=True):
            if jobs[i].prior is not None:
                pred_i, pred_prior = pred_i.chunk(2)
                target_i, target_prior = target_i.chunk(2)
                losses.append(F.mse_loss(pred_i, target_i)
                              + config.prior_loss_weight * F.mse_loss(pred_prior, target_prior))
            else:
                losses.append(F.mse_loss(pred_i, target_i))
        pending.append((step, active, torch.stack(losses).detach()))
        if check_every == 1:
            # Read now, before the update: a non-finite loss never reaches the weights.
            settle()
            finite = [loss for i, loss in zip(active, losses, strict=True) if i not in failures]
        else:
            # Read every few steps: each read waits for the device to finish all queued work, which stalls a
            # GPU at batch 1. A subject whose loss went non-finite in between only updated its own adapter
            # (its own slot, clipped on its own) and is dropped at the read.
            finite = losses
        if not finite:
            break
        # The sum, not the mean: each subject's adapter gets the gradient of its own loss, as when alone.
        total = finite[0] if len(finite) == 1 else torch.stack(finite).sum()
        total.backward()
        if many and slots is not None:
            clip_per_slot(slots.parameters(), config.max_grad_norm, slots.slots)
        else:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        log = step % config.log_every_steps == 0 or step == config.steps
        if step % check_every == 0 or log:
            settle()
        if log:
            now = time.monotonic()
            window = [v for i in active if i not in failures for v in streams[i].losses[-config.log_every_steps:]]
            LOG.info("%strain step %d/%d: loss %.4f (mean of the last %d), %.2f steps/s", label, step,
                     config.steps, sum(window) / max(len(window), 1), config.log_every_steps,
                     (step - last_step) / max(now - last_log, 1e-9))
            last_log, last_step = now, step
    settle()
    del opt, scheduler, cond
    LOG.debug("%strained %d parameters for %d steps in %.1f s", label, n_params, config.steps,
              time.monotonic() - started)
    return [failures.get(i) or TrainResult(steps=len(streams[i].losses), losses=tuple(streams[i].losses),
                                           learning_rate=lr, trainable_parameters=n_params)
            for i in range(len(jobs))]


def train(model: Any, config: TrainConfig, params: Sequence[Any], instance: LatentDistribution,
          instance_prompt: str, *, seed: int, resolution: int, prior: LatentDistribution | None = None,
          class_prompt: str | None = None, label: str = "", optimizer: str = "auto",
          cache_text: bool = True, check_every: int = 1) -> TrainResult:
    """Run ``config.steps`` optimizer steps on one subject (inside :func:`fine_tuning`): :func:`train_many`
    with one job.

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
        optimizer: AdamW implementation.
        cache_text: encode the prompts once, not at every step.
        check_every: read the loss back every this many steps.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite.
    """
    if prior is not None and class_prompt is None:
        raise ValueError("prior preservation needs the class prompt")
    job = TrainJob(instance=instance, instance_prompt=instance_prompt, seed=seed, prior=prior,
                   class_prompt=class_prompt, label=label)
    (result,) = train_many(model, config, params, [job], resolution=resolution, optimizer=optimizer,
                           cache_text=cache_text, check_every=check_every)
    if isinstance(result, NonFiniteLossError):
        raise result
    return result
