"""Stage *read*: Parquet, JSONL and WebDataset readers, layout checks and per-record dead letters."""

from __future__ import annotations

import base64
import gzip
import io
import json
import tarfile

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.ids import content_id, stable_id
from tests.conftest import SAMPLE
from tests.formats import write_jsonl, write_webdataset
from transforms.read import (
    InputFile,
    InputFormatError,
    InputSplit,
    ReadConfig,
    ReadFileFn,
    ReadPairs,
    expand_inputs,
    input_format,
    plan_splits,
    read_jsonl,
    read_parquet,
    read_webdataset,
    validate_input_file,
)


def _records(items) -> list:
    return [item for item in items if not isinstance(item, beam.pvalue.TaggedOutput)]


def _rejects(items) -> list:
    return [item.value for item in items if isinstance(item, beam.pvalue.TaggedOutput)]


def test_formats_by_extension() -> None:
    assert input_format("a/b.parquet") == "parquet"
    assert input_format("gs://b/x.JSONL.GZ") == "jsonl"
    assert input_format("x.jsonl") == "jsonl"
    assert input_format("shard-00001.tar") == "webdataset"
    assert input_format("x.csv") is None


def test_parquet_reader_streams_every_row_with_ids(sample_rows: list[dict]) -> None:
    records = list(read_parquet(str(SAMPLE), batch_rows=16))
    assert len(records) == len(sample_rows)
    for i, (record, row) in enumerate(zip(records, sample_rows, strict=True)):
        assert record.source == f"{SAMPLE}:{i}"
        assert (record.page_url, record.image_url, record.text, record.image) == (
            row["page_url"], row["image_url"], row["text"], row["image"])
        image_hash = content_id(row["image"]) if row["image"] is not None else None
        assert record.record_id == stable_id(row["page_url"], row["image_url"], image_hash)


def test_parquet_without_text_column_and_large_types(tmp_path, sample_rows: list[dict]) -> None:
    table = pa.table({
        "page_url": pa.array([r["page_url"] for r in sample_rows[:3]], pa.large_string()),
        "image_url": pa.array([r["image_url"] for r in sample_rows[:3]], pa.large_string()),
        "image": pa.array([r["image"] for r in sample_rows[:3]], pa.large_binary()),
        "crawl_date": pa.array(["2024-05-01"] * 3),
    })
    path = tmp_path / "no_text.parquet"
    pq.write_table(table, path)
    validate_input_file(InputFile(str(path), "parquet"))
    records = list(read_parquet(str(path), 2))
    assert [r.text for r in records] == [None] * 3
    assert [r.image for r in records] == [r["image"] for r in sample_rows[:3]]


@pytest.mark.parametrize("columns, message", [
    ({"page_url": pa.array(["https://x.example/p"]), "image_url": pa.array(["u"])}, "no column 'image'"),
    ({"page_url": pa.array(["https://x.example/p"]), "image_url": pa.array(["u"]), "image": pa.array([1])},
     "column 'image' has type int64, expected binary"),
    ({"url": pa.array(["https://x.example/p"]), "image_url": pa.array(["u"]), "image": pa.array([b"x"])},
     "no column 'page_url'"),
])
def test_parquet_with_wrong_columns_fails_fast_naming_the_file(tmp_path, columns, message) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(InputFormatError, match=f"{path}.*{message}"):
        validate_input_file(InputFile(str(path), "parquet"))


def test_not_a_parquet_file_fails_fast(tmp_path) -> None:
    path = tmp_path / "crawl.parquet"
    path.write_text("page_url,image_url\nhttps://x.example,u\n")
    with pytest.raises(InputFormatError, match=f"{path}: not a readable Parquet file"):
        validate_input_file(InputFile(str(path), "parquet"))
    with pytest.raises(InputFormatError, match="not a readable Parquet file"):
        list(read_parquet(str(path), 8))


def test_jsonl_with_base64_and_paths(tmp_path, sample_rows: list[dict]) -> None:
    rows = sample_rows[:5]
    (tmp_path / "b64").mkdir()
    (tmp_path / "paths").mkdir()
    b64 = write_jsonl(rows, str(tmp_path / "b64" / "crawl.jsonl"))
    paths = write_jsonl(rows, str(tmp_path / "paths" / "crawl.jsonl.gz"), image_mode="path", gz=True)
    for path in (b64, paths):
        validate_input_file(InputFile(path, "jsonl"))
        records = _records(read_jsonl(path))
        assert [(r.page_url, r.image_url, r.text, r.image) for r in records] == [
            (r["page_url"], r["image_url"], r["text"], r["image"]) for r in rows]
        assert records[2].source == f"{path}:3"


