"""Stage *group by page*: one :class:`~schemas.records.PageGroup` per canonical page URL, hot-key safe.

A page can hold thousands of images (galleries, category pages): the cap keeps the first
``group.max_images_per_page`` images in a deterministic order (by image id, then image URL, record id
and source -- content first, so the choice depends neither on input order nor on format) and rejects the
rest as ``page_cap``. Images whose perceptual hash is boilerplate on this page (a flag of
:class:`~transforms.dedupe.FindBoilerplate`, which runs inside this stage with the ``dedupe`` settings) take no
place under the cap and leave as ``boilerplate``.

The choice is made **before any image bytes are grouped**, so one huge page never gathers its payloads in
one worker:

1. ``CapDecisions``: every image becomes a small :class:`CapEntry` (its sort key and hash, no bytes), joined
   by page with the page's boilerplate flags (``CoGroupByKey``); per page the ``max_images_per_page``
   smallest non-boilerplate keys are kept, and every entry gets its fate (:class:`CapDecision`).
2. ``RouteImages``: each image meets its decision by its own key (a join of one image and one decision);
   excess and boilerplate images leave as dead letters there, one by one.
3. ``GroupKeptImages``: only the kept images are grouped by page -- at most ``max_images_per_page`` payloads
   in any grouped value.

The light join of step 1 holds, for a page of 50,000 images, about 50,000 keys of ~200 bytes: megabytes,
never image bytes. In phase 1 the records themselves arrive light, their bytes set aside in pack files
(``transforms/payloads.py``), so steps 2 and 3 move no photo either.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas.records import BoilerplateHit, ImageRecord, PageGroup
from transforms.common import REJECTS, Reason, StageOutput, count, internal_error, reject
from transforms.dedupe import FindBoilerplate, boilerplate_reject
from transforms.settings import DedupeConfig, GroupConfig

STAGE = "group"

PAGE_CAP = "page_cap"

REASONS = (Reason(PAGE_CAP),)

KEEP, CAPPED, BOILERPLATE = "keep", "page_cap", "boilerplate"

PAYLOADS_PER_GROUP = "payloads_per_group"
"""Beam distribution ``group/payloads_per_group``: image payloads in each grouped value the stage handles (its
max is at most ``max_images_per_page``; the manifest and the hot-key tests read it)."""


CapKey = tuple[str, str, str, str]
"""``(image_id, image_url, record_id, source)``: the cap's sort key, and an image's key in the joins (the
source -- file and row -- makes it unique)."""


def cap_key(image: ImageRecord) -> CapKey:
    # Content-derived fields first, so that the choice does not depend on which file format or row
    # an image came from; the input location only separates otherwise identical records.
    return image.image_id, image.image_url or "", image.record_id, image.source


class CapEntry(NamedTuple):
    """What the cap needs of an image: no bytes."""

    key: CapKey
    phash: str


class CapDecision(NamedTuple):
    """The fate of one image of a page."""

    fate: str
    """``keep``, ``page_cap`` or ``boilerplate``."""
    n_page_images: int
    """Images of the page that reached grouping."""
    hit: BoilerplateHit | None = None
    """The boilerplate flag, for ``boilerplate``."""


def decide_page(entries: Iterable[CapEntry], boilerplate: Iterable[BoilerplateHit],
                max_images: int) -> Iterator[tuple[CapKey, CapDecision]]:
    """Every entry of one page with its fate: the ``max_images`` smallest keys of the non-boilerplate
    entries are kept; the other non-boilerplate ones are over the cap."""
    hits = {hit.phash: hit for hit in boilerplate}
    entries = list(entries)  # light: keys and hashes only
    keep = set(heapq.nsmallest(max_images, (e.key for e in entries if e.phash not in hits)))
    n = len(entries)
    for entry in entries:
        hit = hits.get(entry.phash)
        if hit is not None:
            yield entry.key, CapDecision(BOILERPLATE, n, hit)
        else:
            yield entry.key, CapDecision(KEEP if entry.key in keep else CAPPED, n)


class DecideCapFn(beam.DoFn):
    """``(page_url, {"entries": [...], "boilerplate": [...]})`` -> ``(cap key, CapDecision)`` per image."""

    def __init__(self, max_images: int) -> None:
        self._max_images = max_images

    def process(self, element: tuple[str, dict[str, Iterable[Any]]]) -> Iterator[tuple[CapKey, CapDecision]]:
        _, joined = element
        yield from decide_page(joined["entries"], joined["boilerplate"], self._max_images)


class RouteImageFn(beam.DoFn):
    """``(cap key, {"image": [image], "decision": [decision]})`` -> ``(page_url, (image, n_page_images))`` for a
    kept image; a ``page_cap`` or ``boilerplate`` dead letter otherwise."""

    def __init__(self, config: GroupConfig, boilerplate_max_pages: int) -> None:
        self._config = config
        self._boilerplate_max_pages = boilerplate_max_pages

    def setup(self) -> None:
        self._payloads = Metrics.distribution(STAGE, PAYLOADS_PER_GROUP)

    def process(self, element: tuple[CapKey, dict[str, Iterable[Any]]]) -> Iterator[Any]:
        _, joined = element
        images, decisions = list(joined["image"]), list(joined["decision"])
        self._payloads.update(len(images))
        if len(decisions) != 1:
            # Every image has exactly one decision by construction; if not, no image may vanish.
            error = RuntimeError(f"{len(decisions)} cap decisions for {len(images)} image(s) of one key")
            for image in images:
                yield internal_error(STAGE, error, record=image)
            return
        decision = decisions[0]
        for image in images:
            if decision.fate == KEEP:
                yield image.page_url, (image, decision.n_page_images)
            elif decision.fate == BOILERPLATE:
                yield boilerplate_reject(image, decision.hit, self._boilerplate_max_pages)
            else:
                yield reject(STAGE, PAGE_CAP, f"page has more than max_images_per_page "
                                              f"{self._config.max_images_per_page} images", record=image)


def page_group(page_url: str, kept: Iterable[tuple[ImageRecord, int]]) -> PageGroup:
    """The :class:`PageGroup` of a page's kept images (in cap order)."""
    pairs = sorted(kept, key=lambda pair: cap_key(pair[0]))
    images = tuple(image for image, _ in pairs)
    return PageGroup(page_url=page_url, domain=images[0].domain, images=images, n_page_images=pairs[0][1])


