"""Settings of per-subject DreamBooth training and sampling, as frozen dataclasses.

Four sections, each validated in ``__post_init__``: :class:`ModelConfig` (which base model, on which
device, in which precision), :class:`TrainConfig` (how a subject is learned), :class:`SampleConfig`
(how its prompts are rendered) and :class:`SpeedConfig` (how fast: switches that change the cost of a
subject, not what is learnt or rendered, each checked against the plain path by a test). The pipeline
nests them under its ``synth`` section (``synth.model.name``, ``synth.train.steps``, ...);
``docs/defaults.md`` gives the reasoning behind each default. Nothing here imports torch, so building
and validating a config is cheap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"""The default base model: Stable Diffusion 1.5 (the DreamBooth-LoRA reference setting), from the Hub
repository that mirrors the original ``runwayml/stable-diffusion-v1-5``."""

SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
"""The SDXL base model, the supported higher-quality alternative (4x the pixels, ~3x the time)."""

SCHEDULERS = ("default", "dpm++", "ddim", "euler", "euler_a", "pndm", "unipc")


def field(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with the help text that ``icl-pipeline config --list`` shows.

    (The same convention as ``transforms.common.option``; repeated here because this library does not
    depend on the pipeline.)
    """
    metadata = {"help": help}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelConfig:
    """The base text-to-image model every subject is fine-tuned from (``synth.model``)."""

    name: str = field(DEFAULT_MODEL, "diffusers model: a Hub id, a local directory or any path from_pretrained "
                                     "reads (Stable Diffusion 1.x/2.x and SDXL pipelines), or a preset: "
                                     "tiny-random (tiny SD built from configs, no download; demo and tests), "
                                     f"tiny-random-xl. Default: SD 1.5; {SDXL_MODEL} for SDXL.")
    revision: str = field("", "Hub revision (commit) to pin the model to; empty for the default branch.")
    variant: str = field("", "Weights variant to load (fp16 halves the download of SD 1.5); empty for the "
                             "full-precision files.")
    device: Literal["auto", "cpu", "cuda"] = field("auto", "Where the model runs: auto uses CUDA when visible.")
    mixed_precision: Literal["auto", "no", "bf16"] = field(
        "auto", "auto: bfloat16 weights and autocast on a GPU that supports it, float32 on CPU. Trainable "
                "weights (LoRA adapters, the UNet in full mode) always stay float32.")
    safety_checker: bool = field(True, "Keep the model's safety checker where it has one (SD 1.x): flagged "
                                       "renders come back black and are marked nsfw in candidates/.")
    cpu_threads: int = field(0, "On CPU: torch intra-op threads of the worker process (0: torch's default). "
                                "Small models run best on 1: more threads only wait on each other.")

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("name must name a model (a Hub id, a directory or a preset)")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be >= 0, got {self.cpu_threads}")


