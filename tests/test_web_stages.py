"""The extract and fetch stages as Beam transforms: a WARC of real HTML pages whose <img> tags point at the loopback
site, some images captured in the WARC and joined, the others fetched; exact pairs and reasons, one fate per image."""

from __future__ import annotations

import re
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.ids import content_id, stable_id
from schemas.records import InputRecord
from tests.web_site import Capture, WebSite, sample_photos, write_warc
from transforms.extract import ExtractConfig, ExtractPages, ReadWarcFn, join_key, validate_warc
from transforms.fetch import Fetch, FetchConfig, shard_host
from transforms.read import InputFormatError

PHOTOS = sample_photos(8)
BACKPACK = "https://shop.example.com/products/backpack"
TEAPOT = "https://shop.example.com/products/teapot"
BLOG = "https://blog.example.org/2024/05/packing-list"


def pages(site: WebSite) -> dict[str, str]:
    img = site.url("/img/")
    return {
        BACKPACK: f"""<!DOCTYPE html><html><head><title>Red backpack</title></head><body>
<header><img src="{img}logo.jpg" alt="Example Shop"></header>
<h1>Red hiking backpack</h1>
<img src="{img}backpack-00.jpg" alt="Red backpack, front">
<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" data-src="{img}backpack-02.jpg" alt="Backpack, side">
<img src="{site.url('/private/backpack-03.jpg')}" alt="Backpack, inside">
<img src="{site.url('/missing.jpg')}" alt="Backpack strap">
<img src="{site.url('/noai.jpg')}" alt="Backpack on a trail">
<img src="{site.url('/disguised.jpg')}" alt="Backpack, back">
<img src="data:image/png;base64,iVBORw0KGgo=" alt="swatch">
<img src="{site.url('/pixel.gif')}" width="1" height="1">
</body></html>""",
        TEAPOT: f"""<html><head><meta name="robots" content="noai"></head><body>
<img src="{img}backpack-04.jpg" alt="Teapot"><img src="{img}backpack-05.jpg" alt="Teapot, lid"></body></html>""",
        BLOG: f"""<html><body><p>What I pack for a week in the hills.</p>
<img src="{img}backpack-00.jpg"><img src="{img}backpack_dog-00.jpg" alt="Dog with a backpack"></body></html>""",
    }


def build_warc(site: WebSite, path: Path) -> str:
    html = pages(site)
    captures = [Capture(url, body.encode("utf-8"), "text/html; charset=utf-8") for url, body in html.items()]
    captures += [
        Capture(site.url("/img/backpack-00.jpg"), PHOTOS["backpack-00.jpg"], "image/jpeg"),
        Capture(site.url("/img/backpack_dog-00.jpg"), PHOTOS["backpack_dog-00.jpg"], "image/jpeg",
                headers=(("X-Robots-Tag", "noimageai"),)),
        Capture(site.url("/img/backpack_dog-01.jpg"), PHOTOS["backpack_dog-01.jpg"], "image/jpeg"),  # unreferenced
        Capture("https://shop.example.com/gone", b"<html><body><img src='/x.jpg'></body></html>", "text/html",
                status=404),
    ]
    return write_warc(path, captures)


def expected(site: WebSite) -> tuple[list[tuple], list[tuple]]:
    img = site.url("/img/")
    photo0 = PHOTOS["backpack-00.jpg"]
    records = [
        (stable_id(BACKPACK, img + "backpack-00.jpg", content_id(photo0)), BACKPACK, img + "backpack-00.jpg",
         "Red backpack, front", content_id(photo0)),
        (stable_id(BLOG, img + "backpack-00.jpg", content_id(photo0)), BLOG, img + "backpack-00.jpg",
         "What I pack for a week in the hills.", content_id(photo0)),
        # fetched: the id it was read with
        (stable_id(BACKPACK, img + "backpack-02.jpg", None), BACKPACK, img + "backpack-02.jpg", "Backpack, side",
         content_id(PHOTOS["backpack-02.jpg"])),
    ]
    rejects = [
        ("extract", "navigation_image", BACKPACK, img + "logo.jpg"),
        ("extract", "inline_data_uri", BACKPACK, None),
        ("extract", "tracking_pixel", BACKPACK, site.url("/pixel.gif")),
        ("extract", "opted_out", TEAPOT, img + "backpack-04.jpg"),
        ("extract", "opted_out", TEAPOT, img + "backpack-05.jpg"),
        ("extract", "opted_out", BLOG, img + "backpack_dog-00.jpg"),  # the captured response says noimageai
        ("fetch", "robots_disallowed", BACKPACK, site.url("/private/backpack-03.jpg")),
        ("fetch", "fetch_http_4xx", BACKPACK, site.url("/missing.jpg")),
        ("fetch", "opted_out", BACKPACK, site.url("/noai.jpg")),
        ("fetch", "not_an_image", BACKPACK, site.url("/disguised.jpg")),
    ]
    return records, rejects


FETCH = FetchConfig(allow_private_addresses=True, per_host_rate=50.0, per_host_concurrency=4, timeout_s=3.0,
                    max_retries=0)


def run_stages(warc: str, options: PipelineOptions | None = None, *, expect: tuple[list, list]) -> dict[str, int]:
    records, rejects = expect
    p = TestPipeline(options=options)
    extracted = p | "Extract" >> ExtractPages([warc], ExtractConfig())
    fetched = extracted.output | "Fetch" >> Fetch(FETCH)
    out = fetched.output | "Summarize" >> beam.Map(
        lambda r: (r.record_id, r.page_url, r.image_url, r.text, content_id(r.image)))
    dead = ((extracted.rejects, fetched.rejects) | "AllRejects" >> beam.Flatten()
            | "SummarizeRejects" >> beam.Map(lambda r: (r.stage, r.reason, r.page_url, r.image_url)))
    assert_that(out, equal_to(records), label="Records")
    assert_that(dead, equal_to(rejects), label="Rejects")
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter())["counters"]
    return {f"{c.key.metric.namespace}/{c.key.metric.name}": c.committed for c in counters}


