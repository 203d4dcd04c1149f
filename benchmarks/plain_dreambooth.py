"""The plain baseline of the synthesis benchmarks: diffusers' DreamBooth-LoRA loop, as its example runs it.

This is ``examples/dreambooth/train_dreambooth_lora.py`` (diffusers 0.31+) with its README's settings
(``--resolution=512 --train_batch_size=1 --learning_rate=1e-4 --lr_scheduler=constant --lr_warmup_steps=0
--max_train_steps=500``, no ``--mixed_precision``, so float32), reduced to its compute on one device:

* the dataset: every step opens the photo, applies ``exif_transpose``, converts it to RGB and runs
  ``Resize / CenterCrop / ToTensor / Normalize``, and tokenizes the instance prompt, through a
  ``DataLoader(batch_size=1, shuffle=True)``;
* the loop: peft LoRA (rank r, ``lora_alpha=r``, gaussian init) on ``to_k/to_q/to_v/to_out.0``; AdamW
  (torch's default implementation); every step encodes the photo with the VAE and the prompt with the text
  encoder, noises the latents, runs the UNet, MSE to the noise, ``loss.detach().item()`` (the progress
  bar), backward, ``clip_grad_norm_(1.0)``, optimizer and constant-rate scheduler steps;
* the final inference: the DPM-Solver++ scheduler, ``num_inference_steps=25``, one image per pipeline
  call under ``torch.cuda.amp.autocast()`` (float16 autocast on a GPU, nothing on a CPU), at the training
  resolution (the script renders at the model's native size, which is that resolution: 512 px for SD 1.5).

Left out, because they are I/O rather than compute: accelerate's wrappers (one process, no gradient
accumulation), checkpoints every 100 steps, intermediate validation, saving the LoRA weights and reloading
the pipeline for the final inference (the trained pipeline renders directly).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
"""The script's LoRA targets (``add_k_proj``/``add_v_proj`` exist only in some UNets, not SD 1.5's)."""


class DreamBoothDataset:
    """The script's ``DreamBoothDataset`` without prior preservation, over photos held in memory."""

    def __init__(self, photos: Sequence[Any], prompt: str, tokenizer: Any, size: int, center_crop: bool = True) -> None:
        from torchvision import transforms

        self.photos = list(photos)
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.image_transforms = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(size) if center_crop else transforms.RandomCrop(size),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ])

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL.ImageOps import exif_transpose

        image = exif_transpose(self.photos[index % len(self.photos)])
        if image.mode != "RGB":
            image = image.convert("RGB")
        tokens = self.tokenizer(self.prompt, truncation=True, padding="max_length",
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        return {"instance_images": self.image_transforms(image), "instance_prompt_ids": tokens.input_ids,
                "instance_attention_mask": tokens.attention_mask}


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {"pixel_values": torch.stack([e["instance_images"] for e in examples]).contiguous().float(),
            "input_ids": torch.cat([e["instance_prompt_ids"] for e in examples]),
            "attention_mask": torch.cat([e["instance_attention_mask"] for e in examples])}


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_dreambooth_lora(pipe: Any, photos: Sequence[Any], instance_prompt: str, prompts: Sequence[str],
                          seeds: Sequence[int], *, steps: int, rank: int = 4, learning_rate: float = 1e-4,
                          resolution: int = 512, sample_steps: int = 25, guidance_scale: float = 7.5,
                          seed: int = 0) -> dict[str, Any]:
    """Fine-tune ``pipe``'s UNet on ``photos`` for ``steps`` steps the script's way, then render one image per
    (prompt, seed), one per pipeline call; the pipeline is left as it came (adapter unloaded).

    Returns ``seconds`` (``setup``: the adapter, optimizer and data loader; ``train``: the steps; ``sample``;
    ``total``), the training ``losses`` and the rendered ``images``.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    device = unet.device
    weight_dtype = unet.dtype
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    sampling_scheduler = pipe.scheduler
    torch.manual_seed(seed)  # the script's set_seed(args.seed)
    started = time.perf_counter()
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=[t for t in TARGETS if any(n.endswith(t) for n, _ in
                                                                         unet.named_modules())]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.to(torch.float32)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    dataset = DreamBoothDataset(photos, instance_prompt, tokenizer, resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=True, collate_fn=collate_fn, num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    losses: list[float] = []
    try:
        unet.train()
        looping = time.perf_counter()
        while len(losses) < steps:
            for batch in loader:
                pixel_values = batch["pixel_values"].to(device, dtype=weight_dtype)
                model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(model_input)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],),
                                          device=model_input.device).long()
                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"].to(device), attention_mask=None,
                                                     return_dict=False)[0]
                model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, class_labels=None,
                                  return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(model_input, noise, timesteps)
                else:
                    target = noise
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                losses.append(loss.detach().item())
                if len(losses) >= steps:
                    break
        unet.eval()
        _synchronize(device)
        trained = time.perf_counter()
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        generator = torch.Generator(device=device).manual_seed(seed)
        fp16 = (torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda"
                else contextlib.nullcontext())  # torch.cuda.amp.autocast(), without its deprecation warning
        images = []
        with torch.no_grad():
            for prompt, image_seed in zip(prompts, seeds, strict=True):
                generator.manual_seed(int(image_seed))
                with fp16:
                    images.append(pipe(prompt, num_inference_steps=sample_steps, guidance_scale=guidance_scale,
                                       height=resolution, width=resolution, generator=generator).images[0])
        _synchronize(device)
        finished = time.perf_counter()
    finally:
        unet.eval()
        unet.unload_lora()
        pipe.scheduler = sampling_scheduler
        for param in unet.parameters():
            param.requires_grad_(False)
    return {"seconds": {"setup": round(looping - started, 4), "train": round(trained - looping, 4),
                        "sample": round(finished - trained, 4), "total": round(finished - started, 4)},
            "losses": losses, "images": images}
