"""Helpers for the CLIP-stage tests: clusters of real sample photos, and unit vectors with chosen similarities."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from schemas.ids import cluster_id, stable_id
from schemas.records import Cluster, ClusterStats, ImageRecord
from transforms.normalize import NormalizeConfig, normalize_image, url_host
from transforms.settings import EmbedConfig

TINY = EmbedConfig(model="tiny-random", pretrained=None, device="cpu", batch_size=8)
"""The embed config of the tests: the tiny-random preset on CPU."""


def image_record(photo: bytes, page_url: str, n: int = 0, normalized: bool = True) -> ImageRecord:
    """An ``ImageRecord`` of a real photo as the normalize stage makes it (``normalized=False``: raw bytes)."""
    result = normalize_image(photo, NormalizeConfig())
    return ImageRecord(
        image_id=result.image_id, record_id=f"rec-{result.image_id[:8]}-{n}", source=f"test:{n}", page_url=page_url,
        domain=url_host(page_url), image_url=f"{page_url}/img{n}.jpg", text=None,
        image=result.image if normalized else photo, width=result.width, height=result.height, phash=result.phash,
        source_width=result.source_width, source_height=result.source_height, source_format=result.source_format)


def make_cluster(page_url: str, images: Sequence[ImageRecord], **stats: Any) -> Cluster:
    """A cluster of ``images`` as the dedupe stage makes it (sorted by image id, content id)."""
    images = sorted(images, key=lambda im: im.image_id)
    return Cluster(cluster_id=cluster_id(page_url, (im.image_id for im in images)), page_url=page_url,
                   domain=url_host(page_url), images=tuple(images),
                   stats=ClusterStats(n_images=len(images), n_page_images=len(images), **stats))


def photo_cluster(page_url: str, photos: Sequence[bytes]) -> Cluster:
    return make_cluster(page_url, [image_record(photo, page_url, i) for i, photo in enumerate(photos)])


def vector_cluster(page_url: str, vectors: np.ndarray, phashes: Sequence[str] | None = None) -> Cluster:
    """A cluster whose images carry the given embeddings (and placeholder image bytes)."""
    images = []
    for i, vector in enumerate(vectors):
        image_id = stable_id("vector", page_url, i)
        images.append(ImageRecord(
            image_id=image_id, record_id=f"r{i}", source=f"vec:{i}", page_url=page_url, domain=url_host(page_url),
            image_url=f"{page_url}/{i}.jpg", text=None, image=b"", width=256, height=256,
            phash=phashes[i] if phashes else f"{i:016x}", source_width=256, source_height=256, source_format="JPEG",
            embedding=np.asarray(vector, dtype=np.float32)))
    return make_cluster(page_url, images)


def orthonormal(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    """``n`` orthonormal vectors in ``dim`` dimensions."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, n)))
    return q.T


def equicorrelated(n: int, similarity: float, dim: int = 16, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors whose pairwise cosine similarities all equal ``similarity`` (>= 0).

    ``v_i = sqrt(s) u + sqrt(1 - s) e_i`` with ``u, e_1..e_n`` orthonormal.
    """
    basis = orthonormal(n + 1, dim, seed)
    return np.sqrt(similarity) * basis[0] + np.sqrt(1 - similarity) * basis[1:]


def with_strangers(n: int, similarity: float, strangers: int = 1, dim: int = 16, seed: int = 0) -> np.ndarray:
    """``n`` equicorrelated unit vectors (a subject), then ``strangers`` unit vectors orthogonal to them and
    to each other (unrelated images)."""
    basis = orthonormal(n + 1 + strangers, dim, seed)
    subject = np.sqrt(similarity) * basis[0] + np.sqrt(1 - similarity) * basis[1:n + 1]
    return np.vstack([subject, basis[n + 1:]])


def reencode(photo: bytes, size: int = 400, quality: int = 70, mirror: bool = False) -> bytes:
    """The photo resized and saved again as a JPEG (a copy a crawler might find), optionally mirrored."""
    image = Image.open(io.BytesIO(photo)).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    if mirror:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()
