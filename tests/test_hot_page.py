"""Hot-key-safe grouping: a gallery page of thousands of images never gathers its image bytes in one worker.

A page of 1,500 small real JPEGs (plus boilerplate and an ordinary page) goes through ``FindBoilerplate`` and
``GroupByPage`` on the multi-process DirectRunner and through the portable runner (job service + worker pool).
Every record's fate is checked -- the ``max_images_per_page`` smallest keys kept, boilerplate out, the rest
``page_cap`` -- and the stage's own distribution ``group/payloads_per_group`` shows that no grouped value held
more than ``max_images_per_page`` image payloads.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from schemas.ids import content_id
from schemas.records import ImageRecord
from tests.clusters import CreateFromFile
from tests.conftest import portable_args
from transforms.dedupe import DedupeConfig
from transforms.group import PAYLOADS_PER_GROUP, GroupByPage, GroupConfig, cap_key

pytestmark = pytest.mark.slow

HOT = "https://gallery.example.org/all"
N_HOT, CAP = 1500, 32
LOGO_PHASH = "f0f0f0f0f0f0f0f0"


def _jpeg(rng: random.Random) -> bytes:
    image = Image.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3)))
    image.putpixel((rng.randrange(16), rng.randrange(16)), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return out.getvalue()


def _record(page: str, i: int, data: bytes, phash: str) -> ImageRecord:
    return ImageRecord(image_id=content_id(data), record_id=f"r{page}{i}", source=f"crawl:{page}:{i}", page_url=page,
                       domain=page.split("/")[2], image_url=f"{page}/img/{i}.jpg", text=None, image=data,
                       width=16, height=16, phash=phash, source_width=16, source_height=16, source_format="JPEG")


@pytest.fixture(scope="module")
def records() -> list[ImageRecord]:
    rng = random.Random(0)
    out = [_record(HOT, i, _jpeg(rng), f"{rng.getrandbits(64):016x}") for i in range(N_HOT)]
    # A logo on 12 pages (the hot page among them): boilerplate, it takes no place under the cap.
    logo = _jpeg(rng)
    out += [_record(page, 10_000 + k, logo, LOGO_PHASH)
            for k, page in enumerate([HOT] + [f"https://shop.example.com/p/{k}" for k in range(11)])]
    out += [_record("https://shop.example.com/p/0", 20_000 + k, _jpeg(rng), f"{rng.getrandbits(64):016x}")
            for k in range(5)]
    return out


def _expected(records: list[ImageRecord]) -> tuple[list, list]:
    hot = sorted((r for r in records if r.page_url == HOT and r.phash != LOGO_PHASH), key=cap_key)
    kept = {r.source for r in hot[:CAP]} | {r.source for r in records
                                           if r.page_url != HOT and r.phash != LOGO_PHASH}
    fates = [(r.source, "boilerplate") for r in records if r.phash == LOGO_PHASH]
    fates += [(r.source, "page_cap") for r in hot[CAP:]]
    return sorted(kept), fates


def _run(records: list[ImageRecord], options: PipelineOptions, folder: Path) -> dict:
    p = TestPipeline(options=options)
    images = p | CreateFromFile(records, folder)
    pages, rejects = images | GroupByPage(GroupConfig(max_images_per_page=CAP), DedupeConfig(boilerplate_max_pages=10))
    kept, fates = _expected(records)
    assert_that(pages | beam.FlatMap(lambda g: [im.source for im in g.images]), equal_to(kept), label="Kept")
    assert_that(rejects | beam.Map(lambda r: (r.source, r.reason)), equal_to(fates), label="Rejects")
    assert_that(pages | beam.Map(lambda g: (g.page_url, g.n_page_images, len(g.images))),
                equal_to([(HOT, N_HOT + 1, CAP), ("https://shop.example.com/p/0", 6, 5)]), label="Pages")
    result = p.run()
    result.wait_until_finish()
    return {d.key.step: d.committed for d in result.metrics().query()["distributions"]
            if (d.key.metric.namespace, d.key.metric.name) == ("group", PAYLOADS_PER_GROUP)}


def _assert_bounded(by_step: dict) -> None:
    """Every grouped value that held image bytes held at most ``CAP`` of them: each image met its decision alone,
    and only the kept images of a page were grouped."""
    route = next(d for step, d in by_step.items() if "RouteImages" in step)
    build = next(d for step, d in by_step.items() if "BuildPages" in step)
    assert (route.count, route.max, route.sum) == (N_HOT + 12 + 5, 1, N_HOT + 12 + 5)
    assert (build.count, build.max, build.sum) == (2, CAP, CAP + 5)


def test_hot_page_on_the_multi_process_runner(records: list[ImageRecord], tmp_path: Path) -> None:
    options = PipelineOptions(["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"])
    _assert_bounded(_run(records, options, tmp_path))


@pytest.mark.portable
def test_hot_page_on_the_portable_runner(records: list[ImageRecord], portable_services: tuple[str, str],
                                         tmp_path: Path) -> None:
    _assert_bounded(_run(records, PipelineOptions(list(portable_args(portable_services))), tmp_path))
