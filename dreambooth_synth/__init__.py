"""Per-subject DreamBooth with diffusers: fine-tune a base text-to-image model on a subject's photos
(LoRA by default, full UNet optional) and render new prompts of it.

A library that knows nothing of Beam (the pipeline's ``transforms/synthesize.py`` drives it): frozen
config dataclasses in, typed results out, shared storage injected. Start with
:class:`~dreambooth_synth.synthesizer.Synthesizer`.
"""

from dreambooth_synth.config import DEFAULT_MODEL, SDXL_MODEL, ModelConfig, SampleConfig, SpeedConfig, TrainConfig
from dreambooth_synth.errors import NonFiniteLossError, NoUsableImagesError, OutOfMemoryError, SynthesisError
from dreambooth_synth.models import LoadedModel, ModelLoadError, load_model
from dreambooth_synth.prior import ClassImageCache
from dreambooth_synth.storage import LocalStorage, SharedStorage
from dreambooth_synth.synthesizer import PARTS, Render, Subject, SynthesisResult, Synthesizer

__all__ = [
    "DEFAULT_MODEL", "SDXL_MODEL", "ModelConfig", "SampleConfig", "SpeedConfig", "TrainConfig", "NoUsableImagesError",
    "NonFiniteLossError", "OutOfMemoryError", "SynthesisError", "LoadedModel", "ModelLoadError", "load_model",
    "ClassImageCache", "LocalStorage", "SharedStorage", "PARTS", "Render", "Subject", "SynthesisResult",
    "Synthesizer",
]