class BuildPageFn(beam.DoFn):
    """``(page_url, [(image, n_page_images), ...])`` -> ``PageGroup`` (at most the cap's images)."""

    def setup(self) -> None:
        self._payloads = Metrics.distribution(STAGE, PAYLOADS_PER_GROUP)

    def process(self, element: tuple[str, Iterable[tuple[ImageRecord, int]]]) -> Iterator[Any]:
        page_url, kept = element
        kept = list(kept)  # at most max_images_per_page pairs
        self._payloads.update(len(kept))
        try:
            group = page_group(page_url, kept)
        except Exception as error:  # noqa: BLE001 -- a bug here must not lose a page's records silently
            for image, _ in kept:
                yield internal_error(STAGE, error, record=image)
            return
        count(STAGE, "pages")
        yield group


class GroupByPage(beam.PTransform):
    """``ImageRecord``s -> ``PageGroup``s, one per canonical page, without boilerplate (found with
    :class:`~transforms.dedupe.FindBoilerplate` and the ``dedupe`` settings) and capped."""

    def __init__(self, config: GroupConfig, dedupe: DedupeConfig) -> None:
        super().__init__()
        self._config = config
        self._dedupe = dedupe

    def expand(self, images: beam.PCollection) -> StageOutput:
        boilerplate = images | "FindBoilerplate" >> FindBoilerplate(self._dedupe)
        entries = images | "CapEntries" >> beam.Map(lambda image: (image.page_url, CapEntry(cap_key(image),
                                                                                             image.phash)))
        decisions = (
            {"entries": entries, "boilerplate": boilerplate}
            | "JoinPageEntries" >> beam.CoGroupByKey()
            | "CapDecisions" >> beam.ParDo(DecideCapFn(self._config.max_images_per_page))
        )
        keyed = images | "KeyByImage" >> beam.Map(lambda image: (cap_key(image), image))
        routed = (
            {"image": keyed, "decision": decisions}
            | "JoinDecisions" >> beam.CoGroupByKey()
            | "RouteImages" >> beam.ParDo(RouteImageFn(self._config, self._dedupe.boilerplate_max_pages)).with_outputs(
                REJECTS, main="kept")
        )
        built = (
            routed.kept
            | "GroupKeptImages" >> beam.GroupByKey()
            | "BuildPages" >> beam.ParDo(BuildPageFn()).with_outputs(REJECTS, main="pages")
        )
        rejects = (routed[REJECTS], built[REJECTS]) | "GroupRejects" >> beam.Flatten()
        return StageOutput(built.pages, rejects)
