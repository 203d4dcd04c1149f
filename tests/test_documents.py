"""Document rows (transforms/documents.py): real MMC4 and OBELICS rows, a real img2dataset Parquet shard, column
mappings for Parquet and JSONL, failed downloads kept as dead letters."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.ids import content_id, stable_id
from schemas.records import InputRecord
from transforms.common import REJECTS
from transforms.documents import (
    DOWNLOAD_FAILED,
    DocumentSpec,
    check_document_layout,
    document_spec,
    mmc4_pairs,
    obelics_pairs,
    read_documents,
    row_pairs,
)
from transforms.read import JSONL, MALFORMED_RECORD, PARQUET, InputFormatError

DATA = Path(__file__).parent / "data" / "web"
MMC4_FILE = DATA / "mmc4_docs.jsonl"
OBELICS_ROW = json.loads((DATA / "obelics_row.json").read_text())
I2D_FILE = DATA / "img2dataset_00000.parquet"


def split(items: list) -> tuple[list[InputRecord], list]:
    records = [item for item in items if isinstance(item, InputRecord)]
    rejects = [item.value for item in items if not isinstance(item, InputRecord)]
    assert all(item.tag == REJECTS for item in items if not isinstance(item, InputRecord))
    return records, rejects


def test_an_mmc4_document_gives_one_pair_per_image_with_its_matched_sentence() -> None:
    row = json.loads(MMC4_FILE.read_text().splitlines()[0])
    records, rejects = split(mmc4_pairs(row, "docs.jsonl:1"))
    page = "http://shopeasels.ml/meka/fitbit-force-cyber-monday-deals-62.php"
    assert rejects == []
    assert [(r.source, r.image_url, r.text) for r in records] == [
        ("docs.jsonl:1#img0", "http://oyster.ignimgs.com/mediawiki/apis.ign.com/black-friday-deals-for-gamers/thumb/"
                              "a/a3/Targetp42016.jpg/468px-Targetp42016.jpg",
         "Early Black Friday deals on the Apple iPad Pro, HP Envy x360 laptop,."),
        ("docs.jsonl:1#img1", "http://oyster.ignimgs.com/mediawiki/apis.ign.com/black-friday-deals-for-gamers/thumb/"
                              "a/a9/Targetp22016.jpg/468px-Targetp22016.jpg",
         "las vegas walmart black friday deals jewelry best buy black friday fitbit force black friday gopro."),
        ("docs.jsonl:1#img2", records[2].image_url, "Fitbit Charge coupon code, Fitbit Charge discount and deals."),
        ("docs.jsonl:1#img3", records[3].image_url, "The Charge looks to be a revision of the Fitbit Force,."),
    ]
    assert all(r.page_url == page and r.image is None for r in records)
    assert records[0].record_id == stable_id(page, records[0].image_url, None)


def test_mmc4_out_of_range_indexes_and_broken_entries() -> None:
    row = {"url": "https://p.example/a", "text_list": ["only sentence"],
           "image_info": [{"raw_url": "https://i.example/1.jpg", "matched_text_index": 5},
                          {"matched_text_index": 0}, "nonsense"]}
    records, rejects = split(mmc4_pairs(row, "f:1"))
    assert [(r.image_url, r.text) for r in records] == [("https://i.example/1.jpg", None)]
    assert [(r.reason, r.source) for r in rejects] == [(MALFORMED_RECORD, "f:1#img1"), (MALFORMED_RECORD, "f:1#img2")]
    records, rejects = split(mmc4_pairs({"url": "https://p.example/a", "image_info": "x"}, "f:2"))
    assert records == [] and [r.reason for r in rejects] == [MALFORMED_RECORD]


def test_an_obelics_row_gives_its_image_with_the_page_url_from_general_metadata() -> None:
    records, rejects = split(obelics_pairs(OBELICS_ROW, "obelics.parquet:2"))
    page = "https://slidelegend.com/the-influencing-factors-on-entrepreneurship-ti-journals_59d9b3c91723dd4b8ead833e.html"
    image = ("https://slidelegend.com/img/60x80/management-factors-influencing-open-innovation-div_"
             "59c212ac1723dd1242167485.jpg")
    assert rejects == []
    assert records == [InputRecord(stable_id(page, image, None), "obelics.parquet:2#img1", page, image, None, None)]


def test_obelics_alt_text_and_interleaved_texts() -> None:
    metadata = json.loads(OBELICS_ROW["metadata"])
    metadata[1]["alt_text"] = "Management factors influencing open innovation"
    row = {"images": OBELICS_ROW["images"], "texts": ["Intro paragraph.", None, "Closing paragraph."],
           "metadata": json.dumps(metadata), "general_metadata": None}
    records, _ = split(obelics_pairs(row, "o:1"))
    # without general_metadata the page URL comes from the image's document_url
    assert [(r.page_url, r.text) for r in records] == [(metadata[1]["document_url"],
                                                        "Management factors influencing open innovation")]
    bad = dict(row, metadata="[null]")
    assert [r.reason for r in split(obelics_pairs(bad, "o:2"))[1]] == [MALFORMED_RECORD]


def test_a_real_img2dataset_parquet_shard_loads_and_keeps_its_failed_downloads() -> None:
    spec = document_spec("img2dataset", None)
    assert spec is not None and not spec.byteless
    check_document_layout(str(I2D_FILE), PARQUET, spec)
    records, rejects = split(list(read_documents(str(I2D_FILE), PARQUET, spec)))
    table = pq.read_table(I2D_FILE).to_pylist()
    ok = [row for row in table if row["status"] == "success"]
    assert sorted(r.text for r in records) == ["Backpack, side view", "backpack"]
    for record in records:
        row = next(row for row in ok if row["url"] == record.image_url)
        # img2dataset's own sha256 of what it downloaded matches the bytes we read
        assert hashlib.sha256(record.image).hexdigest() == row["sha256"]
        assert record.page_url == "https://shop.example.com/products/backpack"
        assert record.record_id == stable_id(record.page_url, record.image_url, content_id(record.image))
    assert sorted((r.reason, r.detail) for r in rejects) == [
        (DOWNLOAD_FAILED, "download failed upstream: failed_to_download; HTTP Error 404: Not Found"),
        (DOWNLOAD_FAILED, "download failed upstream: failed_to_download; Use of image disallowed by X-Robots-Tag "
                          "directive"),
    ]
    assert all(r.stage == "read" and r.image_url and r.source.startswith(str(I2D_FILE) + ":") for r in rejects)


def test_a_column_mapping_loads_a_laion_style_url_list(tmp_path: Path) -> None:
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": ["https://i.example/a.jpg", "https://i.example/b.jpg"],
                             "TEXT": ["a red teapot", None], "WIDTH": [640, 480]}), path)
    spec = document_spec("laion", {"page_url": "URL"})
    assert spec is not None and spec.byteless
    check_document_layout(str(path), PARQUET, spec)
    records, rejects = split(list(read_documents(str(path), PARQUET, spec)))
    assert rejects == []
    assert [(r.source, r.page_url, r.image_url, r.text, r.image) for r in records] == [
        (f"{path}:0", "https://i.example/a.jpg", "https://i.example/a.jpg", "a red teapot", None),
        (f"{path}:1", "https://i.example/b.jpg", "https://i.example/b.jpg", None, None)]


def test_a_column_mapping_on_jsonl_with_base64_images(tmp_path: Path, product_photos: list[bytes]) -> None:
    path = tmp_path / "pairs.jsonl.gz"
    lines = [
        {"page": "https://shop.example.com/p/1", "src": "https://shop.example.com/1.jpg", "caption": "one",
         "jpg": base64.b64encode(product_photos[0]).decode()},
        {"page": "https://shop.example.com/p/1", "src": "https://shop.example.com/2.jpg", "caption": "two",
         "jpg": None, "status": "failed_to_download", "error_message": "timed out"},
        {"page": "https://shop.example.com/p/1", "src": "https://shop.example.com/3.jpg", "caption": 3},
        {"page": "https://shop.example.com/p/1", "src": "https://shop.example.com/4.jpg", "jpg": "***"},
    ]
    path.write_bytes(gzip.compress(("\n".join(json.dumps(line) for line in lines) + "\n\nnot json\n").encode()))
    spec = DocumentSpec(columns={"page_url": "page", "image_url": "src", "text": "caption", "image": "jpg",
                                 "status": "status", "error": "error_message"})
    check_document_layout(str(path), JSONL, spec)
    records, rejects = split(list(read_documents(str(path), JSONL, spec)))
    assert [(r.source, r.text, r.image) for r in records] == [(f"{path}:1", "one", product_photos[0])]
    assert [(r.reason, r.source) for r in rejects] == [
        (DOWNLOAD_FAILED, f"{path}:2"), (MALFORMED_RECORD, f"{path}:3"), (MALFORMED_RECORD, f"{path}:4"),
        (MALFORMED_RECORD, f"{path}:6")]
    assert rejects[0].detail == "download failed upstream: failed_to_download; timed out"


def test_mmc4_files_stream_through_read_documents() -> None:
    spec = document_spec("mmc4", None)
    check_document_layout(str(MMC4_FILE), JSONL, spec)
    records, rejects = split(list(read_documents(str(MMC4_FILE), JSONL, spec)))
    rows = [json.loads(line) for line in MMC4_FILE.read_text().splitlines()]
    assert rejects == [] and len(records) == sum(len(row["image_info"]) for row in rows)
    assert len({r.record_id for r in records}) == len(records)
    assert {r.source.split("#")[0] for r in records} == {f"{MMC4_FILE}:{i}" for i in (1, 2, 3)}


def test_layout_and_spec_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(InputFormatError, match=r"read.preset=mmc4 needs column\(s\) image_info; the file has "
                                               r"page_url, caption, url"):
        check_document_layout(str(I2D_FILE), PARQUET, DocumentSpec("mmc4"))
    with pytest.raises(InputFormatError, match=r"read.preset=obelics needs column\(s\) images"):
        check_document_layout(str(MMC4_FILE), JSONL, DocumentSpec("obelics"))
    with pytest.raises(InputFormatError, match=r"read.columns=.* needs column\(s\) src"):
        check_document_layout(str(MMC4_FILE), JSONL, DocumentSpec(columns={"image_url": "src"}))
    with pytest.raises(ValueError, match="unknown read.preset"):
        DocumentSpec("cc12m")
    with pytest.raises(ValueError, match="unknown field"):
        DocumentSpec(columns={"url": "x"})
    with pytest.raises(ValueError, match="must map image_url or image"):
        DocumentSpec(columns={"text": "caption"})
    assert document_spec(None, None) is None
    assert row_pairs([1, 2], "f:1", DocumentSpec("mmc4"))[0].value.reason == MALFORMED_RECORD
