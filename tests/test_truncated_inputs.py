"""Compressed and tar inputs that end early: never passed off as whole files (issue: no silent loss).

Every format is cut twice -- at a record (line, member) boundary and in the middle of a record -- and read
with the stage's own reader: the records before the cut come out, then one ``truncated_file`` dead letter that
names the file and how many records were read. One end-to-end run shows that the command fails unless
``read.allow_truncated``, that the manifest lists the file, and that the counts still reconcile.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zlib
from pathlib import Path

import apache_beam as beam
import pytest

from tests.conftest import SAMPLE, run_pipeline
from tests.formats import write_jsonl, write_webdataset
from transforms.read import TRUNCATED_FILE, InputFile, ReadConfig, ReadFileFn, TruncatedInputError, read_jsonl

N_ROWS = 24
NO_CLIP = ("--profile", "demo", "--set", "embed.enabled=false", "--set", "cluster_filter.enabled=false",
           "--set", "cross_page.enabled=false", "--set", "semantic_dedup.enabled=false")
"""Phase 1 without the CLIP stages: what is checked here is reading, not clustering."""


@pytest.fixture(scope="module")
def rows(sample_rows: list[dict]) -> list[dict]:
    return [row for row in sample_rows if row["expected"] == "kept"][:N_ROWS]


def _read(path: Path, fmt: str) -> tuple[list, list]:
    fn = ReadFileFn(ReadConfig())
    fn.setup()
    records, rejects = [], []
    for item in fn.process(InputFile(str(path), fmt)):
        (rejects if isinstance(item, beam.pvalue.TaggedOutput) else records).append(
            item.value if isinstance(item, beam.pvalue.TaggedOutput) else item)
    return records, rejects


def _jsonl_lines(rows: list[dict], tmp_path: Path) -> list[bytes]:
    plain = Path(write_jsonl(rows, str(tmp_path / "plain.jsonl")))
    return plain.read_bytes().splitlines(keepends=True)


def _gzip_with_flush_points(lines: list[bytes]) -> tuple[bytes, list[int]]:
    """One gzip member; the compressed offset after each line (a full flush there), so that a prefix ends
    exactly at a line boundary of the decompressed text."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    data, offsets = b"", []
    for line in lines:
        data += compressor.compress(line) + compressor.flush(zlib.Z_FULL_FLUSH)
        offsets.append(len(data))
    return data + compressor.flush(), offsets


def _assert_truncated(records: list, rejects: list, path: Path, n_read: int) -> None:
    assert len(records) == n_read
    assert [r.reason for r in rejects] == [TRUNCATED_FILE]
    reject = rejects[0]
    assert reject.source == str(path) and reject.n_images == 0 and reject.stage == "read"
    assert f"{n_read} records were read" in reject.detail


def test_whole_gzip_jsonl_reads_every_line(rows: list[dict], tmp_path: Path) -> None:
    data, _ = _gzip_with_flush_points(_jsonl_lines(rows, tmp_path))
    path = tmp_path / "whole.jsonl.gz"
    path.write_bytes(data)
    records, rejects = _read(path, "jsonl")
    assert len(records) == N_ROWS and rejects == []


@pytest.mark.parametrize("cut", ["line_boundary", "mid_line"])
def test_gzip_jsonl_cut_is_reported(rows: list[dict], tmp_path: Path, cut: str) -> None:
    data, offsets = _gzip_with_flush_points(_jsonl_lines(rows, tmp_path))
    keep = 10
    end = offsets[keep - 1] if cut == "line_boundary" else (offsets[keep - 1] + offsets[keep]) // 2
    path = tmp_path / f"cut-{cut}.jsonl.gz"
    path.write_bytes(data[:end])
    if cut == "line_boundary":
        # The premise: Beam's own decompression hands out the ten whole lines and raises nothing.
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(str(path), compression_type=CompressionTypes.AUTO) as handle:
            assert len(list(iter(handle.readline, b""))) == keep
    records, rejects = _read(path, "jsonl")
    _assert_truncated(records, rejects, path, keep)
    assert [r.image_url for r in records] == [row["image_url"] for row in rows[:keep]]


def test_read_jsonl_raises_truncated_input_error(rows: list[dict], tmp_path: Path) -> None:
    data, offsets = _gzip_with_flush_points(_jsonl_lines(rows, tmp_path))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[:offsets[4]])
    with pytest.raises(TruncatedInputError, match="ends early, after line 5"):
        list(read_jsonl(str(path)))


def _sample_offsets(tar_bytes: bytes) -> list[int]:
    """Offsets in an uncompressed WebDataset tar where each sample's first member header starts."""
    offsets, keys = [], set()
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if key not in keys:
                keys.add(key)
                offsets.append(member.offset)
    return offsets