@dataclass(frozen=True)
class TrainConfig:
    """How one subject is learned from its 3-5 real photos (``synth.train``)."""

    mode: Literal["lora", "full"] = field("lora", "lora: LoRA adapters on the UNet attention projections (base "
                                                  "weights untouched); full: the whole UNet, restored from a "
                                                  "pinned CPU copy after each cluster.")
    steps: int = field(1000, "Optimizer steps per subject (the reference recipe: about a thousand).")
    learning_rate: float | None = field(None, "AdamW learning rate; empty: 1e-4 in LoRA mode, 5e-6 in full mode "
                                              "(the diffusers DreamBooth defaults).")
    lora_rank: int = field(4, "LoRA rank r (diffusers' DreamBooth-LoRA default).")
    lora_alpha: float | None = field(None, "LoRA alpha; empty: equal to the rank (scale 1), as in diffusers.")
    train_text_encoder: bool = field(False, "Also train the text encoder(s): LoRA adapters on their attention "
                                            "projections, or all their weights in full mode.")
    batch_size: int = field(1, "Instance images per step (plus as many class images with prior preservation).")
    resolution: int | None = field(None, "Training resolution in pixels (square crops); empty: the model's "
                                         "native size (512 for SD 1.5, 1024 for SDXL).")
    center_crop: bool = field(True, "Centre-crop the photos (the subject is usually centred). Crops are fixed, "
                                    "which is what lets the VAE latents be computed once per subject.")
    gradient_checkpointing: bool = field(False, "Recompute activations in the backward pass: about 30% slower, "
                                                "much less memory (turn on for full mode or SDXL on 24 GB).")
    prior_preservation: bool = field(False, "Add the class-prior loss on images of the class rendered by the "
                                            "base model (cached per class noun and shared by every cluster).")
    prior_loss_weight: float = field(1.0, "Weight of the class-prior loss (DreamBooth: 1).")
    num_class_images: int = field(100, "Class images rendered per class noun for prior preservation "
                                       "(diffusers default).")
    identifier: str = field("sks", "Rare token that names the subject (DreamBooth's choice in diffusers).")
    instance_prompt: str = field("a photo of {identifier} {class_noun}", "Prompt of the real photos.")
    class_prompt: str = field("a photo of {class_noun}", "Prompt of the class images.")
    adam_beta1: float = field(0.9, "AdamW beta1.")
    adam_beta2: float = field(0.999, "AdamW beta2.")
    adam_weight_decay: float = field(1e-2, "AdamW weight decay (diffusers default).")
    adam_epsilon: float = field(1e-8, "AdamW epsilon.")
    max_grad_norm: float = field(1.0, "Gradient clipping norm.")
    lr_warmup_steps: int = field(0, "Linear warm-up steps, then a constant rate (diffusers default: constant).")
    seed: int = field(0, "Seed of the training noise, timesteps and image order; combined with the cluster "
                         "id so that each cluster has its own reproducible stream.")
    log_every_steps: int = field(100, "Log the step and the mean loss every this many steps.")

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "lora_rank": self.lora_rank, "batch_size": self.batch_size,
                    "num_class_images": self.num_class_images, "log_every_steps": self.log_every_steps}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a multiple of 8 (at least 8), got {self.resolution}")
        if self.prior_loss_weight < 0 or self.max_grad_norm <= 0 or self.lr_warmup_steps < 0:
            raise ValueError("prior_loss_weight and lr_warmup_steps must be >= 0, max_grad_norm > 0")
        if not self.identifier.strip() or any(c.isspace() for c in self.identifier.strip()):
            raise ValueError(f"identifier must be one word, got {self.identifier!r}")
        for name in ("instance_prompt", "class_prompt"):
            template = getattr(self, name)
            if "{class_noun}" not in template:
                raise ValueError(f"{name} must contain {{class_noun}}, got {template!r}")
        if "{identifier}" not in self.instance_prompt:
            raise ValueError(f"instance_prompt must contain {{identifier}}, got {self.instance_prompt!r}")

    @property
    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.mode == "lora" else 5e-6

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)


@dataclass(frozen=True)
class SampleConfig:
    """How a fine-tuned subject renders its prompts (``synth.sample``)."""

    scheduler: str = field("dpm++", f"Sampler: {', '.join(SCHEDULERS)} (default: the model's own). "
                                    "DPM-Solver++ reaches full quality in 20-25 steps.")
    steps: int = field(25, "Denoising steps per image.")
    guidance_scale: float = field(7.5, "Classifier-free guidance scale (the Stable Diffusion default).")
    negative_prompt: str = field("blurry, low quality, deformed, watermark, text",
                                 "Negative prompt of every render (steers away from the usual web-photo "
                                 "defects); empty for none.")
    images_per_prompt: int = field(4, "K: images rendered per prompt, each with its own seed from (cluster "
                                      "id, prompt, k).")
    batch_size: int = field(8, "Images per pipeline call (doubled inside by classifier-free guidance); 0: all of "
                               "a cluster's renders (of all its prompts) in one call.")
    width: int | None = field(None, "Render width in pixels; empty: the training resolution.")
    height: int | None = field(None, "Render height in pixels; empty: the training resolution.")
    image_format: Literal["png", "jpeg"] = field("png", "Encoding of rendered images: png (lossless; the renders "
                                                        "are training targets) or jpeg.")
    jpeg_quality: int = field(95, "JPEG quality when image_format is jpeg.")

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 0 (0: all renders in one call), got {self.batch_size}")
        for name in ("steps", "images_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name} must be a multiple of 8 (at least 8), got {value}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be within 1..100, got {self.jpeg_quality}")


