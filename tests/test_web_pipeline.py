"""Web inputs wired into phase 1: WARC files through extract, document presets and column mappings through read,
the fetch stage when an input carries no bytes, and the accounting from every ``<img>`` found to its one fate.

The end-to-end runs use the loopback site of ``tests/web_site.py`` (127.0.0.1 only) and the real photos of the
bundled sample; ``scripts/demo_web.py`` (``make demo-web``) is run through phase 1 and held to its plan.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import build_config
from pipeline.phases import CLUSTERS, PhaseInputs
from schemas.ids import content_id, stable_id
from tests.conftest import REPO, run_pipeline
from tests.web_site import WebSite
from transforms import extract, fetch, read
from transforms.common import REJECTS
from transforms.read import InputFile, ReadConfig, ReadFileFn, expand_inputs, input_format, validate_input_file

DATA = Path(__file__).parent / "data" / "web"
MMC4_FILE = DATA / "mmc4_docs.jsonl"
I2D_FILE = DATA / "img2dataset_00000.parquet"

NO_MODELS: tuple[str, ...] = ("--set", "embed.enabled=false", "--set", "cluster_filter.enabled=false",
                              "--set", "cross_page.enabled=false", "--set", "semantic_dedup.enabled=false",
                              "--set", "caption.enabled=false",
                              "--set", "subject.enabled=false", "--set", "prompts.enabled=false")
LOOPBACK_FETCH: tuple[str, ...] = ("--set", "fetch.allow_private_addresses=true", "--set", "fetch.per_host_rate=50",
                                   "--set", "fetch.per_host_concurrency=8")


def demo_web():
    """``scripts/demo_web.py`` as a module (scripts/ is not a package)."""
    if "demo_web" not in sys.modules:
        spec = importlib.util.spec_from_file_location("demo_web", REPO / "scripts" / "demo_web.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["demo_web"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["demo_web"]


def read_file(path: Path, fmt: str, config: ReadConfig) -> tuple[list, list]:
    fn = ReadFileFn(config)
    fn.setup()
    records, rejects = [], []
    for item in fn.process(InputFile(str(path), fmt)):
        if getattr(item, "tag", None) == REJECTS:
            rejects.append(item.value)
        else:
            records.append(item)
    return records, rejects


# --- formats, layouts and the graph ------------------------------------------------------------------------------


def test_warc_files_are_an_input_format(tmp_path: Path) -> None:
    assert input_format("gs://b/CC-MAIN-1.warc.gz") == input_format("crawl.WARC") == read.WARC
    (tmp_path / "a.warc.gz").write_bytes(b"")
    (tmp_path / "b.jsonl").write_text("")
    assert [(Path(f.path).name, f.format) for f in expand_inputs([str(tmp_path / "*")])] == [
        ("a.warc.gz", read.WARC), ("b.jsonl", read.JSONL)]
    bad = tmp_path / "bad.warc"
    bad.write_text("GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(read.InputFormatError, match="bad.warc: not a readable WARC file"):
        validate_input_file(InputFile(str(bad), read.WARC), ReadConfig())


def test_the_fetch_stage_is_in_phase_1_only_when_an_input_has_no_bytes() -> None:
    stage = next(s for s in CLUSTERS.stages if s.label == "Fetch")
    assert CLUSTERS.stages[0] is stage  # right after the source, before Normalize
    parquet, warc, jsonl = InputFile("a.parquet", read.PARQUET), InputFile("a.warc.gz", read.WARC), \
        InputFile("a.jsonl", read.JSONL)
    tar = InputFile("a.tar", read.WEBDATASET)

    def applies(files: list[InputFile], *overrides: str) -> bool:
        return stage.applies(build_config("demo", None, overrides), PhaseInputs("out", files=tuple(files)))

    assert not applies([parquet, jsonl, tar])
    assert applies([parquet, warc])
    assert applies([jsonl], "read.preset=mmc4") and applies([parquet], "read.preset=laion")
    assert not applies([parquet], "read.preset=img2dataset")  # it carries its bytes
    assert not applies([tar], "read.preset=mmc4")  # presets apply to Parquet and JSONL only
    assert applies([parquet], "fetch.enabled=always") and not applies([warc], "fetch.enabled=never")


def test_read_extract_and_fetch_declare_documented_reasons() -> None:
    table = (REPO / "docs" / "reasons.md").read_text()
    documented = set(re.findall(r"^\| (\w+) \| `(\w+)` \|", table, flags=re.MULTILINE))
    for module in (read, extract, fetch):
        for reason in module.REASONS:
            assert (module.STAGE, reason.code) in documented or ("any", reason.code) in documented, \
                (module.STAGE, reason.code)
    codes = {reason.code for reason in CLUSTERS.reasons()}
    assert {"download_failed", "navigation_image", "fetch_http_4xx", "robots_disallowed", "truncated_file"} <= codes


def test_read_preset_and_columns_choose_the_layout_of_parquet_and_jsonl() -> None:
    mmc4 = InputFile(str(MMC4_FILE), read.JSONL)
    with pytest.raises(read.InputFormatError, match="first record has keys"):
        validate_input_file(mmc4, ReadConfig())  # our own JSONL layout
    config = ReadConfig(preset="mmc4")
    validate_input_file(mmc4, config)
    records, rejects = read_file(MMC4_FILE, read.JSONL, config)
    rows = [json.loads(line) for line in MMC4_FILE.read_text().splitlines()]
    assert rejects == [] and len(records) == sum(len(row["image_info"]) for row in rows)
    assert all(r.image is None and r.record_id == stable_id(r.page_url, r.image_url, None) for r in records)

    # img2dataset's Parquet through the bare mapping: its failed rows keep their message (status, error_message)
    i2d = InputFile(str(I2D_FILE), read.PARQUET)
    with pytest.raises(read.InputFormatError, match="has no column 'image_url'"):
        validate_input_file(i2d, ReadConfig())
    mapped = build_config("demo", None, ["read.columns={image_url: url, text: caption, image: jpg}"]).read
    validate_input_file(i2d, mapped)
    records, rejects = read_file(I2D_FILE, read.PARQUET, mapped)
    table = pq.read_table(I2D_FILE).to_pylist()
    assert sorted((r.image_url, r.text, content_id(r.image)) for r in records) == sorted(
        (row["url"], row["caption"], content_id(row["jpg"])) for row in table if row["status"] == "success")
    assert sorted((r.reason, r.image_url, r.detail) for r in rejects) == sorted(
        ("download_failed", row["url"], f"download failed upstream: {row['status']}; {row['error_message']}")
        for row in table if row["status"] != "success")
    with pytest.raises(read.InputFormatError, match=r"read.preset=obelics needs column\(s\) images"):
        validate_input_file(i2d, ReadConfig(preset="obelics"))


def test_config_refuses_unknown_presets_and_fields_before_anything_runs() -> None:
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="unknown read.preset 'cc3m'"):
        build_config("demo", None, ["read.preset=cc3m"])
    with pytest.raises(ConfigError, match="unknown field.*url"):
        build_config("demo", None, ["read.columns={url: src}"])
    with pytest.raises(ConfigError, match="fetch.enabled"):
        build_config("demo", None, ["fetch.enabled=sometimes"])


def test_run_help_lists_the_web_formats() -> None:
    from pipeline.run import add_run_arguments

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    text = " ".join(parser.format_help().split())
    for word in (".warc.gz", ".tar.gz", "read.preset=mmc4|obelics|img2dataset|laion", "read.columns", "fetch.*"):
        assert word in text, word


# --- end to end on the loopback site ------------------------------------------------------------------------------


def fates(output: Path, record_ids: dict[str, object]) -> tuple[collections.Counter, collections.Counter]:
    """(record ids of the output: kept, in a whole-cluster row, or rejected one by one after fetch; the rows of the
    extract and fetch stages as (stage, reason, page_url, image_url))."""
    kept: collections.Counter = collections.Counter()
    refused: collections.Counter = collections.Counter()
    for path in sorted((output / "clusters").glob("*.parquet")):
        for cluster in pq.read_table(path).to_pylist():
            kept.update(im["record_id"] for im in cluster["images"])
    for path in sorted((output / "rejects").glob("clusters-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            if row["stage"] in ("extract", "fetch"):
                refused[(row["stage"], row["reason"], row["page_url"], row["image_url"])] += 1
            elif row["record_ids"]:
                kept.update(row["record_ids"])
            else:
                assert row["n_images"] == 1 and row["id"] in record_ids, row
                kept[row["id"]] += 1
    return kept, refused


@pytest.mark.slow
def test_demo_web_phase_1_gives_every_img_exactly_one_fate(tmp_path: Path) -> None:
    demo = demo_web().run_demo(str(tmp_path / "out"), "clusters")
    plan, manifest = demo.plan, demo.manifest

    def record_id(tag) -> str:
        return stable_id(tag.page_url, tag.image_url, content_id(tag.captured) if tag.captured else None)

    reaching = [tag for tag in plan if tag.reason is None]  # to normalize, with their bytes
    ids = {record_id(tag): tag for tag in reaching}
    kept, refused = fates(tmp_path / "out", ids)
    assert kept == collections.Counter(record_id(tag) for tag in reaching)
    assert refused == collections.Counter((t.stage, t.reason, t.page_url, t.image_url) for t in plan if t.reason)

    records = manifest["records"]
    assert records["input"] == len(plan) == records["kept"] + sum(records["rejected"].values())
    assert records["reconciled"]
    phase = manifest["phases"]["clusters"]
    assert phase["input_records"] == {"read": 0, "extract": len(plan)}
    counters = phase["counters"]
    fetched = [tag for tag in reaching if tag.captured is None]
    assert counters["extract"]["pages"] == len({tag.page_url for tag in plan})
    assert counters["extract"]["pairs_with_bytes"] == len(reaching) - len(fetched)
    assert counters["fetch"]["fetched"] == len(fetched)
    assert phase["fetch"]["rejected"] == dict(collections.Counter(t.reason for t in plan if t.stage == "fetch"))
    step = next(s for s in manifest["funnel"] if s["step"] == "records with image bytes")
    assert step["count"] == len(reaching)

    # Politeness, from the server's side: robots.txt once, nothing it disallows, each URL fetched once.
    paths = collections.Counter(request.path for request in demo.requests)
    assert paths.pop("/robots.txt") == 1
    assert not [path for path in paths if path.startswith("/private/")]
    wanted = {tag.image_url.split("/", 3)[3] for tag in fetched} | {"missing.jpg", "noai.jpg"}
    assert paths == collections.Counter({f"/{path}": 1 for path in wanted})


def mmc4_rows(site: WebSite, pages: dict[str, list[tuple[str, str]]]) -> list[dict]:
    """MMC4 documents (the schema of the real rows in tests/data/web/mmc4_docs.jsonl) whose images are on the site;
    the first page also links a missing image and one robots.txt disallows."""
    rows = []
    for i, (page_url, images) in enumerate(pages.items()):
        texts = [f"Shop the {page_url.rsplit('/', 1)[-1]} range."] + [alt for _, alt in images]
        info = [{"image_name": name, "raw_url": site.url(f"/img/{name}"), "matched_text_index": j + 1,
                 "matched_sim": 0.3, "face_detections": None} for j, (name, _) in enumerate(images)]
        if i == 0:
            info += [{"image_name": "gone.jpg", "raw_url": site.url("/missing.jpg"), "matched_text_index": 0,
                      "matched_sim": 0.2, "face_detections": None},
                     {"image_name": "staff.jpg", "raw_url": site.url(f"/private/{images[0][0]}"),
                      "matched_text_index": 0, "matched_sim": 0.2, "face_detections": None}]
        rows.append({"url": page_url, "text_list": texts, "image_info": info,
                     "similarity_matrix": [[0.3] * len(texts)] * len(info)})
    return rows


@pytest.mark.slow
def test_mmc4_documents_through_the_fetcher_to_clusters(tmp_path: Path) -> None:
    pages = dict(list(demo_web().product_pages().items())[:3])
    with WebSite() as site:
        base = site.base
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in mmc4_rows(site, pages)))
        out = run_pipeline([path], tmp_path / "out", "--profile", "demo", *NO_MODELS, *LOOPBACK_FETCH,
                           "--set", "read.preset=mmc4")
        assert site.count("/robots.txt") == 1 and site.count("/missing.jpg") == 1
    clusters = {c["page_url"]: c for c in out.clusters()}
    assert sorted(clusters) == sorted(pages)
    for page_url, images in pages.items():
        cluster = clusters[page_url]
        assert sorted(im["record_id"] for im in cluster["images"]) == sorted(
            stable_id(page_url, f"{base}/img/{name}", None) for name, _ in images)
        assert sorted(im["text"] for im in cluster["images"]) == sorted(alt for _, alt in images)
    first = next(iter(pages))
    assert sorted((r["stage"], r["reason"], r["page_url"]) for r in out.rejects()) == [
        ("fetch", "fetch_http_4xx", first), ("fetch", "robots_disallowed", first)]
    records = out.manifest["records"]
    n = sum(len(images) for images in pages.values())
    assert records == {"input": n + 2, "kept": n, "rejected": {"fetch_http_4xx": 1, "robots_disallowed": 1},
                       "reconciled": True}
    assert out.manifest["phases"]["clusters"]["counters"]["read"]["records"] == n + 2