@pytest.mark.parametrize("compressed", [False, True], ids=["tar", "tar.gz"])
@pytest.mark.parametrize("cut", ["member_boundary", "mid_member"])
def test_webdataset_cut_is_reported(rows: list[dict], tmp_path: Path, compressed: bool, cut: str) -> None:
    whole = Path(write_webdataset(rows, str(tmp_path / "whole.tar"))).read_bytes()
    # Cut where sample 8 starts, or inside its image (its first member). A sample is read once the next one's
    # first member is seen; the one open when the data stops may lack members, so it is part of the lost tail:
    # cut at sample 8's header, 7 samples are closed; cut inside sample 8's image, 8 are.
    start = _sample_offsets(whole)[8]
    end = start if cut == "member_boundary" else start + 512 + 300
    data = whole[:end]
    suffix = ".tar.gz" if compressed else ".tar"
    if compressed:
        data = gzip.compress(whole, mtime=0)
        # The compressed prefix that holds (at least) the samples before the cut: cut the gzip stream itself.
        data = data[: int(len(data) * end / len(whole))]
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data)
    records, rejects = _read(path, "webdataset")
    assert [r.reason for r in rejects] == [TRUNCATED_FILE]
    if not compressed:
        closed = 7 if cut == "member_boundary" else 8
        assert [r.image_url for r in records] == [row["image_url"] for row in rows[:closed]]
    assert all(r.image for r in records)
    assert f"{len(records)} records were read" in rejects[0].detail


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_whole_webdataset_reads_every_sample(rows: list[dict], tmp_path: Path, suffix: str) -> None:
    whole = Path(write_webdataset(rows, str(tmp_path / "whole.tar"))).read_bytes()
    path = tmp_path / f"shard{suffix}"
    path.write_bytes(gzip.compress(whole, mtime=0) if suffix == ".tar.gz" else whole)
    records, rejects = _read(path, "webdataset")
    assert len(records) == N_ROWS and rejects == []


@pytest.mark.slow
def test_truncated_input_fails_the_run_unless_allowed(rows: list[dict], tmp_path: Path) -> None:
    from pipeline.run import RunError

    lines = _jsonl_lines(rows, tmp_path)
    data, offsets = _gzip_with_flush_points(lines)
    cut = tmp_path / "crawl.jsonl.gz"
    cut.write_bytes(data[:offsets[14] + 7])  # 15 whole lines and part of the 16th
    fast = (*NO_CLIP, "--set", "detector.enabled=false")
    with pytest.raises(RunError, match="end early"):
        run_pipeline([cut], tmp_path / "out", *fast)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    records = manifest["records"]
    assert records["input"] == 15 and records["reconciled"]
    assert [t["path"] for t in records["truncated_files"]] == [str(cut)]
    assert "15 records were read" in records["truncated_files"][0]["detail"]

    allowed = run_pipeline([cut], tmp_path / "out2", *fast, "--set", "read.allow_truncated=true")
    assert allowed.manifest["records"]["input"] == 15 and allowed.manifest["records"]["reconciled"]
    assert len(allowed.manifest["records"]["truncated_files"]) == 1
    rejects = [r for r in allowed.rejects() if r["reason"] == TRUNCATED_FILE]
    assert len(rejects) == 1 and rejects[0]["n_images"] == 0
    assert SAMPLE.exists()


# --- document presets: the same reader rules ---------------------------------------------------------------------

MMC4_FILE = Path(__file__).parent / "data" / "web" / "mmc4_docs.jsonl"


@pytest.mark.parametrize("cut", ["line_boundary", "mid_line"])
def test_a_cut_gzip_jsonl_read_through_a_preset_is_reported(tmp_path: Path, cut: str) -> None:
    lines = MMC4_FILE.read_bytes().splitlines(keepends=True)
    data, offsets = _gzip_with_flush_points(lines)
    end = offsets[1] if cut == "line_boundary" else (offsets[1] + offsets[2]) // 2
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(data[:end])
    fn = ReadFileFn(ReadConfig(preset="mmc4"))
    fn.setup()
    items = list(fn.process(InputFile(str(path), "jsonl")))
    records = [item for item in items if not isinstance(item, beam.pvalue.TaggedOutput)]
    rejects = [item.value for item in items if isinstance(item, beam.pvalue.TaggedOutput)]
    n_images = sum(len(json.loads(line)["image_info"]) for line in lines[:2])
    _assert_truncated(records, rejects, path, n_images)
    assert {r.source.split("#")[0] for r in records} == {f"{path}:1", f"{path}:2"}


# --- WARC files: the extract stage --------------------------------------------------------------------------------


def _warc_captures() -> list:
    from tests.web_site import Capture, sample_photos

    photos = list(sample_photos(2).items())
    captures = []
    for i in range(3):
        html = "".join(f'<p>Photo {j}</p><img src="/img/{name}" alt="photo {j}">' for j, (name, _) in enumerate(photos))
        captures.append(Capture(f"https://shop.example.com/p/{i}", f"<html><body>{html}</body></html>".encode(),
                                "text/html; charset=utf-8"))
        if i == 1:
            captures += [Capture(f"https://shop.example.com/img/{name}", photo, "image/jpeg") for name, photo in photos]
    return captures


