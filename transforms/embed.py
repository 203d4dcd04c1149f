"""Stage *embed*: L2-normalized CLIP image embeddings of every cluster, through Beam ``RunInference``.

* :class:`PrepareImagesFn` -- decodes each image of a cluster from its normalized bytes and applies the
  model's eval transform (resize, centre crop, normalize). An image that does not decode leaves as an
  ``embedding_decode_error`` dead letter; a cluster left with fewer than ``group.min_images`` images
  leaves as ``cluster_too_small``.
* :class:`Embed` -- the stage: prepare -> ``RunInference`` with the CLIP model boundary's
  :class:`~transforms.models.clip.OpenClipImageHandler` -> embeddings attached to each ``ImageRecord.embedding``
  (float32 numpy vectors; written to ``clusters/`` as float16 when ``embed.store_embeddings``). A batch on
  which the model raises leaves as one ``embedding_failed`` dead letter per image.

**Batching: one element per cluster, weighted by its image count.** The alternative, one element per
image keyed by cluster and joined back with ``CoGroupByKey``, needs a shuffle that moves every cluster
(image bytes included) across the network a second time, only to regroup what is already grouped. Here
the clusters stay where ``Dedupe`` left them: preparation, batching and inference fuse into the same
step and nothing is shuffled. ``BatchElements`` gets ``element_size_fn`` = images per element, so a batch
holds at most ``embed.batch_size`` *images* -- clusters are never split, so a batch closes early when the
next cluster does not fit, and a cluster larger than the batch (up to ``group.max_images_per_page``) is a
batch of its own. The model sees one tensor per batch, stacked from the images' tensors with one copy,
exactly as a plain loop would. ``min_batch_size`` defaults to ``batch_size``: fixed-size batches are what a
GPU wants, and Beam's adaptive estimator would otherwise start from batches of one. The cost of batching
whole clusters: batches are a little smaller than ``batch_size`` on average (by half a cluster).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import PredictionResult
from PIL import Image

from schemas.records import Cluster, ImageRecord, with_images
from transforms.common import REJECTS, Progress, Reason, StageOutput, count, internal_error, reject
from transforms.models.clip import ImagePixels, decode_image, embed_inference, image_transform
from transforms.settings import EmbedConfig

LOG = logging.getLogger(__name__)

STAGE = "embed"

EMBEDDING_DECODE_ERROR = "embedding_decode_error"
EMBEDDING_FAILED = "embedding_failed"
CLUSTER_TOO_SMALL = "cluster_too_small"

REASONS = (Reason(EMBEDDING_DECODE_ERROR), Reason(EMBEDDING_FAILED), Reason(CLUSTER_TOO_SMALL, whole_cluster=True))


class PrepareImagesFn(beam.DoFn):
    """``Cluster`` -> ``ImagePixels(cluster, pixels)``; undecodable images and too-small clusters to ``rejects``."""

    def __init__(self, config: EmbedConfig, min_images: int) -> None:
        self._config = config
        self._min_images = min_images

    def setup(self) -> None:
        self._transform = image_transform(self._config)
        self._progress = Progress(STAGE, "images prepared")

    def process(self, cluster: Cluster) -> Iterator[Any]:
        try:
            pixels, kept = [], []
            failed: list[tuple[ImageRecord, str]] = []
            for image in cluster.images:
                try:
                    pixels.append(self._transform(decode_image(image.image)))
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                    failed.append((image, f"{type(error).__name__}: {error}"))
                    continue
                kept.append(image)
        except Exception as error:  # noqa: BLE001
            for image in cluster.images:
                yield internal_error(STAGE, error, record=image)
            return
        for image, detail in failed:
            yield reject(STAGE, EMBEDDING_DECODE_ERROR, f"normalized image does not decode: {detail}", record=image)
        self._progress.add(len(kept))
        if failed:
            cluster = with_images(cluster, kept)
        if not kept:  # every image is already a dead letter
            return
        if len(kept) < self._min_images:
            yield reject(STAGE, CLUSTER_TOO_SMALL, f"{len(kept)} images left after {len(failed)} failed to decode "
                         f"< min_images {self._min_images}", cluster=cluster)
            return
        yield ImagePixels(cluster, tuple(pixels))


def attach_embeddings(result: PredictionResult) -> Cluster:
    """The cluster of a prediction with each image's embedding set."""
    cluster: Cluster = result.example.key
    embeddings = result.inference
    if len(embeddings) != len(cluster.images):
        raise RuntimeError(f"{len(embeddings)} embeddings for {len(cluster.images)} images of {cluster.cluster_id}")
    count(STAGE, "clusters")
    count(STAGE, "images", len(cluster.images))
    return cluster.replace(images=tuple(image.replace(embedding=np.array(vector, dtype=np.float32))
                                        for image, vector in zip(cluster.images, embeddings, strict=True)),
                           provenance=dataclasses.replace(cluster.provenance, embed_model=result.model_id))


def inference_failure_rejects(failure: tuple[Any, Any]) -> Iterator[Any]:
    """A failed batch from ``RunInference``'s dead-letter output -> one ``embedding_failed`` reject per image."""
    batch, (error_type, error_repr, _traceback) = failure
    name = getattr(error_type, "__name__", str(error_type))
    LOG.warning("embed: inference failed on a batch of %d clusters: %s", len(batch), error_repr)
    for example in batch:
        for image in example.key.images:
            yield reject(STAGE, EMBEDDING_FAILED, f"the model raised {name} on this image's batch: {error_repr}",
                         record=image, cluster_id=example.key.cluster_id)


class Embed(beam.PTransform):
    """``Cluster``s -> the same clusters with an L2-normalized CLIP embedding on every image."""

    def __init__(self, config: EmbedConfig, min_images: int) -> None:
        super().__init__()
        self._config = config
        self._min_images = min_images

    def expand(self, clusters: beam.PCollection) -> StageOutput:
        prepare = PrepareImagesFn(self._config, self._min_images)
        prepared = clusters | "PrepareImages" >> beam.ParDo(prepare).with_output_types(ImagePixels).with_outputs(
            REJECTS, main="pixels")
        inference = embed_inference(self._config).with_exception_handling()
        results, failed = prepared.pixels | "ClipImageEmbeddings" >> inference
        embedded = results | "AttachEmbeddings" >> beam.Map(attach_embeddings)
        failures = failed.failed_inferences | "FailedBatches" >> beam.FlatMap(inference_failure_rejects).with_outputs(
            REJECTS, main="none")
        rejects = (prepared[REJECTS], failures[REJECTS]) | "EmbedRejects" >> beam.Flatten()
        return StageOutput(embedded, rejects)


def drop_embeddings(cluster: Cluster) -> Cluster:
    """The cluster without embeddings (``embed.store_embeddings: false``)."""
    return cluster.replace(images=tuple(image.replace(embedding=None) for image in cluster.images),
                           provenance=dataclasses.replace(cluster.provenance, embed_model=None))