def test_warc_pages_become_pairs_with_captured_or_fetched_bytes(tmp_path: Path) -> None:
    with WebSite(PHOTOS) as site:
        warc = build_warc(site, tmp_path / "crawl.warc.gz")
        validate_warc(warc)
        expect = expected(site)
        counters = run_stages(warc, expect=expect)
        # one request per fetched URL, robots.txt once
        assert site.count("/robots.txt") == 1
        assert site.count("/img/backpack-02.jpg") == 1 and site.count("/img/backpack-00.jpg") == 0
        assert site.count("/private/backpack-03.jpg") == 0
    assert counters["extract/pages"] == 3 and counters["extract/pages_not_ok"] == 1
    # every <img> found is counted once, and ends as one record or one dead letter
    records, rejects = expect
    assert counters["extract/records"] == len(records) + len(rejects) == 13
    assert counters["extract/images_captured"] == 3 and counters["extract/images_unreferenced"] == 1
    assert counters["fetch/fetched"] == 1 and counters["fetch/passed_through"] == 2


@pytest.mark.slow
def test_the_stages_pickle_and_run_on_the_multiprocess_direct_runner(tmp_path: Path) -> None:
    with WebSite(PHOTOS) as site:
        warc = build_warc(site, tmp_path / "crawl.warc")  # uncompressed WARC this time
        options = PipelineOptions(["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"])
        run_stages(warc, options, expect=expected(site))


def test_records_with_bytes_pass_through_untouched_and_bad_urls_are_rejected() -> None:
    with_bytes = InputRecord("a", "f:0", BACKPACK, "https://i.example/a.jpg", "a", PHOTOS["backpack-00.jpg"])
    no_url = InputRecord("b", "f:1", BACKPACK, None, "b", None)
    empty = InputRecord("c", "f:2", BACKPACK, "https://i.example/c.jpg", "c", b"")  # a broken download, kept
    bad = InputRecord("d", "f:3", BACKPACK, "ftp://i.example/d.jpg", "d", None)
    with TestPipeline() as p:
        stage = p | beam.Create([with_bytes, no_url, empty, bad]) | Fetch(FETCH)
        assert_that(stage.output, equal_to([with_bytes, no_url, empty]), label="Output")
        assert_that(stage.rejects | beam.Map(lambda r: (r.id, r.reason)), equal_to([("d", "fetch_invalid_url")]),
                    label="Rejects")


def test_a_big_host_is_split_into_shards_that_share_its_limits() -> None:
    records = [InputRecord(f"r{i}", "f", BACKPACK, f"https://i.example/{i % 150}.jpg", None, None) for i in range(300)]
    shards = shard_host("i.example:443", records, FetchConfig(urls_per_shard=64, per_host_concurrency=2))
    assert [key for key, _ in shards] == [("i.example:443", 0, 2), ("i.example:443", 1, 2)]
    assert sum(len(shard) for _, shard in shards) == 300
    urls = [{r.image_url for r in shard} for _, shard in shards]
    assert not urls[0] & urls[1]  # a URL's records stay together: fetched once
    small = shard_host("i.example:443", records[:10], FetchConfig())
    assert [key for key, _ in small] == [("i.example:443", 0, 1)]


def test_join_keys_and_bad_warc_files(tmp_path: Path) -> None:
    assert join_key("HTTP://Shop.Example.com:80/a.jpg?x=1#top") == "http://shop.example.com/a.jpg?x=1"
    assert join_key("https://shop.example.com:8443/a.jpg") == "https://shop.example.com:8443/a.jpg"
    bad = tmp_path / "bad.warc.gz"
    bad.write_bytes(b"this is not a WARC file\n" * 10)
    with pytest.raises(InputFormatError, match="not a readable WARC file"):
        validate_warc(str(bad))


def test_a_cut_off_warc_file_keeps_its_pages_and_is_reported(tmp_path: Path) -> None:
    with WebSite(PHOTOS) as site:
        warc = build_warc(site, tmp_path / "crawl.warc.gz")
    data = Path(warc).read_bytes()
    Path(warc).write_bytes(data[:len(data) // 2])  # inside the first captured photo, after the three pages
    fn = ReadWarcFn(ExtractConfig())
    fn.setup()
    items = list(fn.process(warc))
    rejects = [item.value for item in items if isinstance(item, beam.pvalue.TaggedOutput) and item.tag == "rejects"]
    pairs = [item for item in items if not isinstance(item, beam.pvalue.TaggedOutput)]
    # all 13 <img> of the three pages: 8 pairs, 5 skipped tags; the captured photos after the cut are lost
    assert len(pairs) == 8
    truncated = [r for r in rejects if r.reason == "truncated_file"]
    assert len(rejects) == 6 and len(truncated) == 1 and rejects[-1] is truncated[0]
    assert truncated[0].source == warc and truncated[0].n_images == 0 and truncated[0].stage == "extract"
    assert re.search(r"crawl.warc.gz: the WARC file ends early: .*cut off.*; 3 pages were read", truncated[0].detail)
    validate_warc(warc)  # a WARC file all the same: the run reads it and reports the cut
