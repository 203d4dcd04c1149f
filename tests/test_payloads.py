"""Image bytes set aside for the light stages of phase 1 and put back after them (transforms/payloads.py)."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import build_config
from pipeline.phases import CLUSTERS, PhaseInputs, build_phase
from schemas.records import Cluster, with_images
from tests.clip_helpers import photo_cluster
from tests.clusters import beam_counters
from transforms.common import INTERNAL_ERROR
from transforms.payloads import RestoreImages, SetAsideImages, light, restore


@pytest.fixture(scope="module")
def clusters(product_photos: list[bytes]) -> list[Cluster]:
    photos = product_photos[:9]
    return [photo_cluster(f"https://shop.example/p{i}", photos[3 * i:3 * i + 3]) for i in range(3)]


def test_light_clusters_keep_everything_but_the_bytes(clusters: list[Cluster]) -> None:
    cluster = clusters[0]
    stripped = light(cluster)
    assert all(image.image == b"" for image in stripped.images)
    assert [im.replace(image=b"") for im in cluster.images] == list(stripped.images)
    assert (stripped.cluster_id, stripped.page_url, stripped.stats) == (cluster.cluster_id, cluster.page_url,
                                                                       cluster.stats)
    payload = {im.image_id: im.image for im in cluster.images}
    assert restore(stripped, payload) == cluster
    with pytest.raises(KeyError):
        restore(stripped, {})


def test_bytes_come_back_to_the_clusters_light_stages_keep(clusters: list[Cluster]) -> None:
    """A light step drops one cluster whole and one image of another (its id changes with its image set): the
    survivors get their real bytes back, the dropped cluster's payload ends quietly, nothing else appears."""
    def decide(cluster: Cluster) -> list[Cluster]:
        if cluster.page_url.endswith("p0"):
            return []  # dropped whole (a dead letter of the light stage)
        if cluster.page_url.endswith("p1"):
            return [with_images(cluster, cluster.images[1:])]  # an outlier left
        return [cluster]

    expected = [with_images(clusters[1], clusters[1].images[1:]), clusters[2]]
    with TestPipeline() as p:
        stripped, payloads = p | beam.Create(clusters) | SetAsideImages()
        restored, rejects = stripped | beam.FlatMap(decide) | RestoreImages(payloads)
        assert_that(stripped | "Sizes" >> beam.Map(lambda c: sum(len(im.image) for im in c.images)),
                    equal_to([0, 0, 0]), label="LightClustersCarryNoBytes")
        assert_that(restored, equal_to(expected), label="Restored")
        assert_that(rejects, equal_to([]), label="NoRejects")
    assert beam_counters(p.result, "images") == {"payloads_of_dropped_clusters": 1}


def test_a_cluster_whose_bytes_are_missing_is_rejected_image_by_image(clusters: list[Cluster]) -> None:
    with TestPipeline() as p:
        stripped, payloads = p | beam.Create(clusters[:2]) | SetAsideImages()
        only_first = payloads | beam.Filter(lambda kv: kv[0].endswith("p0"))
        restored, rejects = stripped | RestoreImages(only_first)
        assert_that(restored | beam.Map(lambda c: c.page_url), equal_to([clusters[0].page_url]), label="Kept")
        assert_that(rejects | beam.Map(lambda r: (r.stage, r.reason, r.id)),
                    equal_to([("images", INTERNAL_ERROR, im.record_id) for im in clusters[1].images]),
                    label="Rejects")


def test_phase1_moves_bytes_once_around_its_light_stages() -> None:
    """The builder sets the bytes aside before the first light stage and restores them before captioning."""
    config = build_config("demo")
    p = beam.Pipeline()
    build_phase(p, CLUSTERS, config, PhaseInputs("/tmp/unused", files=()))
    top = [part.full_label for part in p.transforms_stack[0].parts]  # the phase's steps, in the order applied
    order = [name for name in top if name in ("Embed", "SetAsideImages", "ClusterFilter", "CrossPageDedupe",
                                               "SemanticDedup", "RestoreImages", "Caption")]
    assert order == ["Embed", "SetAsideImages", "ClusterFilter", "CrossPageDedupe", "SemanticDedup",
                     "RestoreImages", "Caption"]
    assert all(stage.light == (stage.label in ("ClusterFilter", "CrossPageDedupe", "SemanticDedup",
                                               "Decontaminate")) for stage in CLUSTERS.stages)
