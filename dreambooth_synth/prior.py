"""Class images for prior preservation: rendered once per class noun, shared by every cluster.

DreamBooth's prior-preservation loss trains on the subject's photos *and* on images of its class
("a photo of teapot") rendered by the base model, so that the fine-tune does not forget what a teapot
is. Rendering 100 class images costs more than the training itself, and thousands of clusters share a
class, so they are rendered once per (class noun, model, settings) and stored in shared storage
(:class:`~dreambooth_synth.storage.SharedStorage`) as one zip of PNGs, written atomically. Workers that
race on a new class may both render it; the renders are deterministic (seeded by class noun and index),
so whichever file lands is the same.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dreambooth_synth.storage import SharedStorage

LOG = logging.getLogger(__name__)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "class"


def pack_images(images: Sequence[bytes], metadata: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:  # PNGs are compressed
        archive.writestr("meta.json", json.dumps(metadata, sort_keys=True))
        for i, data in enumerate(images):
            archive.writestr(f"{i:05d}.png", data)
    return buffer.getvalue()


def unpack_images(data: bytes) -> list[bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".png"))
        return [archive.read(n) for n in names]


@dataclass(frozen=True)
class ClassImages:
    images: tuple[bytes, ...]
    path: str
    rendered: bool
    """True when this call rendered them, False when they came from the cache."""


class ClassImageCache:
    """``class noun -> encoded class images``, in ``root`` on shared storage.

    Args:
        storage: the shared file system.
        root: directory for the cache files.
        settings_key: everything besides the class noun that changes the images (model, resolution,
            sampler, prompt template, count); part of each file name.
    """

    def __init__(self, storage: SharedStorage, root: str, settings_key: str) -> None:
        self._storage = storage
        self._root = root
        self._settings_key = settings_key

    def path(self, class_noun: str) -> str:
        digest = hashlib.sha256(f"{self._settings_key}\x1f{class_noun}".encode()).hexdigest()[:16]
        return self._storage.join(self._root, f"{_slug(class_noun)}-{digest}.zip")

    def get_or_render(self, class_noun: str, count: int, render: Callable[[], Sequence[bytes]]) -> ClassImages:
        """The cached images of ``class_noun``, or ``render()``'s, stored for every later cluster."""
        path = self.path(class_noun)
        if self._storage.exists(path):
            images = unpack_images(self._storage.read(path))
            if len(images) == count:
                return ClassImages(tuple(images), path, rendered=False)
            LOG.warning("class images %s hold %d images, %d expected: rendering them again", path, len(images), count)
        images = list(render())
        if len(images) != count:
            raise ValueError(f"rendered {len(images)} class images, {count} expected")
        self._storage.write_atomic(path, pack_images(images, {"class_noun": class_noun, "count": count,
                                                              "settings": self._settings_key}))
        LOG.info("rendered %d class images of %r into %s", count, class_noun, path)
        return ClassImages(tuple(images), path, rendered=True)
