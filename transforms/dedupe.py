"""Stage *dedupe*: boilerplate across pages, exact and near duplicates within a page.

* **Boilerplate** (:class:`FindBoilerplate`): an image whose perceptual hash appears on more than
  ``dedupe.boilerplate_max_pages`` distinct pages is a logo, badge or banner, and is removed from every
  page. This is a keyed join: ``(phash, page)`` pairs are made distinct and grouped by hash, and the
  pages of each hash over the bound get a flag ``(page_url, BoilerplateHit)`` that the grouping stage
  joins to the page's image keys (no bytes) when it decides the cap; the images flagged leave there
  (:func:`boilerplate_reject`), so they never take a place under the cap. No worker ever holds the set of
  all hashes.
* **Exact duplicates**: the same normalized content (``image_id``) twice on a page.
* **Near duplicates**: perceptual-hash Hamming distance at most ``dedupe.near_duplicate_max_distance``
  to an image already kept on the page (re-encodes, resizes, small crops).

Within a page the image kept among duplicates is the one with the most source pixels (the best
original), ties broken by image id and image URL, so the choice depends neither on input order nor
on the input format.
A page left with fewer than ``group.min_images`` images is dropped as ``cluster_too_small``: one
reject row for the page, counting its images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam

from schemas.ids import cluster_id, hamming
from schemas.records import BoilerplateHit, Cluster, ClusterStats, ImageRecord, PageGroup
from transforms.common import REJECTS, Reason, StageOutput, count, internal_error, reject
from transforms.settings import DedupeConfig

STAGE = "dedupe"

BOILERPLATE = "boilerplate"
DUPLICATE_EXACT = "duplicate_exact"
DUPLICATE_NEAR = "duplicate_near"
CLUSTER_TOO_SMALL = "cluster_too_small"

REASONS = (Reason(BOILERPLATE), Reason(DUPLICATE_EXACT), Reason(DUPLICATE_NEAR),
           Reason(CLUSTER_TOO_SMALL, whole_cluster=True))
"""``boilerplate`` rejects leave where pages are grouped (:mod:`transforms.group`), under this stage's name."""


# --- boilerplate ------------------------------------------------------------------------------------


class FlagBoilerplateFn(beam.DoFn):
    """``(phash, distinct page URLs)`` -> ``(page_url, BoilerplateHit)`` for hashes on too many pages."""

    def __init__(self, max_pages: int) -> None:
        self._max_pages = max_pages

    def process(self, element: tuple[str, Iterable[str]]) -> Iterator[tuple[str, BoilerplateHit]]:
        phash, pages = element
        n_pages = sum(1 for _ in pages)
        if n_pages <= self._max_pages:
            return
        count(STAGE, "boilerplate_hashes")
        hit = BoilerplateHit(phash=phash, n_pages=n_pages)
        for page_url in pages:
            yield page_url, hit


class FindBoilerplate(beam.PTransform):
    """``ImageRecord``s -> ``(page_url, BoilerplateHit)`` flags, for :class:`transforms.group.GroupByPage`."""

    def __init__(self, config: DedupeConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, images: beam.PCollection) -> beam.PCollection:
        return (
            images
            | "HashAndPage" >> beam.Map(lambda image: (image.phash, image.page_url))
            | "DistinctPages" >> beam.Distinct()
            | "GroupPagesByHash" >> beam.GroupByKey()
            | "FlagOverusedHashes" >> beam.ParDo(FlagBoilerplateFn(self._config.boilerplate_max_pages))
        )


# --- within a page ----------------------------------------------------------------------------------


def boilerplate_reject(image: ImageRecord, hit: BoilerplateHit, max_pages: int) -> beam.pvalue.TaggedOutput:
    """The ``boilerplate`` dead letter of an image whose hash is on too many pages (emitted where pages are
    grouped, see :mod:`transforms.group`)."""
    return reject(STAGE, BOILERPLATE, f"perceptual hash {image.phash} is on {hit.n_pages} distinct pages > "
                                      f"boilerplate_max_pages {max_pages}", record=image)


def _quality_order(image: ImageRecord) -> tuple[int, str, str, str, str]:
    return (-(image.source_width * image.source_height), image.image_id, image.image_url or "",
            image.record_id, image.source)


def dedupe_page(group: PageGroup, config: DedupeConfig) -> tuple[list[ImageRecord], list[tuple[ImageRecord, str, str]]]:
    """Split a page's images into kept ones (sorted by id) and ``(image, reason, detail)`` removals."""
    removed: list[tuple[ImageRecord, str, str]] = []
    kept: list[ImageRecord] = []
    kept_by_id: dict[str, ImageRecord] = {}
    for image in sorted(group.images, key=_quality_order):
        same = kept_by_id.get(image.image_id)
        if same is not None:
            removed.append((image, DUPLICATE_EXACT, f"same content as image {same.image_id} ({same.source})"))
            continue
        near = next(((other, d) for other in kept
                     if (d := hamming(image.phash, other.phash)) <= config.near_duplicate_max_distance), None)
        if near is not None:
            other, distance = near
            removed.append((image, DUPLICATE_NEAR, f"perceptual hash distance {distance} <= "
                                                   f"{config.near_duplicate_max_distance} to image "
                                                   f"{other.image_id} ({other.source})"))
            continue
        kept.append(image)
        kept_by_id[image.image_id] = image
    kept.sort(key=lambda im: (im.image_id, im.image_url or "", im.record_id))
    return kept, removed


class DedupePageFn(beam.DoFn):
    """``PageGroup`` -> ``Cluster`` (main) with per-image and whole-page dead letters (``rejects``)."""

    def __init__(self, config: DedupeConfig, min_images: int) -> None:
        self._config = config
        self._min_images = min_images

    def process(self, group: PageGroup) -> Iterator[Any]:
        try:
            kept, removed = dedupe_page(group, self._config)
        except Exception as error:  # noqa: BLE001
            for image in group.images:
                yield internal_error(STAGE, error, record=image)
            return
        for image, reason, detail in removed:
            yield reject(STAGE, reason, detail, record=image)
        cid = cluster_id(group.page_url, (im.image_id for im in kept))
        if len(kept) < self._min_images:
            yield reject(STAGE, CLUSTER_TOO_SMALL,
                         f"{len(kept)} images left after dedupe < min_images {self._min_images}",
                         id=cid, cluster_id=cid, page_url=group.page_url, n_images=len(kept), members=kept)
            count(STAGE, f"{CLUSTER_TOO_SMALL}_clusters")
            return
        count(STAGE, "clusters")
        count(STAGE, "images_kept", len(kept))
        yield Cluster(
            cluster_id=cid,
            page_url=group.page_url,
            domain=group.domain,
            images=tuple(kept),
            stats=ClusterStats(n_images=len(kept), n_page_images=group.n_page_images),
        )


class Dedupe(beam.PTransform):
    """``PageGroup``s -> ``Cluster``s without duplicates or too-small pages (boilerplate left at grouping)."""

    def __init__(self, config: DedupeConfig, min_images: int) -> None:
        super().__init__()
        self._config = config
        self._min_images = min_images

    def expand(self, pages: beam.PCollection) -> StageOutput:
        result = pages | "DedupePages" >> beam.ParDo(DedupePageFn(self._config, self._min_images)).with_outputs(
            REJECTS, main="clusters")
        return StageOutput(result.clusters, result[REJECTS])
