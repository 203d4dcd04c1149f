"""Why the synthesis of one subject failed. Each error has a ``reason`` code the caller can record
(the pipeline turns it into a reject row with that reason)."""

from __future__ import annotations


class SynthesisError(RuntimeError):
    """A subject could not be synthesized; the worker and the model are fine and the next subject can go on."""

    reason = "synthesis_failed"
    seconds: dict[str, float] | None = None
    """Seconds per part spent on the subject before it failed (set by the synthesizer)."""


class NoUsableImagesError(SynthesisError):
    """None of the subject's images could be decoded."""

    reason = "no_usable_images"


class NonFiniteLossError(SynthesisError):
    """The training loss became NaN or infinite (diverged); the fine-tune is discarded."""

    reason = "non_finite_loss"

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"training loss is {value} at step {step}")
        self.step = step
        self.value = value


class OutOfMemoryError(SynthesisError):
    """The device (or host) ran out of memory for this subject; memory was released for the next one."""

    reason = "out_of_memory"


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA OOM, host ``MemoryError`` and torch's CPU allocator failures."""
    if isinstance(error, MemoryError):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