def test_jsonl_bad_lines_are_dead_letters_not_crashes(tmp_path, product_photos: list[bytes]) -> None:
    good = {"page_url": "https://x.example/p", "image_url": "u", "text": "t",
            "image_b64": base64.b64encode(product_photos[0]).decode()}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({**good, "text": 42}),
        json.dumps({**good, "image_b64": "@@@not base64@@@"}),
        json.dumps({"page_url": "https://x.example/p", "image_url": "u2", "image_path": "missing.jpg"}),
        "",
        json.dumps({"page_url": "https://x.example/p", "image_url": "u3"}),
    ]
    path = tmp_path / "crawl.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items = list(read_jsonl(str(path)))
    records, rejects = _records(items), _rejects(items)
    assert [(r.image_url, r.image is not None) for r in records] == [("u", True), ("u3", False)]
    assert [(r.reason, r.source.rsplit(":", 1)[1]) for r in rejects] == [
        ("malformed_record", "2"), ("malformed_record", "3"), ("malformed_record", "4"),
        ("malformed_record", "5"), ("image_unreadable", "6")]
    assert all(r.stage == "read" for r in rejects)
    assert "missing.jpg" in rejects[-1].detail


def test_jsonl_first_line_is_checked(tmp_path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"url": "https://x.example", "caption": "c"}) + "\n")
    with pytest.raises(InputFormatError, match="expected page_url, image_url, text and one of image_b64"):
        validate_input_file(InputFile(str(path), "jsonl"))
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(InputFormatError, match=str(gz)):
        validate_input_file(InputFile(str(gz), "jsonl"))


def test_webdataset_shard_as_written_by_img2dataset(tmp_path, sample_rows: list[dict]) -> None:
    rows = sample_rows[:6]
    path = write_webdataset(rows, str(tmp_path / "00000.tar"))
    validate_input_file(InputFile(path, "webdataset"))
    records = _records(read_webdataset(path))
    assert [(r.page_url, r.image_url, r.text, r.image) for r in records] == [
        (r["page_url"], r["image_url"], r["text"], r["image"] or None) for r in rows]
    assert records[0].source == f"{path}#000000000"


def test_webdataset_bad_json_is_a_dead_letter(tmp_path, product_photos: list[bytes]) -> None:
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.jpg", product_photos[0]), ("a.json", b"{oops"),
                           ("b.jpg", product_photos[1]), ("b.json", b'{"url": "u", "page_url": "https://x.example"}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    items = list(read_webdataset(str(path)))
    assert [r.image_url for r in _records(items)] == ["u"]
    assert [(r.reason, r.source) for r in _rejects(items)] == [("malformed_record", f"{path}#a")]


def test_not_a_tar_fails_fast(tmp_path) -> None:
    path = tmp_path / "x.tar"
    path.write_bytes(gzip.compress(b"hello"))
    with pytest.raises(InputFormatError, match=f"{path}: not a readable tar"):
        validate_input_file(InputFile(str(path), "webdataset"))


def test_expand_inputs(tmp_path) -> None:
    for name in ("a.parquet", "b.jsonl", "c.tar"):
        (tmp_path / name).write_bytes(b"")
    files = expand_inputs([str(tmp_path / "*.parquet"), str(tmp_path / "*.jsonl"), str(tmp_path / "a.*")])
    assert [(f.path.rsplit("/", 1)[1], f.format) for f in files] == [("a.parquet", "parquet"), ("b.jsonl", "jsonl")]
    with pytest.raises(InputFormatError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.nothing")])
    (tmp_path / "d.csv").write_bytes(b"")
    with pytest.raises(InputFormatError, match="d.csv: unknown input format"):
        expand_inputs([str(tmp_path / "d.*")])


def test_read_stage_mixes_formats(tmp_path, sample_rows: list[dict]) -> None:
    rows = sample_rows[:10]
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:4]), parquet)
    jsonl = write_jsonl(rows[4:7], str(tmp_path / "b.jsonl"))
    tar = write_webdataset(rows[7:], str(tmp_path / "c.tar"))
    files = expand_inputs([str(parquet), jsonl, tar])
    with TestPipeline() as p:
        records, rejects = p | ReadPairs(files, ReadConfig(batch_rows=3))
        assert_that(records | beam.Map(lambda r: r.image_url), equal_to([r["image_url"] for r in rows]),
                    label="AllRecords")
        assert_that(rejects, equal_to([]), label="NoRejects")
    counters = {c.key.metric.name: c.committed for c in p.result.metrics().query()["counters"]
                if c.key.metric.namespace == "read"}
    # The Parquet file is one split (fewer rows than read.split_rows), the JSONL and tar files are read whole.
    assert counters == {"records": 10, "files": 3, "splits": 1}


