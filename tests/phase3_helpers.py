"""Helpers for the phase-3 tests: candidates of real clusters, hand-made scores, scoring units."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from typing import Any

from PIL import Image

from schemas.ids import stable_id
from schemas.records import (
    Candidate,
    Cluster,
    SampleSettings,
    ScoredCandidate,
    SynthSeconds,
    TargetScores,
    TrainSettings,
)

TRAIN = TrainSettings(model="tiny-random", mode="lora", steps=4, learning_rate=0.01, lora_rank=4,
                      train_text_encoder=False, batch_size=1, resolution=64, prior_preservation=False,
                      prior_loss_weight=None, precision="float32", seed=1, instance_prompt="a photo of sks teapot")
SAMPLE_SETTINGS = SampleSettings(scheduler="dpm++", steps=2, guidance_scale=7.5, negative_prompt="blurry",
                                 images_per_prompt=1)
SECONDS = SynthSeconds(load=0.0, latents=0.0, prior=0.0, train=1.0, sample=0.5, cleanup=0.0, total=1.5)

PASSING = TargetScores(subject_sim=0.8, subject_sim_max=0.85, text_sim=0.3, copy_distance=30,
                       brightness=0.5, contrast=0.2, sharpness=300.0)
"""Scores that pass every default bound of the target filter (fixed mode)."""


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def as_png(photo: bytes, size: int = 512) -> bytes:
    """A real photo resized to ``size`` px and saved as PNG, as a render would be."""
    return png(Image.open(io.BytesIO(photo)).convert("RGB").resize((size, size), Image.Resampling.LANCZOS))


def candidate(cluster: Cluster | str, image: bytes = b"", template: str = "a {subject} on a beach",
              skill: str = "recontextualization", k: int = 0, subject: str | None = "red teapot",
              class_noun: str = "teapot", size: int = 512, nsfw: bool | None = None, tag: str = "") -> Candidate:
    """A candidate of ``cluster`` (or a cluster id) with ``image`` as its render."""
    cluster_id = cluster if isinstance(cluster, str) else cluster.cluster_id
    page_url = "https://shop.example.com/p" if isinstance(cluster, str) else cluster.page_url
    return Candidate(
        candidate_id=stable_id("test-candidate", cluster_id, template, k, tag), cluster_id=cluster_id,
        page_url=page_url, prompt=template.replace("{subject}", f"sks {class_noun}"), prompt_template=template,
        skill=skill, subject=subject, class_noun=class_noun, identifier="sks", k=k, seed=1000 + k, image=image,
        width=size, height=size, nsfw=nsfw, train=TRAIN, sample=SAMPLE_SETTINGS, final_loss=0.5, n_train_images=5,
        seconds=SECONDS, synth_config_hash="abc")


def scored(scores: TargetScores = PASSING, *, tag: str = "", size: int = 512, nsfw: bool | None = None,
           cluster_id: str = "c1", source: str = "img-0", **changes: Any) -> ScoredCandidate:
    """A hand-made scored candidate: ``PASSING`` scores with ``changes``."""
    c = candidate(cluster_id, b"", size=size, nsfw=nsfw, tag=tag)
    return ScoredCandidate(c, "a red teapot on a beach", dataclasses.replace(scores, **changes), source)


def units_of(candidates: Sequence[ScoredCandidate], cluster: Cluster) -> Any:
    from schemas.records import ScoringUnit

    return ScoringUnit(cluster, tuple(sorted(candidates, key=lambda c: c.candidate.candidate_id)))
