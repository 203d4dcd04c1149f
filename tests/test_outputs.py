"""The readers of phase outputs (``transforms/outputs.py``): a later phase reads every row of a real
``clusters/`` or ``candidates/`` file as a record, and a row that does not convert is a dead letter that names the
file and the row, without losing the rest of the file."""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystem import FileMetadata, FileSystem
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from schemas.ids import stable_id
from schemas.parquet import CANDIDATES_SCHEMA, CLUSTERS_SCHEMA, candidate_to_row, cluster_to_row
from tests.clusters import beam_counters, load, sample_clusters, save_to
from tests.phase3_helpers import as_png, candidate
from transforms.outputs import ReadCandidates, ReadClusters, ReadPhaseFileFn, remove_temp_dirs


def _read(transform: beam.PTransform, tmp_path: Path) -> tuple[list, list, dict]:
    """(records, rejects as dicts, counters of the stage ``read``) of ``transform`` run on its own."""
    fields = ("id", "stage", "reason", "n_images", "cluster_id", "source", "page_url")
    with TestPipeline() as p:
        records, rejects = p | transform
        assert_that(records, save_to(tmp_path / "records.pickle", key=repr), label="SaveRecords")
        assert_that(rejects | beam.Map(lambda r: {k: getattr(r, k) for k in fields}),
                    save_to(tmp_path / "rejects.pickle", key=repr), label="SaveRejects")
    return load(tmp_path / "records.pickle"), load(tmp_path / "rejects.pickle"), beam_counters(p.result, "read")


def _without(schema: pa.Schema, column: str) -> pa.Schema:
    """``schema`` less ``column``, with its name and version: a file of another build that the version check lets
    through, whose rows do not convert."""
    return schema.remove(schema.get_field_index(column))


def test_clusters_files_with_rows_that_do_not_convert(sample_rows: list, tmp_path: Path) -> None:
    clusters = sample_clusters(sample_rows)[:4]
    good, odd = str(tmp_path / "good.parquet"), str(tmp_path / "odd.parquet")
    pq.write_table(pa.Table.from_pylist([cluster_to_row(c) for c in clusters[:2]], schema=CLUSTERS_SCHEMA), good)
    odd_rows = [cluster_to_row(clusters[2]), {**cluster_to_row(clusters[3]), "cluster_id": ""}]  # ... one without id
    pq.write_table(pa.Table.from_pylist(odd_rows, schema=_without(CLUSTERS_SCHEMA, "domain")), odd)
    records, rejects, counters = _read(ReadClusters([good, odd], "read"), tmp_path)
    assert sorted(c.cluster_id for c in records) == sorted(c.cluster_id for c in clusters[:2])
    assert {c.cluster_id: c.images for c in records} == {c.cluster_id: c.images for c in clusters[:2]}  # bytes too
    unnamed = stable_id("unreadable-clusters", odd, 1)
    assert sorted(rejects, key=lambda r: r["source"]) == [
        {"id": clusters[2].cluster_id, "stage": "read", "reason": "internal_error",
         "n_images": len(clusters[2].images), "cluster_id": clusters[2].cluster_id, "source": f"{odd}:0",
         "page_url": clusters[2].page_url},
        {"id": unnamed, "stage": "read", "reason": "internal_error", "n_images": len(clusters[3].images),
         "cluster_id": unnamed, "source": f"{odd}:1", "page_url": clusters[3].page_url}]
    assert counters == {"clusters_read": 4, "internal_error": len(clusters[2].images) + len(clusters[3].images)}


def test_candidates_file_with_a_row_that_does_not_convert(sample_rows: list, tmp_path: Path) -> None:
    cluster = sample_clusters(sample_rows)[0]
    render = as_png(cluster.images[0].image, 64)
    good, bad = candidate(cluster, render, tag="good"), candidate(cluster, render, tag="bad")
    paths = [str(tmp_path / "good.parquet"), str(tmp_path / "odd.parquet")]
    pq.write_table(pa.Table.from_pylist([candidate_to_row(good)], schema=CANDIDATES_SCHEMA), paths[0])
    pq.write_table(pa.Table.from_pylist([candidate_to_row(bad)], schema=_without(CANDIDATES_SCHEMA, "train")),
                   paths[1])
    records, rejects, counters = _read(ReadCandidates(paths, "read"), tmp_path)
    assert records == [good]
    assert rejects == [{"id": bad.candidate_id, "stage": "read", "reason": "internal_error", "n_images": 1,
                        "cluster_id": cluster.cluster_id, "source": f"{paths[1]}:0", "page_url": cluster.page_url}]
    assert counters == {"candidates_read": 2, "internal_error": 1}


