"""Stage *group by page*: one :class:`~schemas.records.PageGroup` per canonical page URL.

Images are keyed by their canonical page URL and joined, in the same shuffle, with the per-page
boilerplate flags of :class:`transforms.dedupe.FindBoilerplate` (so image bytes cross the network once).

A page can hold thousands of images (galleries, category pages): the cap keeps the first
``group.max_images_per_page`` images in a deterministic order (by image id, then image URL) and
rejects the rest as ``page_cap``. The cap is applied in two passes over the grouped values, holding
only the kept images and their sort keys, so one huge page cannot exhaust a worker's memory. Images
flagged as boilerplate do not take a place under the cap; the dedupe stage removes them.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam

from schemas.records import BoilerplateHit, ImageRecord, PageGroup
from transforms.common import REJECTS, StageOutput, count, internal_error, option, reject

STAGE = "group"

PAGE_CAP = "page_cap"


@dataclass(frozen=True)
class GroupConfig:
    """Settings of page grouping (config section ``group``); defaults justified in docs/defaults.md."""

    max_images_per_page: int = option(32, "Images kept per page; the excess is rejected as page_cap.")
    min_images: int = option(3, "Smallest cluster kept (after dedupe and every later filter): a training "
                                "example needs 3 demos.")

    def __post_init__(self) -> None:
        if self.min_images < 1:
            raise ValueError(f"min_images must be at least 1, got {self.min_images}")
        if self.max_images_per_page < self.min_images:
            raise ValueError(f"max_images_per_page ({self.max_images_per_page}) must be >= min_images "
                             f"({self.min_images})")


def _cap_key(image: ImageRecord) -> tuple[str, str, str, str]:
    # Content-derived fields first, so that the choice does not depend on which file format or row
    # an image came from; the input location only separates otherwise identical records.
    return image.image_id, image.image_url or "", image.record_id, image.source


def cap_page(page_url: str, images: Iterable[ImageRecord], boilerplate: Iterable[BoilerplateHit],
             max_images: int) -> tuple[PageGroup | None, list[ImageRecord]]:
    """Apply the per-page cap: the page group and the images over the cap.

    ``images`` is iterated twice (Beam's grouped values are re-iterable); only ``max_images`` images
    and their keys are held at once.
    """
    hits = {hit.phash: hit for hit in boilerplate}
    keep = set(heapq.nsmallest(max_images, (_cap_key(im) for im in images if im.phash not in hits)))
    kept: list[ImageRecord] = []
    excess: list[ImageRecord] = []
    n_page_images = 0
    for image in images:
        n_page_images += 1
        if image.phash in hits or _cap_key(image) in keep:
            kept.append(image)
        else:
            excess.append(image)
    if not kept:
        return None, excess
    kept.sort(key=_cap_key)
    present = sorted({hits[im.phash] for im in kept if im.phash in hits}, key=lambda hit: hit.phash)
    group = PageGroup(page_url=page_url, domain=kept[0].domain, images=tuple(kept),
                      boilerplate=tuple(present), n_page_images=n_page_images)
    return group, excess


class CapPageFn(beam.DoFn):
    """``(page_url, {"images": [...], "boilerplate": [...]})`` -> ``PageGroup`` + ``page_cap`` rejects."""

    def __init__(self, config: GroupConfig) -> None:
        self._config = config

    def process(self, element: tuple[str, dict[str, Iterable[Any]]]) -> Iterator[Any]:
        page_url, joined = element
        try:
            group, excess = cap_page(page_url, joined["images"], joined["boilerplate"],
                                     self._config.max_images_per_page)
        except Exception as error:  # noqa: BLE001
            # A bug here must not lose a page's records silently: reject each of them.
            for image in joined["images"]:
                yield internal_error(STAGE, error, record=image)
            return
        for image in excess:
            yield reject(STAGE, PAGE_CAP, f"page has more than max_images_per_page "
                                          f"{self._config.max_images_per_page} images", record=image)
        if group is not None:
            count(STAGE, "pages")
            yield group


class GroupByPage(beam.PTransform):
    """``(ImageRecord``s, ``(page_url, BoilerplateHit)``s``)`` -> ``PageGroup``s, one per canonical page."""

    def __init__(self, config: GroupConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, inputs: tuple[beam.PCollection, beam.PCollection]) -> StageOutput:
        images, boilerplate = inputs
        keyed = images | "KeyByPage" >> beam.Map(lambda image: (image.page_url, image))
        joined = {"images": keyed, "boilerplate": boilerplate} | "JoinBoilerplateFlags" >> beam.CoGroupByKey()
        result = joined | "CapImagesPerPage" >> beam.ParDo(CapPageFn(self._config)).with_outputs(
            REJECTS, main="pages")
        return StageOutput(result.pages, result[REJECTS])
