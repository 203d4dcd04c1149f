"""A subject's photos as training data: decoded, cropped, and encoded to VAE latents once.

diffusers' DreamBooth scripts push every photo through the VAE encoder at every step. Here the photos
are fixed crops (see ``TrainConfig.center_crop``), so each one's latent *distribution* (mean and standard
deviation of the VAE posterior) is computed once per subject, and each step draws a fresh sample from it
-- the same training signal as the scripts, without a VAE forward pass per step.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LOG = logging.getLogger(__name__)


def decode_images(images: Sequence[bytes]) -> tuple[list[Any], list[str]]:
    """PIL RGB images of the decodable inputs, and a note for each one that could not be decoded."""
    from PIL import Image

    decoded, problems = [], []
    for i, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                decoded.append(image.convert("RGB"))
        except Exception as error:  # noqa: BLE001 -- Pillow raises many types for bad bytes
            problems.append(f"image {i}: {type(error).__name__}: {error}")
    return decoded, problems


def to_pixels(images: Sequence[Any], resolution: int, center_crop: bool = True) -> Any:
    """``[N, 3, R, R]`` float tensor in ``[-1, 1]``: shorter side resized to ``R`` (bilinear, antialiased),
    then a centre crop (or the top-left crop without ``center_crop``), as in diffusers' DreamBooth."""
    import numpy as np
    import torch
    from PIL import Image

    tensors = []
    for image in images:
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        resized = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
        left = (resized.width - resolution) // 2 if center_crop else 0
        top = (resized.height - resolution) // 2 if center_crop else 0
        crop = resized.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
        tensors.append(torch.from_numpy(array).permute(2, 0, 1))
    return torch.stack(tensors)


@dataclass
class LatentDistribution:
    """The VAE posterior of each image (diagonal Gaussian), scaled to the UNet's latent space."""

    mean: Any
    """``[N, C, h, w]`` float32, already multiplied by the VAE scaling factor."""
    std: Any

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    def sample(self, indices: Any, generator: Any) -> Any:
        import torch

        mean, std = self.mean[indices], self.std[indices]
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


class EncodeEveryStep:
    """The photos' latents the way diffusers' DreamBooth scripts get them: every step encodes that step's
    photos with the VAE (``synth.speed.cache_encodings=false``). Draws the same samples as
    :class:`LatentDistribution` from the same generator, so only the cost differs."""

    def __init__(self, model: Any, pixels: Any) -> None:
        self._model = model
        self._pixels = pixels

    def __len__(self) -> int:
        return int(self._pixels.shape[0])

    def sample(self, indices: Any, generator: Any) -> Any:
        return encode_latents(self._model, self._pixels[indices]).sample(list(range(len(indices))), generator)


def encode_latents(model: Any, pixels: Any, batch_size: int = 8) -> LatentDistribution:
    """Encode ``pixels`` with the model's VAE once; ``model`` is a :class:`~dreambooth_synth.models.LoadedModel`."""
    import torch

    vae = model.vae
    scaling = float(vae.config.scaling_factor)
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], batch_size):
            chunk = pixels[start:start + batch_size].to(model.device, dtype=vae.dtype)
            posterior = vae.encode(chunk).latent_dist
            means.append(posterior.mean.float() * scaling)
            stds.append(posterior.std.float() * scaling)
    return LatentDistribution(mean=torch.cat(means), std=torch.cat(stds))
