"""Stage *decontaminate*: no cluster may hold a near duplicate of an evaluation image.

``decontaminate.against`` names the evaluation images (a directory, searched recursively for image
files, or a glob; any Beam file system). A cluster holding an image that is a near duplicate of one of
them leaves whole as ``contaminated`` -- its other images show the same subject, which is what a
subject-driven benchmark (DreamBench) evaluates. An image is a near duplicate of a reference when

* their 64-bit perceptual hashes differ in at most ``decontaminate.max_distance`` bits, or
* with embeddings (the embed stage ran and ``decontaminate.clip_threshold`` is set), their CLIP cosine
  similarity reaches ``decontaminate.clip_threshold`` -- which also catches what a perceptual hash
  misses: mirrored, recoloured or tightly cropped copies.

The reference images are read once, in the pipeline: matched, normalized exactly like crawled images
(same ``normalize`` settings, minus the size bounds, so hashes compare like with like), embedded with
the same ``RunInference`` model handler (with ``embed.share_model_across_processes`` the two steps use the
one loaded copy of each machine; otherwise each loads its own), and collected into one
:class:`ReferenceSet` that reaches every worker once as a singleton side input. Each cluster is then
checked in place with two small matrix operations; nothing is shuffled. Files that are not readable
images are logged, counted and listed in the manifest (``stats.clusters.decontaminate.unreadable``); a
failure to embed a reference fails the run, because a silently smaller reference set would let
contamination through.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from schemas.records import Cluster
from transforms.common import REJECTS, Reason, StageOutput, count, internal_error, reject
from transforms.models.clip import ImagePixels, decode_image, embed_inference, image_transform
from transforms.normalize import NormalizeConfig, Rejected, normalize_image
from transforms.settings import DecontaminateConfig, EmbedConfig

LOG = logging.getLogger(__name__)

STAGE = "decontaminate"

CONTAMINATED = "contaminated"

REASONS = (Reason(CONTAMINATED, whole_cluster=True),)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif", "heic", "heif")

_GLOB_CHARS = set("*?[")


# --- the reference set ----------------------------------------------------------------------------------


def reference_pattern(against: str) -> tuple[str, bool]:
    """``(file pattern, keep only image extensions)`` for ``decontaminate.against``."""
    if _GLOB_CHARS & set(against):
        return against, False
    is_local_file = "://" not in against and FileSystems.exists(against) and not _is_local_dir(against)
    if is_local_file or ("://" in against and FileSystems.exists(against)):
        return against, False  # one file (an object store "directory" is no object, so it is not found)
    return FileSystems.join(against.rstrip("/"), "**"), True


def _is_local_dir(path: str) -> bool:
    import os

    return os.path.isdir(path)


def _is_image_path(path: str) -> bool:
    return path.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in path.rsplit("/", 1)[-1] else False


def reference_files(against: str) -> list[str]:
    """The evaluation image files ``against`` names (what the pipeline will read)."""
    pattern, images_only = reference_pattern(against)
    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    return [p for p in paths if _is_image_path(p)] if images_only else paths


def check_references(config: DecontaminateConfig) -> int:
    """Raise ``ValueError`` unless ``config.against`` names at least one file; returns how many."""
    if not config.against:
        return 0
    n = len(reference_files(config.against))
    if not n:
        pattern, images_only = reference_pattern(config.against)
        raise ValueError(f"decontaminate.against {config.against!r} matches no "
                         f"{'image ' if images_only else ''}file (searched {pattern})")
    return n


class ReferenceImage(NamedTuple):
    """One evaluation image, hashed (and embedded) like crawled images."""

    path: str
    phash: int
    embedding: Any = None
    """``float32 [D]`` unit vector, or ``None`` without the CLIP check."""


@dataclass(frozen=True)
class ReferenceSet:
    """All evaluation images as arrays, for vectorized comparison."""

    paths: tuple[str, ...]
    hashes: np.ndarray
    """``uint64 [R]`` perceptual hashes."""
    embeddings: np.ndarray | None
    """``float32 [R, D]`` unit rows, or ``None`` without the CLIP check."""

    @classmethod
    def build(cls, references: Sequence[ReferenceImage]) -> ReferenceSet:
        references = sorted(references, key=lambda r: r.path)
        embeddings = None
        if references and all(r.embedding is not None for r in references):
            embeddings = np.stack([np.asarray(r.embedding, dtype=np.float32) for r in references])
        return cls(tuple(r.path for r in references), np.array([r.phash for r in references], dtype=np.uint64),
                   embeddings)

    def __len__(self) -> int:
        return len(self.paths)


def relaxed(config: NormalizeConfig) -> NormalizeConfig:
    """Normalization for reference images: the crawl's settings without its size bounds."""
    return dataclasses.replace(config, min_side=1, max_aspect_ratio=1e9)


class ReadReferenceFn(beam.DoFn):
    """``ReadableFile`` -> ``ReferenceImage`` (or ``ImagePixels`` of it, to embed); unreadable paths on a side tag."""

    UNREADABLE = "unreadable"

    def __init__(self, normalize: NormalizeConfig, embed: EmbedConfig | None, images_only: bool) -> None:
        self._normalize = relaxed(normalize)
        self._embed = embed
        self._images_only = images_only

    def setup(self) -> None:
        self._transform = image_transform(self._embed) if self._embed is not None else None

    def process(self, readable: fileio.ReadableFile) -> Iterator[Any]:
        path = readable.metadata.path
        if self._images_only and not _is_image_path(path):
            return
        try:
            normalized = normalize_image(readable.read(), self._normalize)
            reference = ReferenceImage(path, int(normalized.phash, 16))
            pixels = (self._transform(decode_image(normalized.image)),) if self._transform else None
        except (Rejected, OSError, ValueError) as error:
            LOG.warning("decontaminate: reference %s is not a readable image (%s); it is not checked", path, error)
            count(STAGE, "references_unreadable")
            yield beam.pvalue.TaggedOutput(self.UNREADABLE, f"{path}: {error}")
            return
        count(STAGE, "references")
        yield reference if pixels is None else ImagePixels(reference, pixels)


