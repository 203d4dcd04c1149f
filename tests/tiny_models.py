"""Tiny random-weight Stable Diffusion models for the tests, and clusters of real DreamBench photos.

The models are the library's own ``tiny-random`` presets (built from configs with a fixed seed), saved
with ``save_pretrained`` to a test directory: tests name that directory as the model, so loading goes
through ``from_pretrained`` exactly as for a real model id.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.parquet import CLUSTERS_SCHEMA, cluster_from_row, cluster_to_row
from schemas.records import Cluster, ImageRecord, Prompt

NOT_AN_IMAGE = b"<html><body>404 Not Found</body></html>"


def save_tiny_model(root: str | os.PathLike, preset: str = "tiny-random") -> str:
    """A preset saved with ``save_pretrained`` under ``root``; returns the directory to load it from."""
    from dreambooth_synth.tiny import materialize_preset

    return materialize_preset(preset, str(root))


def read_clusters(output_dir: str | os.PathLike) -> list[Cluster]:
    """The clusters a phase-1 run wrote, sorted by id."""
    rows = pq.read_table(os.path.join(str(output_dir), "clusters")).to_pylist()
    return sorted((cluster_from_row(row) for row in rows), key=lambda c: c.cluster_id)


def write_clusters_file(clusters: Sequence[Cluster], path: str | os.PathLike) -> str:
    table = pa.Table.from_pylist([cluster_to_row(c) for c in clusters], schema=CLUSTERS_SCHEMA)
    pq.write_table(table, str(path))
    return str(path)


def with_prompts(cluster: Cluster, class_noun: str, prompts: Sequence[tuple[str, str]], subject: str = "") -> Cluster:
    return cluster.replace(class_noun=class_noun, subject=subject or class_noun,
                           prompts=tuple(Prompt(p, s) for p, s in prompts))


def broken_copy(cluster: Cluster, suffix: str = "broken") -> Cluster:
    """The cluster with every image's bytes replaced by an HTML error page (and its own id)."""
    images: list[ImageRecord] = [im.replace(image=NOT_AN_IMAGE) for im in cluster.images]
    return cluster.replace(cluster_id=f"{cluster.cluster_id[:-len(suffix)]}{suffix}", images=tuple(images))


def subject_of(cluster: Cluster, prompts: Sequence[tuple[str, str]] = (("a photo of {subject} on a beach",
                                                                          "recontextualization"),)) -> Any:
    from dreambooth_synth import Subject

    return Subject(key=cluster.cluster_id, class_noun=cluster.class_noun,
                   images=tuple(im.image for im in cluster.images), prompts=tuple(prompts))


def one_torch_thread() -> Iterator[None]:
    """Run the tiny models on one intra-op thread (a generator for a module-scoped fixture).

    They gain nothing from more, and on a shared 2-core machine two OpenMP threads that lose their cores
    to another process stall each other (the same training steps took 10x longer under load).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
