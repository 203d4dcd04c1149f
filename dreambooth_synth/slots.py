"""LoRA adapters in persistent slots: several subjects' adapters on one UNet, each sample routed to its own.

peft attaches one adapter per ``add_adapter`` call and takes it off with ``unload_lora``, which changes
the UNet's modules for every subject: a ``torch.compile``-d UNet would be compiled again each time. Its
mixed-adapter batches (``adapter_names=``) only run in inference ("Cannot pass `adapter_names` when the
model is in training mode"), and go through one adapter after another. So, for the two speed switches
that need it (:attr:`~dreambooth_synth.config.SpeedConfig.compile_unet` and ``clusters_per_batch``), the
UNet's attention projections are wrapped once per worker in :class:`SlotLoRALinear`: ``K`` adapters
stacked in one tensor each (``A: [K, r, in]``, ``B: [K, out, r]``), and a routing vector saying which
slot each row of the batch goes through. For ``K = 1`` the layer computes exactly what peft's LoRA layer
computes (``base(x) + B(A(x)) * alpha / r``); for ``K > 1`` two batched matmuls apply every row's own
adapter, so K subjects train in one UNet call.

The math is that of separate fine-tunes: a row only ever touches its own slot's weights, the loss is the
sum of the subjects' losses (so each slot's gradient is its own subject's), gradients are clipped per
slot, and AdamW works element by element. Between subjects every ``B`` is zero, which makes the UNet the
base model again bit for bit (``x + 0``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


class _Routing:
    """The slot of each row of the current batch, shared by all the slot layers of one UNet."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        """``[N]`` long tensor on the model's device; ``None``: all rows through slot 0 (one slot)."""


class SlotLoRALinear(nn.Module):
    """``base(x) + B[slot](A[slot](x)) * scaling``, the slot chosen per row of the batch."""

    def __init__(self, base: nn.Linear, slots: int, rank: int, alpha: float, routing: _Routing) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        self.routing = routing
        device = base.weight.device
        # Trainable weights stay float32 over bfloat16 base weights (diffusers' cast_training_params).
        self.lora_A = nn.Parameter(torch.zeros(slots, rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(slots, base.out_features, rank, device=device))

    @property
    def slots(self) -> int:
        return int(self.lora_A.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        index = self.routing.index
        if index is None:
            # One slot: the very operations of peft's LoRA layer (lora_B(lora_A(x)) * scaling).
            a, b = self.lora_A[0], self.lora_B[0]
            delta = nn.functional.linear(nn.functional.linear(x.to(a.dtype), a), b)
            return (result + delta * self.scaling).to(result.dtype)
        if x.shape[0] != index.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} rows but {index.shape[0]} routed rows")
        rows = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.lora_A.dtype)
        hidden = torch.bmm(rows, self.lora_A[index].transpose(1, 2))
        delta = torch.bmm(hidden, self.lora_B[index].transpose(1, 2))
        return (result + delta.reshape(*result.shape) * self.scaling).to(result.dtype)


def lora_init(shapes: Sequence[tuple[int, int]], seed: int) -> list[torch.Tensor]:
    """Initial ``lora_A`` weights for adapters of ``(rank, in_features)`` shapes, in order, from ``seed``.

    peft's ``init_lora_weights="gaussian"``: A ~ N(0, 1/r), B = 0. Drawn from a CPU generator of its own,
    so that a subject's initial adapter depends on its seed only -- the same in a peft adapter, in any slot,
    on any device, whatever else used the global random state.
    """
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return [torch.empty(rank, fan_in).normal_(0.0, 1.0 / rank, generator=generator) for rank, fan_in in shapes]


