"""Prompts and seeds of a subject: the identifier phrase, instance and class prompts, render seeds."""

from __future__ import annotations

import hashlib

from dreambooth_synth.config import TrainConfig

SUBJECT_PLACEHOLDER = "{subject}"
DEFAULT_CLASS_NOUN = "object"
"""Class noun of a subject whose cluster has none (the captioning stage may leave it empty)."""


def class_noun_or_default(class_noun: str | None) -> str:
    noun = " ".join((class_noun or "").split())
    return noun or DEFAULT_CLASS_NOUN


def subject_phrase(config: TrainConfig, class_noun: str) -> str:
    """What ``{subject}`` becomes in a prompt: the identifier and the class noun ("sks teapot")."""
    return f"{config.identifier.strip()} {class_noun}"


def instance_prompt(config: TrainConfig, class_noun: str) -> str:
    """The prompt of the real photos ("a photo of sks teapot")."""
    return config.instance_prompt.replace("{identifier}", config.identifier.strip()).replace("{class_noun}", class_noun)


def class_prompt(config: TrainConfig, class_noun: str) -> str:
    """The prompt of the class images of prior preservation ("a photo of teapot")."""
    return config.class_prompt.replace("{class_noun}", class_noun)


def render_prompt(template: str, subject: str) -> str:
    """A scene prompt with ``{subject}`` replaced (prefixed when the template lacks the placeholder, so
    that every render is of the subject)."""
    if SUBJECT_PLACEHOLDER not in template:
        return f"{subject}, {template}"
    return template.replace(SUBJECT_PLACEHOLDER, subject)


def _seed(*parts: str | int) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def sample_seed(key: str, template: str, k: int) -> int:
    """Seed of the ``k``-th render of ``template`` for subject ``key``: the same on every run and worker,
    independent of which other prompts or images share its batch."""
    return _seed("sample", key, template, k)


def class_image_seed(class_noun: str, i: int) -> int:
    return _seed("class", class_noun, i)


def training_seed(seed: int, key: str) -> int:
    return _seed("train", seed, key)