def _record_ends(path: Path) -> list[tuple[int, str]]:
    """Where each record of a whole WARC file ends (warcio's offset + length), with its type and target."""
    from warcio.archiveiterator import ArchiveIterator

    ends = []
    with open(path, "rb") as handle:
        records = ArchiveIterator(handle)
        for record in records:
            kind = f"{record.rec_type} {record.rec_headers.get_header('WARC-Target-URI')}"
            record.content_stream().read()
            ends.append((records.get_record_offset() + records.get_record_length(), kind))
    return ends


def _extract(path: Path) -> tuple[int, list]:
    from transforms.extract import ExtractConfig, ReadWarcFn

    fn = ReadWarcFn(ExtractConfig())
    fn.setup()
    pairs, rejects = 0, []
    for item in fn.process(str(path)):
        if isinstance(item, beam.pvalue.TaggedOutput):
            if item.tag == "rejects":
                rejects.append(item.value)
        else:
            pairs += 1
    return pairs, rejects


@pytest.mark.parametrize("suffix", [".warc", ".warc.gz"])
def test_a_warc_file_cut_anywhere_is_reported_with_the_pages_before_the_cut(tmp_path: Path, suffix: str) -> None:
    """Every cut that is not between two records -- in a header block, in a body, in a gzip member's end, in a
    record warcio would skip (the request records) -- gives the pages whose records are whole, then one
    ``truncated_file`` row; a cut between records gives those pages and nothing else (it cannot be told apart)."""
    from tests.web_site import write_warc
    from transforms.common import InputFormatError

    whole = Path(write_warc(tmp_path / f"whole{suffix}", _warc_captures()))
    data = whole.read_bytes()
    ends = _record_ends(whole)
    assert _extract(whole) == (6, [])
    # Between records: the gzip member's end; uncompressed, also inside the blank lines that separate records.
    between = {0} | {end + k for end, _ in ends for k in (range(5) if suffix == ".warc" else (0,))}
    cuts = sorted({c for end, _ in ends for c in range(end - 12, end + 8) if 0 < c < len(data)}
                  | set(range(1, len(data), 97)))
    path = tmp_path / f"cut{suffix}"
    reported = 0
    for cut in cuts:
        path.write_bytes(data[:cut])
        pages = sum(1 for end, kind in ends if end <= cut and kind.startswith("response https://shop.example.com/p/"))
        try:
            pairs, rejects = _extract(path)
        except InputFormatError:
            assert cut < ends[0][0], cut  # only a file cut inside its very first record reads as no WARC at all
            continue
        assert pairs == 2 * pages, cut
        if cut in between:
            assert rejects == [], cut
        else:
            assert [(r.stage, r.reason, r.source, r.n_images) for r in rejects] == [
                ("extract", TRUNCATED_FILE, str(path), 0)], cut
            assert f"{pages} pages were read" in rejects[0].detail
            reported += 1
    assert reported > len(cuts) // 2


@pytest.mark.slow
def test_a_truncated_warc_fails_the_run_unless_allowed(tmp_path: Path) -> None:
    from pipeline.run import RunError
    from tests.web_site import write_warc

    whole = Path(write_warc(tmp_path / "whole.warc.gz", _warc_captures()))
    data = whole.read_bytes()
    last_image_end = [end for end, kind in _record_ends(whole) if kind.startswith("response") and "/img/" in kind][-1]
    cut = tmp_path / "crawl.warc.gz"
    cut.write_bytes(data[:last_image_end - 200])  # inside the second captured photo: the third page is lost
    # No fetching: the pairs whose photo the cut lost reach normalize without bytes (missing_image).
    fast = (*NO_CLIP, "--set", "fetch.enabled=never")
    with pytest.raises(RunError, match="end early"):
        run_pipeline([cut], tmp_path / "out", *fast)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    records = manifest["records"]
    assert records["input"] == 4 and records["reconciled"]
    # the second photo, on each of the two pages read, has no bytes; the first alone is no cluster
    assert records["rejected"] == {"cluster_too_small": 2, "missing_image": 2} and records["kept"] == 0
    assert [t["path"] for t in records["truncated_files"]] == [str(cut)]
    assert "2 pages were read" in records["truncated_files"][0]["detail"]

    allowed = run_pipeline([cut], tmp_path / "out2", *fast, "--set", "read.allow_truncated=true")
    assert allowed.manifest["records"]["reconciled"] and len(allowed.manifest["records"]["truncated_files"]) == 1
    assert [r["stage"] for r in allowed.rejects() if r["reason"] == TRUNCATED_FILE] == ["extract"]