def test_parquet_files_are_read_in_splits_of_whole_row_groups(tmp_path, sample_rows: list[dict]) -> None:
    path = tmp_path / "crawl.parquet"
    pq.write_table(pa.Table.from_pylist(sample_rows), path, row_group_size=40)  # 282 rows: 8 groups, last of 2
    parquet = InputFile(str(path), "parquet")
    splits = plan_splits(parquet, ReadConfig(split_rows=100))
    # At least 100 rows each (three groups of 40), the rest in the last one; contiguous, numbered, rows counted.
    assert [(s.row_groups, s.first_row, s.index) for s in splits] == [((0, 3), 0, 0), ((3, 6), 120, 1),
                                                                       ((6, 8), 240, 2)]
    fn = ReadFileFn(ReadConfig(batch_rows=16))
    fn.setup()
    parts = [record for split in splits for record in fn.process(split)]
    whole = list(read_parquet(str(path), batch_rows=16))
    assert [(r.record_id, r.source) for r in parts] == [(r.record_id, r.source) for r in whole]
    assert [r.source for r in parts] == [f"{path}:{i}" for i in range(len(sample_rows))]
    # Not split: split_rows 0, a document layout, other formats.
    assert plan_splits(parquet, ReadConfig(split_rows=0)) == [InputSplit(parquet)]
    assert plan_splits(parquet, ReadConfig(preset="img2dataset")) == [InputSplit(parquet)]
    jsonl = InputFile(write_jsonl(sample_rows[:2], str(tmp_path / "b.jsonl")), "jsonl")
    assert plan_splits(jsonl, ReadConfig(split_rows=1)) == [InputSplit(jsonl)]


def test_read_stage_reads_every_split_once_and_moves_no_image_bytes(tmp_path, sample_rows: list[dict]) -> None:
    paths = []
    for index, start in enumerate((0, 150)):
        paths.append(tmp_path / f"part-{index}.parquet")
        pq.write_table(pa.Table.from_pylist(sample_rows[start:start + 150]), paths[-1], row_group_size=25)
    files = expand_inputs([str(tmp_path / "*.parquet")])
    with TestPipeline() as p:
        records, rejects = p | ReadPairs(files, ReadConfig(split_rows=50))
        assert_that(records | beam.Map(lambda r: r.source),
                    equal_to([f"{paths[0]}:{i}" for i in range(150)] + [f"{paths[1]}:{i}" for i in range(132)]),
                    label="EveryRowOnce")
        assert_that(rejects, equal_to([]), label="NoRejects")
    counters = {c.key.metric.name: c.committed for c in p.result.metrics().query()["counters"]
                if c.key.metric.namespace == "read"}
    assert counters == {"records": 282, "files": 2, "splits": 3 + 3}

    def labels(input_files: list[InputFile]) -> set[str]:
        graph = beam.Pipeline()
        _ = graph | "Read" >> ReadPairs(input_files, ReadConfig(split_rows=50))
        return {t.unique_name for t in graph.to_runner_api().components.transforms.values()}

    # Split Parquet: only the splits' descriptors are redistributed, never the records (their image bytes) ...
    assert "Read/SpreadSplits" in labels(files) and "Read/BreakFusion" not in labels(files)
    # ... while the records of a file read whole are.
    jsonl = InputFile(write_jsonl(sample_rows[:2], str(tmp_path / "b.jsonl")), "jsonl")
    assert "Read/BreakFusion" in labels([*files, jsonl])

