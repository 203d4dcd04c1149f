#!/usr/bin/env python3
"""Peak memory of grouping one huge page: the hot-key-safe ``GroupByPage`` against group-then-cap.

    python benchmarks/bench_group.py --images 20000 --output benchmarks/results/group.json

One gallery page of ``--images`` distinct real photos (``benchmarks/crawl_gen.py``: variants of the bundled
sample's DreamBench photos, 288-448 px JPEG, about 25 kB each) goes through two ways of capping it at
``group.max_images_per_page`` (32) on the multi-process DirectRunner with 2 SDK workers:

* ``group_then_cap``: what the stage did before (and what a plain Beam pipeline does): ``CoGroupByKey`` of the
  images and the boilerplate flags by page, then the cap over the grouped values -- every payload of the page in
  one grouped value, in one worker;
* ``group_by_page``: the stage (``transforms/group.py``): the cap decided on keys and hashes, each image joined to
  its decision by its own key, only the kept images grouped.

For each: the peak resident memory of every SDK worker process and of the runner (the launching process, which
on the DirectRunner holds every PCollection between stages whatever the pipeline does), the largest element
Beam sampled, and the wall time. Both must keep the same 32 images.
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import apache_beam as beam  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from benchmarks.bench_scale import PeakMemory  # noqa: E402
from benchmarks.common import header, write_results  # noqa: E402
from benchmarks.crawl_gen import build_crawl  # noqa: E402
from pipeline.accounting import largest_elements  # noqa: E402
from pipeline.runners import fnapi_data_plane_fix  # noqa: E402
from schemas.ids import content_id  # noqa: E402
from schemas.records import ImageRecord  # noqa: E402
from transforms.dedupe import FindBoilerplate  # noqa: E402
from transforms.group import GroupByPage, cap_key  # noqa: E402
from transforms.read import InputFile, ReadPairs  # noqa: E402
from transforms.settings import DedupeConfig, GroupConfig, ReadConfig  # noqa: E402

CAP = 32


def to_image(record: Any) -> ImageRecord:
    """An input record as an image record, without normalizing (the benchmark is about grouping)."""
    return ImageRecord(image_id=content_id(record.image), record_id=record.record_id, source=record.source,
                       page_url=record.page_url, domain=record.page_url.split("/")[2], image_url=record.image_url,
                       text=record.text, image=record.image, width=0, height=0,
                       phash=content_id(record.image)[:16], source_width=0, source_height=0, source_format="JPEG")


def group_then_cap(element: tuple[str, dict[str, Any]]) -> list[str]:
    """The former stage: every image of the page in one grouped value, then the cap."""
    _, joined = element
    images = list(joined["images"])
    hits = {hit.phash for hit in joined["boilerplate"]}
    return [key[3] for key in heapq.nsmallest(CAP, (cap_key(im) for im in images if im.phash not in hits))]


def _save(sources: list[str], path: str) -> None:
    Path(path).write_text("\n".join(sorted(sources)))


def run(variant: str, files: list[str], kept_path: str) -> dict[str, Any]:
    options = PipelineOptions(["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"])
    p = beam.Pipeline(options=options)
    records, _ = p | "Read" >> ReadPairs([InputFile(path, "parquet") for path in files], ReadConfig())
    images = records | "ToImages" >> beam.Map(to_image)
    if variant == "group_by_page":
        pages, _ = images | "GroupByPage" >> GroupByPage(GroupConfig(max_images_per_page=CAP), DedupeConfig())
        kept = pages | "KeptSources" >> beam.FlatMap(lambda g: [im.source for im in g.images])
    else:
        flags = images | "FindBoilerplate" >> FindBoilerplate(DedupeConfig())
        keyed = images | "KeyByPage" >> beam.Map(lambda im: (im.page_url, im))
        kept = ({"images": keyed, "boilerplate": flags} | "JoinByPage" >> beam.CoGroupByKey()
                | "Cap" >> beam.FlatMap(group_then_cap))
    _ = kept | "Collect" >> beam.combiners.ToList() | "Save" >> beam.Map(_save, kept_path)
    memory = PeakMemory([os.getpid()])
    memory.start()
    started = time.monotonic()
    with fnapi_data_plane_fix():
        result = p.run()
        result.wait_until_finish()
    seconds = time.monotonic() - started
    peaks = memory.stop()
    return {"seconds": round(seconds, 1), "peak_rss_mib": peaks,
            "worker_peak_mib": max(peaks.get("worker", [0])), "largest_element": largest_elements(result, p)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--output", default="benchmarks/results/group.json")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="bench_group_")
    files = build_crawl(os.path.join(workdir, "crawl"), args.images, hot_page=args.images, records_per_file=4000)
    payload = sum(os.path.getsize(f) for f in files)
    results: dict[str, Any] = {**header("group"), "images": args.images, "max_images_per_page": CAP,
                               "crawl_bytes": payload, "runner": "DirectRunner multi_processing, 2 workers",
                               "variants": {}}
    kept = {}
    for variant in ("group_then_cap", "group_by_page"):
        path = os.path.join(workdir, f"{variant}.txt")
        results["variants"][variant] = run(variant, files, path)
        kept[variant] = Path(path).read_text().split("\n")
        print(variant, results["variants"][variant], flush=True)
    assert kept["group_then_cap"] == kept["group_by_page"] and len(kept["group_by_page"]) == CAP, kept
    results["same_images_kept"] = True
    base, new = results["variants"]["group_then_cap"], results["variants"]["group_by_page"]
    results["worker_peak_ratio"] = round(new["worker_peak_mib"] / base["worker_peak_mib"], 3)
    write_results(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
