"""Record <-> Parquet row conversions and schema versions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.ids import content_id, stable_id
from schemas.parquet import (
    CLUSTERS_SCHEMA,
    REJECTS_SCHEMA,
    SCHEMA_VERSION,
    SchemaVersionError,
    check_schema_version,
    cluster_from_row,
    cluster_to_row,
    reject_from_row,
    reject_to_row,
)
from schemas.records import Cluster, ClusterProvenance, ClusterStats, ImageRecord, Prompt, Reject


def _cluster(product_photos: list[bytes]) -> Cluster:
    images = tuple(
        ImageRecord(image_id=content_id(photo), record_id=f"r{i}", source=f"crawl.parquet:{i}",
                    page_url="https://shop.example.com/p", domain="shop.example.com", image_url=f"https://u/{i}",
                    text=None if i else "alt", image=photo, width=288, height=288, phash="0f0f0f0f0f0f0f0f",
                    source_width=512, source_height=512, source_format="JPEG", caption=f"caption {i}",
                    embedding=np.linspace(-1, 1, 8).astype(np.float32), coherence=0.5, text_truncated=not i)
        for i, photo in enumerate(product_photos[:3]))
    return Cluster(cluster_id="c1", page_url="https://shop.example.com/p", domain="shop.example.com",
                   images=images, stats=ClusterStats(3, 4, 0.75, 0.5), subject="red teapot", class_noun="teapot",
                   is_live=False, prompts=(Prompt("a {subject} on a beach", "recontextualization"),),
                   provenance=ClusterProvenance("alt_text", "offline", "templates", ("caption",)))


def test_cluster_round_trips_through_parquet(tmp_path, product_photos: list[bytes]) -> None:
    cluster = _cluster(product_photos)
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([cluster_to_row(cluster)], schema=CLUSTERS_SCHEMA), path)
    table = pq.read_table(path)
    check_schema_version(table.schema, "clusters", str(path))
    back = cluster_from_row(table.to_pylist()[0])
    assert back == cluster  # embeddings are not compared by ==; check them separately
    for a, b in zip(back.images, cluster.images, strict=True):
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-3)  # stored as float16
        assert a.embedding.dtype == np.float32


def test_rejects_round_trip() -> None:
    reject = Reject("id1", "normalize", "too_small", "100x100", "https://p", "https://i", 1, "f:3", None)
    assert reject_from_row(reject_to_row(reject)) == reject
    assert list(reject_to_row(reject)) == REJECTS_SCHEMA.names


def test_schema_version_is_checked() -> None:
    check_schema_version(CLUSTERS_SCHEMA, "clusters")
    with pytest.raises(SchemaVersionError, match="expected an icl-cluster-pipeline 'rejects' file"):
        check_schema_version(CLUSTERS_SCHEMA, "rejects")
    newer = CLUSTERS_SCHEMA.with_metadata({b"icl.schema": b"clusters", b"icl.schema_version": b"99"})
    with pytest.raises(SchemaVersionError, match=f"version 99 is not supported .*reads version {SCHEMA_VERSION}"):
        check_schema_version(newer, "clusters", "x.parquet")
    with pytest.raises(SchemaVersionError):
        check_schema_version(pa.schema([("a", pa.int32())]), "clusters")


def test_ids_are_stable_and_unambiguous() -> None:
    assert content_id(b"abc") == content_id(b"abc") and len(content_id(b"abc")) == 32
    assert stable_id("ab", "c") != stable_id("a", "bc")
    assert stable_id(None) != stable_id("")
    assert stable_id(1) == stable_id("1")