def test_a_file_of_another_kind_is_refused(sample_rows: list, tmp_path: Path) -> None:
    path = str(tmp_path / "clusters.parquet")
    pq.write_table(pa.Table.from_pylist([cluster_to_row(sample_clusters(sample_rows)[0])], schema=CLUSTERS_SCHEMA),
                   path)
    with pytest.raises(Exception, match="candidates"):
        list(ReadPhaseFileFn("candidates", "read").process(path))
    with pytest.raises(ValueError, match="no reader for phase output 'examples'"):
        ReadPhaseFileFn("examples", "read")


def test_temporary_folders_are_removed_with_their_files_and_nothing_else(tmp_path: Path) -> None:
    """What writers and the image packs leave under a phase's folders: nested files, and empty folders (a local
    disk keeps them); the outputs and other folders stay."""
    clusters, rejects = tmp_path / "clusters", tmp_path / "rejects"
    (clusters / ".tmp-images-1").mkdir(parents=True)
    (clusters / ".tmp-images-1" / "a.pack").write_bytes(b"x" * 10)
    (clusters / ".tmp-2" / "deep").mkdir(parents=True)
    (clusters / ".tmp-2" / "deep" / "00000-000001.parquet").write_bytes(b"y")
    (clusters / ".tmp-3").mkdir()  # empty
    (rejects / "beam-temp-4").mkdir(parents=True)
    (clusters / "part-00000-of-00001.parquet").write_bytes(b"z")
    (clusters / "keep").mkdir()
    (clusters / "keep" / ".tmp-not-top-level").write_bytes(b"k")
    removed = remove_temp_dirs(str(tmp_path), ["clusters", "rejects"])
    assert removed == sorted(str(p) for p in (clusters / ".tmp-images-1", clusters / ".tmp-2", clusters / ".tmp-3",
                                              rejects / "beam-temp-4"))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "clusters", "clusters/keep", "clusters/keep/.tmp-not-top-level", "clusters/part-00000-of-00001.parquet",
        "rejects"]


class _ObjectStore(FileSystem):
    """A file system without folders, as GCS and S3 are: deleting a "folder" path deletes nothing (Beam's
    GCSFileSystem matches such a path as a file name). Beam finds it by its scheme, ``objstore://``."""

    files: dict[str, bytes] = {}

    @classmethod
    def scheme(cls) -> str:
        return "objstore"

    def join(self, base: str, *paths: str) -> str:
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in paths)])

    def split(self, path: str) -> tuple[str, str]:
        head, _, tail = path.rpartition("/")
        return head, tail

    def has_dirs(self) -> bool:
        return False

    def _list(self, dir_or_prefix: str):
        return [FileMetadata(p, len(d)) for p, d in sorted(self.files.items()) if p.startswith(dir_or_prefix)]

    def exists(self, path: str) -> bool:
        return path in self.files

    def delete(self, paths: list[str]) -> None:
        for path in paths:
            self.files.pop(path, None)  # a "folder" path names no object: nothing happens

    def size(self, path: str) -> int:
        return len(self.files[path])

    def metadata(self, path: str) -> FileMetadata:
        return FileMetadata(path, len(self.files[path]))

    def last_updated(self, path: str) -> float:
        return 0.0

    def mkdirs(self, path: str) -> None:
        pass

    def create(self, *args, **kwargs):
        raise NotImplementedError

    open = copy = rename = create


def test_temporary_files_are_removed_from_an_object_store_too(monkeypatch: pytest.MonkeyPatch) -> None:
    base = "objstore://bucket/out/clusters"
    files = {f"{base}/.tmp-images-1/a.pack": b"x", f"{base}/.tmp-2/00-01.parquet": b"y",
             f"{base}/part-00000-of-00001.parquet": b"z"}
    monkeypatch.setattr(_ObjectStore, "files", files)
    assert remove_temp_dirs("objstore://bucket/out", ["clusters"]) == [f"{base}/.tmp-2", f"{base}/.tmp-images-1"]
    assert list(files) == [f"{base}/part-00000-of-00001.parquet"]