OPTIMIZER_IMPLEMENTATIONS = ("auto", "for-loop", "foreach", "fused")
ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class SpeedConfig:
    """How fast subjects are synthesized (``synth.speed``): each switch changes the cost, not the result.

    Every switch is measured against the plain diffusers DreamBooth-LoRA loop by
    ``benchmarks/gpu_check.sh``, and tested on CPU to give the same losses and renders as the plain path
    within a stated tolerance. bfloat16 is ``synth.model.mixed_precision``; batched sampling is
    ``synth.sample.batch_size``.
    """

    attention: Literal["sdpa", "eager"] = field(
        "sdpa", "Attention of the UNet and VAE: sdpa (torch's scaled_dot_product_attention: flash or memory-efficient "
                "kernels on a GPU) or eager (softmax(QK^T)V written out, diffusers' AttnProcessor).")
    cache_encodings: bool = field(
        True, "Encode a subject's photos with the VAE (their latent distribution) and its prompts with the text "
              "encoder once per subject; false: every step, as diffusers' DreamBooth scripts do.")
    optimizer: Literal["auto", "for-loop", "foreach", "fused"] = field(
        "auto", "AdamW implementation: fused (one kernel for all parameters), foreach (one kernel per operation over "
                "all parameters), for-loop (one parameter at a time) or auto (torch's choice: foreach on a GPU).")
    loss_check_every: int = field(
        1, "Read the training loss back from the device every this many steps (each read waits until the GPU "
           "has done all queued work, which leaves it idle while the next step is queued); a subject whose loss "
           "turned non-finite stops at the next read. 1: every step, as the scripts' progress bar does.")
    compile_unet: bool = field(
        False, "torch.compile the UNet once per worker and reuse it for every subject. LoRA adapters then stay on "
               "the UNet for the worker's life (re-initialized for each subject, zero between subjects), so the "
               "compiled graphs stay valid; the first subject pays the compilation (about a minute on a GPU).")
    compile_backend: str = field("inductor", "torch.compile backend (inductor on a GPU; aot_eager traces without "
                                             "generating code, for checks on machines without a compiler).")
    clusters_per_batch: int = field(
        1, "LoRA mode: train (and render) this many subjects together, each in its own adapter slot of one "
           "UNet: one batch holds every subject's samples and each sample goes through its own subject's "
           "adapter. Larger batches use the GPU better than batch 1 does; 1: one subject at a time.")

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.optimizer not in OPTIMIZER_IMPLEMENTATIONS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_IMPLEMENTATIONS)}, "
                             f"got {self.optimizer!r}")
        if self.loss_check_every < 1:
            raise ValueError(f"loss_check_every must be at least 1, got {self.loss_check_every}")
        if self.clusters_per_batch < 1:
            raise ValueError(f"clusters_per_batch must be at least 1, got {self.clusters_per_batch}")
        if not self.compile_backend.strip():
            raise ValueError("compile_backend must name a torch.compile backend")

    @property
    def adapter_slots(self) -> bool:
        """Whether LoRA adapters live in persistent slots (compiled UNet, or several subjects per batch)."""
        return self.compile_unet or self.clusters_per_batch > 1

    def check(self, train: TrainConfig) -> None:
        """Raise ``ValueError`` when these switches do not go with ``train``."""
        if self.clusters_per_batch > 1 and (train.mode != "lora" or train.train_text_encoder):
            raise ValueError("speed.clusters_per_batch > 1 trains LoRA adapters of the UNet only: it needs "
                             "train.mode lora and train.train_text_encoder false")
