"""Versioned instruction files of the model stages and the scene-template grammar (``transforms/llm_prompts/``).

Each file is recorded in the provenance of what it made as ``name@sha256[:12]``, so a change to a prompt shows
in the data. Kept apart from the LLM client: phase 2 reads the template grammar and needs nothing else of the
model stages.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptText:
    """A versioned prompt file's text and its provenance tag ``name@sha256[:12]``."""

    name: str
    text: str

    @property
    def tag(self) -> str:
        return f"{self.name}@{hashlib.sha256(self.text.encode('utf-8')).hexdigest()[:12]}"


def load_prompt(name_or_path: str) -> PromptText:
    """A bundled prompt file (``transforms/llm_prompts/NAME``) or any Beam file system path."""
    if "/" not in name_or_path and "\\" not in name_or_path:
        from importlib import resources

        text = resources.files("transforms").joinpath("llm_prompts", name_or_path).read_text(encoding="utf-8")
        return PromptText(name_or_path, text)
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(name_or_path) as handle:
        text = handle.read().decode("utf-8")
    return PromptText(name_or_path.rsplit("/", 1)[-1], text)
