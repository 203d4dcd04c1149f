"""Tiny random-weight Stable Diffusion models, built from configs: the ``tiny-random`` presets.

No model weights can be downloaded where this project is built and tested, and the demo profile must
run offline on a laptop CPU in minutes. So, like diffusers' own test suite
(``tests/pipelines/stable_diffusion/test_stable_diffusion.py::get_dummy_components``), we build the
very same classes -- ``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel`` (and for SDXL
``CLIPTextModelWithProjection``), a real CLIP BPE tokenizer -- at a tiny size with a fixed seed, save them
with ``save_pretrained`` and load them back through ``from_pretrained``: every code path after loading
is the one a real model takes. The images they render are noise-like by construction.

The tokenizer is the real CLIP tokenizer (49,408 tokens), written from the BPE merges file that
open_clip ships inside its package (``bpe_simple_vocab_16e6.txt.gz``), so no hub is needed.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import shutil
import tempfile
from typing import Any

LOG = logging.getLogger(__name__)

TINY_SD = "tiny-random"
TINY_SDXL = "tiny-random-xl"
PRESETS = (TINY_SD, TINY_SDXL)

TINY_VERSION = 1
"""Bump when a preset's architecture or seed changes (the materialized directory name includes it)."""

_N_MERGES = 49152 - 256 - 2  # CLIP's BPE: 48,894 merges (open_clip and OpenAI take the same slice)
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def is_preset(name: str) -> bool:
    return name in PRESETS


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def write_clip_tokenizer(directory: str) -> None:
    """Write a Hugging Face ``CLIPTokenizer`` (vocab.json, merges.txt, configs) from open_clip's BPE file."""
    import open_clip

    bpe_path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        merges = handle.read().split("\n")[1:_N_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [_BOS, _EOS]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump({token: i for i, token in enumerate(vocab)}, handle, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS}
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as handle:
        json.dump(special, handle)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                   **special}, handle)


def _text_config(**overrides: Any) -> Any:
    from transformers import CLIPTextConfig

    settings = dict(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=32, hidden_act="quick_gelu")
    settings.update(overrides)
    return CLIPTextConfig(**settings)


def _vae(seed: int) -> Any:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Three levels, two downsamplings: 64 px images make 16x16 latents -- small enough for a CPU, large
    # enough for a UNet with two levels (SD's VAE downsamples 8x; the code reads the factor from the config).
    return AutoencoderKL(block_out_channels=(16, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         norm_num_groups=8, sample_size=64)


def build_tiny_sd(seed: int = 0) -> Any:
    """A tiny ``StableDiffusionPipeline`` (SD 1.5 layout and scheduler, 64 px): a 0.27 M-parameter UNet, a
    0.24 M VAE and a 1.6 M text encoder (most of it the real 49,408-token vocabulary)."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = _vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    # Stable Diffusion 1.5's own scheduler settings.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    with tempfile.TemporaryDirectory() as directory:
        write_clip_tokenizer(directory)
        tokenizer = CLIPTokenizer.from_pretrained(directory)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_tiny_sdxl(seed: int = 0) -> Any:
    """A tiny ``StableDiffusionXLPipeline`` (two text encoders, pooled and time conditioning, 64 px)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids x 8 + the pooled text embedding
        cross_attention_dim=64, norm_num_groups=8)  # the two encoders' hidden states, concatenated
    vae = _vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config())
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    with tempfile.TemporaryDirectory() as directory:
        write_clip_tokenizer(directory)
        tokenizer = CLIPTokenizer.from_pretrained(directory)
        tokenizer_2 = CLIPTokenizer.from_pretrained(directory)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)


def materialize_preset(preset: str, root: str | None = None, seed: int = 0) -> str:
    """The directory of ``preset`` saved with ``save_pretrained`` (built on first use, then reused).

    The build goes to a temporary directory renamed into place, so processes that race on one machine
    each see a complete model (they build identical weights from the fixed seed).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    root = root or os.path.join(tempfile.gettempdir(), "icl-pipeline-models")
    target = os.path.join(root, f"{preset}-v{TINY_VERSION}-seed{seed}")
    if os.path.exists(os.path.join(target, "model_index.json")):
        return target
    os.makedirs(root, exist_ok=True)
    building = tempfile.mkdtemp(dir=root, prefix=f".{preset}-")
    try:
        pipe = build_tiny_sd(seed) if preset == TINY_SD else build_tiny_sdxl(seed)
        pipe.save_pretrained(building)
        try:
            os.rename(building, target)
            LOG.info("built the %s model in %s", preset, target)
        except OSError:
            if not os.path.exists(os.path.join(target, "model_index.json")):
                raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(building)
    return target
