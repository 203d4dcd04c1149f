"""Image bytes set aside while light stages decide on clusters, and put back after them.

The global decisions of phase 1 -- the coherence threshold, cross-page and semantic duplicates, decontamination
-- read image ids, hashes and embeddings, never the bytes, but each one joins its verdicts back to the clusters,
and every such step moves its clusters between workers. On a portable runner (and in the DirectRunner's
multi-process mode, where the launching process relays every element of every shuffle) moving photos four times
costs far more than deciding. So the phase builder (``pipeline/phases.py``) runs those stages (``Stage.light``)
on *light* clusters:

1. :class:`SetAsideImages` (fused with the step before): each cluster goes on with its images' bytes emptied,
   and its payload -- ``{image_id: bytes}`` -- is keyed by the cluster's page (a cluster is one page's images,
   and its page stays while its id follows its image set);
2. the light stages decide;
3. :class:`RestoreImages` joins each surviving cluster with its payload by page (``CoGroupByKey``: one cluster
   and one payload per key, at most ``group.max_images_per_page`` images) and puts each image's bytes back by
   image id (the content hash of those bytes). Payloads of clusters the light stages dropped end there: those
   clusters are already dead letters. A cluster whose bytes cannot be found (never expected) leaves as
   ``internal_error`` rejects, one per image, so nothing vanishes.

So the bytes cross the network once for all the light stages, instead of once per stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam

from schemas.records import Cluster
from transforms.common import REJECTS, StageOutput, count, internal_error

STAGE = "images"

PAYLOAD = "payload"


def light(cluster: Cluster) -> Cluster:
    """``cluster`` with every image's bytes emptied (ids, hashes, embeddings and sizes stay)."""
    return cluster.replace(images=tuple(image.replace(image=b"") for image in cluster.images))


class SetAsideFn(beam.DoFn):
    """``Cluster`` -> the light cluster (main) and ``(page_url, {image_id: bytes})`` (``payload``)."""

    def process(self, cluster: Cluster) -> Iterator[Any]:
        yield beam.pvalue.TaggedOutput(PAYLOAD, (cluster.page_url, {im.image_id: im.image for im in cluster.images}))
        yield light(cluster)


class SetAsideImages(beam.PTransform):
    """``Cluster`` s -> ``(light clusters, payloads)``."""

    def expand(self, clusters: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        split = clusters | "SetAside" >> beam.ParDo(SetAsideFn()).with_outputs(PAYLOAD, main="light")
        return split.light, split[PAYLOAD]


def restore(cluster: Cluster, payload: dict[str, bytes]) -> Cluster:
    """``cluster`` with each image's bytes taken from ``payload`` by image id; ``KeyError`` when one is missing."""
    return cluster.replace(images=tuple(image.replace(image=payload[image.image_id]) for image in cluster.images))


class RestoreFn(beam.DoFn):
    """``(page_url, {"cluster": [light cluster], "payload": [payload]})`` -> the cluster with its bytes."""

    def process(self, element: tuple[str, dict[str, Iterable[Any]]]) -> Iterator[Any]:
        page_url, joined = element
        clusters, payloads = list(joined["cluster"]), list(joined["payload"])
        if not clusters:
            count(STAGE, "payloads_of_dropped_clusters")  # dropped by a light stage, already a dead letter
            return
        if len(clusters) == 1 and len(payloads) == 1:
            try:
                restored = restore(clusters[0], payloads[0])
            except KeyError as missing:
                error: Exception = missing
            else:
                yield restored
                return
        else:
            error = RuntimeError(f"{len(clusters)} clusters and {len(payloads)} image payloads for page {page_url}")
        for cluster in clusters:
            for image in cluster.images:
                yield internal_error(STAGE, error, record=image, cluster_id=cluster.cluster_id)


class RestoreImages(beam.PTransform):
    """``(light clusters, payloads)`` -> the clusters with their images' bytes, and dead letters."""

    def __init__(self, payloads: beam.PCollection) -> None:
        super().__init__()
        self._payloads = payloads

    def expand(self, clusters: beam.PCollection) -> StageOutput:
        keyed = clusters | "KeyByPage" >> beam.Map(lambda cluster: (cluster.page_url, cluster))
        restored = (
            {"cluster": keyed, "payload": self._payloads}
            | "JoinPayloads" >> beam.CoGroupByKey()
            | "Restore" >> beam.ParDo(RestoreFn()).with_outputs(REJECTS, main="clusters")
        )
        return StageOutput(restored.clusters, restored[REJECTS])
