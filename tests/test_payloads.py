"""Image bytes set aside in pack files while phase 1's light stages run, and read back (transforms/payloads.py)."""

from __future__ import annotations

import os
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import build_config
from pipeline.phases import CLUSTERS, PhaseInputs, build_phase
from schemas.ids import content_id
from schemas.records import Cluster, with_images
from tests.clip_helpers import photo_cluster
from tests.clusters import beam_counters
from tests.tiny_models import read_clusters
from transforms.common import INTERNAL_ERROR, REJECTS
from transforms.outputs import write_clusters
from transforms.payloads import (
    PACK_BYTES,
    RestoreFn,
    RestoreImages,
    SetAsideFn,
    SetAsideImages,
    StoredImageError,
    restore,
    restore_all,
    stored_bytes,
)
from transforms.settings import OutputConfig


@pytest.fixture(scope="module")
def clusters(product_photos: list[bytes]) -> list[Cluster]:
    photos = product_photos[:9]
    return [photo_cluster(f"https://shop.example/p{i}", photos[3 * i:3 * i + 3]) for i in range(3)]


def set_aside(elements: list, folder: Path) -> list:
    """``elements`` through one bundle of :class:`SetAsideFn`, outside Beam: what leaves it, in order."""
    fn = SetAsideFn(str(folder))
    fn.start_bundle()
    out = [value for element in elements for value in fn.process(element, 0, None)]
    return out + [held.value for held in fn.finish_bundle()]


def packs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.pack")) if folder.exists() else []


def test_light_clusters_keep_everything_but_the_bytes(clusters: list[Cluster], tmp_path: Path) -> None:
    stripped = set_aside(clusters, tmp_path)
    assert all(image.image == b"" and image.stored.image_id == image.image_id
               for cluster in stripped for image in cluster.images)
    assert stripped == [c.replace(images=tuple(im.replace(image=b"") for im in c.images)) for c in clusters]
    [pack] = packs(tmp_path)  # one pack per bundle
    assert pack.stat().st_size == sum(len(im.image) for c in clusters for im in c.images)
    assert [stored_bytes(c) for c in stripped] == [sum(len(im.image) for im in c.images) for c in clusters]
    assert [restore(c) for c in stripped] == clusters
    assert [[im.image for im in restore(c).images] for c in stripped] == [[im.image for im in c.images]
                                                                         for c in clusters]


def test_stored_images_are_not_written_again_but_changed_ones_are(clusters: list[Cluster], tmp_path: Path) -> None:
    """A restored cluster set aside again costs no write; an image whose bytes changed (a blurred face: new bytes,
    new id) is written, and the records of a bundle that wrote nothing pass at once."""
    first = set_aside(clusters[:1], tmp_path / "a")
    restored = restore(first[0])
    assert set_aside([restored], tmp_path / "b") == first and packs(tmp_path / "b") == []
    changed = restored.images[0].image + b"blurred"  # other bytes, as a blur makes
    blurred = restored.replace(images=(restored.images[0].replace(image=changed, image_id=content_id(changed)),
                                       *restored.images[1:]))
    again = set_aside([blurred], tmp_path / "c")
    [pack] = packs(tmp_path / "c")
    assert pack.read_bytes() == changed
    assert again[0].images[0].stored.path == str(pack) and again[0].images[1].stored == first[0].images[1].stored
    assert restore(again[0]) == blurred and restore(again[0]).images[0].image == changed


@pytest.mark.parametrize("pack_bytes", [PACK_BYTES, 1])
def test_bytes_come_back_to_the_clusters_light_stages_keep(clusters: list[Cluster], tmp_path: Path,
                                                          pack_bytes: int) -> None:
    """A light step drops one cluster whole and one image of another (its id changes with its image set): the
    survivors get their real bytes back and nothing else appears; light records carry no bytes (packs closed at
    the end of the bundle, or after each cluster)."""
    def decide(cluster: Cluster) -> list[Cluster]:
        if cluster.page_url.endswith("p0"):
            return []  # dropped whole (a dead letter of the light stage)
        if cluster.page_url.endswith("p1"):
            return [with_images(cluster, cluster.images[1:])]  # an outlier left
        return [cluster]

    expected = [with_images(clusters[1], clusters[1].images[1:]), clusters[2]]
    with TestPipeline() as p:
        stripped = p | beam.Create(clusters) | SetAsideImages(str(tmp_path), pack_bytes)
        restored, rejects = stripped | beam.FlatMap(decide) | RestoreImages()
        assert_that(stripped | "Sizes" >> beam.Map(lambda c: sum(len(im.image) for im in c.images)),
                    equal_to([0, 0, 0]), label="LightClustersCarryNoBytes")
        assert_that(restored, equal_to(expected), label="Restored")
        assert_that(restored | "Bytes" >> beam.Map(lambda c: [im.image for im in c.images]),
                    equal_to([[im.image for im in c.images] for c in expected]), label="RealBytes")
        assert_that(rejects, equal_to([]), label="NoRejects")
    counters = beam_counters(p.result, "images")
    assert counters["images_set_aside"] == 9
    assert counters["bytes_set_aside"] == sum(len(im.image) for c in clusters for im in c.images)
    assert counters["packs_written"] == len(packs(tmp_path)) >= 1


