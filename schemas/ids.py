"""Stable content-hash identifiers.

IDs are hashes of content, never counters or random values, so a rerun over the same input produces
the same ids and records can be matched across runs (dedupe, resume, joins with earlier datasets).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

ID_HEX_DIGITS = 32
"""128-bit ids: collisions are out of reach at web scale, and the ids stay short in file names."""


def content_id(data: bytes) -> str:
    """The id of a blob: the first 128 bits of its SHA-256, as hex."""
    return hashlib.sha256(data).hexdigest()[:ID_HEX_DIGITS]


def stable_id(*parts: str | bytes | int | None) -> str:
    """The id of a tuple of values: SHA-256 over the parts, length-prefixed so that
    ``("ab", "c")`` and ``("a", "bc")`` differ and ``None`` differs from ``""``."""
    digest = hashlib.sha256()
    for part in parts:
        if part is None:
            digest.update(b"\xff")
            continue
        if isinstance(part, int):
            part = str(part)
        data = part.encode("utf-8") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()[:ID_HEX_DIGITS]


def cluster_id(page_url: str, image_ids: Iterable[str]) -> str:
    """Stable id of a cluster: its canonical page URL and the (sorted) ids of its images."""
    return stable_id("cluster", page_url, *sorted(image_ids))


def hamming(phash_a: str, phash_b: str) -> int:
    """Bits that differ between two hex perceptual hashes (``ImageRecord.phash``)."""
    return (int(phash_a, 16) ^ int(phash_b, 16)).bit_count()