class LoRASlots:
    """``K`` LoRA adapter slots on a UNet's attention projections, attached once and reused.

    Args:
        unet: the UNet (its target ``nn.Linear`` modules are wrapped in place).
        targets: module name suffixes to wrap (``to_q``, ``to_k``, ``to_v``, ``to_out.0``).
        slots: K, how many subjects train together.
        rank: LoRA rank r.
        alpha: LoRA alpha (scale alpha / r).
    """

    def __init__(self, unet: nn.Module, targets: Sequence[str], slots: int, rank: int, alpha: float) -> None:
        self.unet = unet
        self.routing = _Routing()
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        self.layers: list[tuple[str, SlotLoRALinear]] = []
        names = [name for name, module in unet.named_modules()
                 if isinstance(module, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)]
        if not names:
            raise ValueError(f"no {', '.join(targets)} linear layers in the UNet")
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            layer = SlotLoRALinear(getattr(parent, child), slots, rank, alpha, self.routing)
            setattr(parent, child, layer)
            self.layers.append((name, layer))

    @property
    def slots(self) -> int:
        return self.layers[0][1].slots

    def parameters(self) -> list[nn.Parameter]:
        """Every slot weight, ``lora_A`` then ``lora_B`` of each layer in module order (as peft lists them)."""
        return [p for _, layer in self.layers for p in (layer.lora_A, layer.lora_B)]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(layer.rank, layer.base.in_features) for _, layer in self.layers]

    def reset(self, slot: int, seed: int, weights: Sequence[torch.Tensor] | None = None) -> None:
        """Start slot ``slot`` as a fresh adapter seeded by ``seed`` (A gaussian, B zero), or with the given
        initial ``lora_A`` ``weights``."""
        weights = lora_init(self.shapes, seed) if weights is None else weights
        with torch.no_grad():
            for (_, layer), a in zip(self.layers, weights, strict=True):
                layer.lora_A[slot].copy_(a)
                layer.lora_B[slot].zero_()

    def clear(self) -> None:
        """Every B to zero (the UNet is the base model again), gradients dropped, weights frozen."""
        with torch.no_grad():
            for _, layer in self.layers:
                layer.lora_B.zero_()
                for param in (layer.lora_A, layer.lora_B):
                    param.grad = None
                    param.requires_grad_(False)
        self.routing.index = None

    @contextlib.contextmanager
    def route(self, slots: Sequence[int] | None) -> Iterator[None]:
        """Rows of the next UNet calls go through ``slots`` (one per row); ``None``: every row through slot 0."""
        previous = self.routing.index
        self.routing.index = None if slots is None else self._index(tuple(slots))
        try:
            yield
        finally:
            self.routing.index = previous

    def _index(self, slots: tuple[int, ...]) -> torch.Tensor:
        # A training step's routing is the same at every step: copy it to the device once, not at every step
        # (a host-to-device copy of a Python list waits for the device).
        index = self._indices.get(slots)
        if index is None:
            if len(self._indices) >= 64:
                self._indices.clear()
            index = torch.tensor(slots, dtype=torch.long, device=self.layers[0][1].lora_A.device)
            self._indices[slots] = index
        return index

    def remove(self) -> None:
        """Put the original ``nn.Linear`` modules back (the base weights were never touched)."""
        for name, layer in self.layers:
            parent_name, _, child = name.rpartition(".")
            parent = self.unet.get_submodule(parent_name) if parent_name else self.unet
            setattr(parent, child, layer.base)
        self.layers = []


def clip_per_slot(params: Sequence[torch.Tensor], max_norm: float, slots: int) -> torch.Tensor:
    """Clip each slot's gradient to ``max_norm`` on its own (``clip_grad_norm_`` of one subject's adapter):
    the gradients of all slots are stacked in the same tensors, and one subject's large gradient must not
    shrink another's. Returns the ``[K]`` norms before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(slots)
    squares = torch.stack([g.reshape(slots, -1).float().pow(2).sum(dim=1) for g in grads]).sum(dim=0)
    norms = squares.sqrt()
    coefficient = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s formula
    for g in grads:
        g.mul_(coefficient.to(g.dtype).view(slots, *([1] * (g.dim() - 1))))
    return norms