@pytest.mark.parametrize("damage", ["deleted", "cut", "overwritten"])
def test_a_cluster_whose_bytes_cannot_be_read_back_is_rejected_image_by_image(
        clusters: list[Cluster], tmp_path: Path, damage: str) -> None:
    stripped = set_aside(clusters[:2], tmp_path)
    [pack] = packs(tmp_path)
    data = pack.read_bytes()
    if damage == "deleted":
        pack.unlink()
    elif damage == "cut":
        pack.write_bytes(data[:-100])  # the second cluster's last image is short
    else:
        pack.write_bytes(data[:-100] + bytes(100))
    with pytest.raises(StoredImageError, match=str(pack)):
        restore(stripped[1])
    out = list(RestoreFn().process(stripped[1]))
    assert [(o.tag, o.value.stage, o.value.reason, o.value.id, o.value.cluster_id) for o in out] == [
        (REJECTS, "images", INTERNAL_ERROR, im.record_id, stripped[1].cluster_id) for im in clusters[1].images]
    if damage != "deleted":
        assert list(RestoreFn().process(stripped[0])) == [clusters[0]]  # the intact part of a pack still reads


def test_the_clusters_writer_reads_the_bytes_back(clusters: list[Cluster], tmp_path: Path) -> None:
    """Light clusters written with ``restore``: the Parquet rows hold the real photos, cut by their real size."""
    with TestPipeline() as p:
        _ = (p | beam.Create(clusters) | SetAsideImages(str(tmp_path / "packs"))
             | write_clusters(str(tmp_path / "out"), OutputConfig(), restore=True))
    written = read_clusters(tmp_path / "out")
    assert written == sorted(clusters, key=lambda c: c.cluster_id)
    assert [[im.image for im in c.images] for c in written] == [
        [im.image for im in c.images] for c in sorted(clusters, key=lambda c: c.cluster_id)]


def test_a_row_group_reads_each_pack_once(clusters: list[Cluster], tmp_path: Path, monkeypatch) -> None:
    """The writer restores a row group's clusters together: one open per pack, not one per cluster (on an object
    store, each open is a request)."""
    import transforms.payloads as payloads

    stripped = set_aside(clusters, tmp_path / "one")  # one pack holds every cluster's photos
    assert len({im.stored.path for c in stripped for im in c.images}) == 1
    opened: list[str] = []
    real_open = payloads.FileSystems.open

    def counted_open(path: str, *args, **kwargs):
        opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(payloads.FileSystems, "open", counted_open)
    assert restore_all(stripped) == clusters and len(opened) == 1
    assert [[im.image for im in c.images] for c in restore_all(stripped)] == [[im.image for im in c.images]
                                                                              for c in clusters]


def phase1_steps(config) -> list[str]:
    p = beam.Pipeline()
    build_phase(p, CLUSTERS, config, PhaseInputs("/tmp/unused", files=()))
    return [part.full_label for part in p.transforms_stack[0].parts  # the phase's steps, in the order applied
            if not part.full_label.startswith("Write")]


def test_phase1_reads_the_bytes_only_where_a_stage_needs_them() -> None:
    """Demo profile (offline captions): set aside after Normalize, read back for Safety and Embed, set aside again
    for the light stages through ScenePrompts; the writer reads them back. A VLM caption gets them back."""
    steps = [s for s in phase1_steps(build_config("demo")) if s != "Fetch"]
    assert steps[steps.index("Normalize"):steps.index("Caption") + 1] == [
        "Normalize", "SetAsideImagesForGroupByPage", "GroupByPage", "Dedupe", "RestoreImagesForSafety", "Safety",
        "Embed", "SetAsideImagesForClusterFilter", "ClusterFilter", "CrossPageDedupe", "SemanticDedup", "Caption"]
    assert not any(s.startswith("RestoreImages") for s in steps[steps.index("Caption"):])
    vlm = build_config("demo", overrides=["caption.backend=vllm", "caption.model=Qwen/Qwen2-VL-2B-Instruct"])
    steps = phase1_steps(vlm)
    assert steps[steps.index("SemanticDedup"):steps.index("ScenePrompts") + 1] == [
        "SemanticDedup", "RestoreImagesForCaption", "Caption", "SetAsideImagesForSubject", "Subject",
        "ScenePrompts"]


def test_a_finished_run_leaves_no_packs(demo_run) -> None:
    clusters_dir = os.path.join(demo_run.output, "clusters")
    assert [name for name in os.listdir(clusters_dir) if name.startswith(".tmp-")] == []


def test_a_full_pack_lets_its_records_go_before_the_bundle_ends(clusters: list[Cluster], tmp_path: Path) -> None:
    """With packs of at most one cluster's bytes, each cluster leaves as soon as its pack is closed, in order."""
    fn = SetAsideFn(str(tmp_path), pack_bytes=1)
    fn.start_bundle()
    leaving = [[held.value.cluster_id for held in fn.process(cluster, 0, None)] for cluster in clusters]
    assert leaving == [[c.cluster_id] for c in clusters] and list(fn.finish_bundle()) == []
    assert len(packs(tmp_path)) == 3
    assert [restore(held) for held in set_aside(clusters, tmp_path / "one")] == clusters