def embedded_reference(result: Any) -> ReferenceImage:
    return result.example.key._replace(embedding=np.asarray(result.inference[0], dtype=np.float32))


# --- the check ------------------------------------------------------------------------------------------


def contamination(cluster: Cluster, references: ReferenceSet, config: DecontaminateConfig) -> str | None:
    """Why ``cluster`` is contaminated (its first offending image and the closest reference), or ``None``."""
    if not len(references) or not cluster.images:
        return None
    hashes = np.array([int(image.phash, 16) for image in cluster.images], dtype=np.uint64)
    distances = np.bitwise_count(hashes[:, None] ^ references.hashes[None, :])
    sims = None
    if (config.clip_threshold is not None and references.embeddings is not None
            and all(image.embedding is not None for image in cluster.images)):
        vectors = np.stack([np.asarray(image.embedding, dtype=np.float32) for image in cluster.images])
        sims = vectors @ references.embeddings.T
    for i, image in enumerate(cluster.images):
        j = int(np.argmin(distances[i]))
        if distances[i, j] <= config.max_distance:
            return (f"image {image.image_id} ({image.source}) is a near duplicate of evaluation image "
                    f"{references.paths[j]}: perceptual-hash distance {int(distances[i, j])} <= {config.max_distance}")
        if sims is not None:
            j = int(np.argmax(sims[i]))
            if sims[i, j] >= config.clip_threshold:
                return (f"image {image.image_id} ({image.source}) is a near duplicate of evaluation image "
                        f"{references.paths[j]}: CLIP similarity {sims[i, j]:.4f} >= {config.clip_threshold}")
    return None


class DecontaminateFn(beam.DoFn):
    """``Cluster`` -> kept, or a ``contaminated`` reject; the references arrive as a side input."""

    def __init__(self, config: DecontaminateConfig) -> None:
        self._config = config

    def process(self, cluster: Cluster, references: ReferenceSet) -> Iterator[Any]:
        try:
            why = contamination(cluster, references, self._config)
        except Exception as error:  # noqa: BLE001
            for image in cluster.images:
                yield internal_error(STAGE, error, record=image, cluster_id=cluster.cluster_id)
            return
        if why is not None:
            count(STAGE, f"{CONTAMINATED}_clusters")
            yield reject(STAGE, CONTAMINATED, why, cluster=cluster)
            return
        count(STAGE, "clusters")
        yield cluster


def reference_stats(references: ReferenceSet, unreadable: list[str], config: DecontaminateConfig,
                    clip_check: bool) -> dict[str, Any]:
    """The ``stats.clusters.decontaminate`` block of the manifest."""
    return {
        "against": config.against,
        "references": len(references),
        "unreadable": sorted(unreadable),
        "max_distance": config.max_distance,
        "clip_threshold": config.clip_threshold if clip_check else None,
    }


class Decontaminate(beam.PTransform):
    """``Cluster``s -> those holding no near duplicate of an image under ``config.against``; ``extra["stats"]``:
    the reference set checked against (``stats.clusters.decontaminate`` of the manifest).

    ``embed`` is the embed stage's config when embeddings exist (enables the CLIP check), else ``None``.
    """

    def __init__(self, config: DecontaminateConfig, normalize: NormalizeConfig,
                 embed: EmbedConfig | None = None) -> None:
        super().__init__()
        if not config.against:
            raise ValueError("Decontaminate needs decontaminate.against")
        self._config = config
        self._normalize = normalize
        self._embed = embed if config.clip_threshold is not None else None

    def expand(self, clusters: beam.PCollection) -> StageOutput:
        pattern, images_only = reference_pattern(self._config.against)
        read = (
            clusters.pipeline
            | "MatchReferences" >> fileio.MatchFiles(pattern)
            | "OpenReferences" >> fileio.ReadMatches()
            | "ReadReferences" >> beam.ParDo(ReadReferenceFn(self._normalize, self._embed, images_only))
            .with_output_types(ImagePixels if self._embed is not None else ReferenceImage)
            .with_outputs(ReadReferenceFn.UNREADABLE, main="references")
        )
        references = read.references
        if self._embed is not None:
            references = (
                references
                | "EmbedReferences" >> embed_inference(self._embed)
                | "ReferenceEmbeddings" >> beam.Map(embedded_reference)
            )
        reference_set = (
            references
            | "CollectReferences" >> beam.combiners.ToList()
            | "BuildReferenceSet" >> beam.Map(ReferenceSet.build)
        )
        result = clusters | "CheckClusters" >> beam.ParDo(
            DecontaminateFn(self._config), beam.pvalue.AsSingleton(reference_set)).with_outputs(REJECTS, main="kept")
        unreadable = beam.pvalue.AsList(read[ReadReferenceFn.UNREADABLE])
        stats = reference_set | "DescribeReferences" >> beam.Map(reference_stats, unreadable, self._config,
                                                                  self._embed is not None)
        return StageOutput(result.kept, result[REJECTS], {"stats": stats})
