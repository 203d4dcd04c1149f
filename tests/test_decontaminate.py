"""Stage *decontaminate*: clusters holding a copy of an evaluation image (DreamBench) leave the dataset."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError
from tests.clip_helpers import equicorrelated, reencode, vector_cluster
from tests.clusters import sample_clusters
from tests.conftest import SAMPLE, run_pipeline
from transforms.decontaminate import (
    DecontaminateConfig,
    ReferenceImage,
    ReferenceSet,
    contamination,
    reference_files,
)
from transforms.normalize import NormalizeConfig, normalize_image

BACKPACK = "https://shop.example.com/products/backpack"
SAFETY_OFF = ("--set", "detector.enabled=false")  # NudeNet over every photo: a third of a run, and no part of this


def test_contamination_by_hash_or_by_clip() -> None:
    vectors = equicorrelated(4, 0.5, dim=16)  # images 0..2 are the cluster, 3 is an evaluation image
    phashes = ["0000000000000000", "00000000ffffffff", "ffffffff00000000"]
    cluster = vector_cluster("https://shop.example.com/p", vectors[:3], phashes)
    near_hash = ReferenceSet.build([ReferenceImage("eval/a.jpg", int("00000000000000ff", 16), vectors[3])])
    config = DecontaminateConfig(against="eval", max_distance=8, clip_threshold=0.95)

    why = contamination(cluster, near_hash, config)
    assert why is not None and "eval/a.jpg" in why and "perceptual-hash distance 8 <= 8" in why
    assert contamination(cluster, near_hash, DecontaminateConfig(against="eval", max_distance=7)) is None

    # Far in hash, but a CLIP embedding almost identical to image 1's.
    close = vectors[1] + 0.05 * vectors[3]
    close /= np.linalg.norm(close)
    near_clip = ReferenceSet.build([ReferenceImage("eval/b.jpg", int("5555555555555555", 16), close)])
    why = contamination(cluster, near_clip, config)
    assert why is not None and "CLIP similarity 0.99" in why and "eval/b.jpg" in why
    assert contamination(cluster, near_clip, DecontaminateConfig(against="eval", clip_threshold=None)) is None
    assert contamination(cluster, near_clip, DecontaminateConfig(against="eval", clip_threshold=0.9995)) is None
    # Without embeddings on the cluster, only the hash counts.
    bare = cluster.replace(images=tuple(im.replace(embedding=None) for im in cluster.images))
    assert contamination(bare, near_clip, config) is None
    assert contamination(cluster, ReferenceSet.build([]), config) is None


def test_reference_files_from_a_directory_or_a_glob(tmp_path) -> None:
    (tmp_path / "dog").mkdir()
    for name in ("dog/00.jpg", "dog/01.PNG", "cat.webp", "README.md", "images.csv"):
        (tmp_path / name).write_bytes(b"x")
    found = [p.removeprefix(str(tmp_path) + "/") for p in reference_files(str(tmp_path))]
    assert found == ["cat.webp", "dog/00.jpg", "dog/01.PNG"]
    assert [p.rsplit("/", 1)[1] for p in reference_files(str(tmp_path / "dog" / "*"))] == ["00.jpg", "01.PNG"]
    assert reference_files(str(tmp_path / "README.md")) == [str(tmp_path / "README.md")]


@pytest.fixture
def evaluation_set(tmp_path, product_photos: list[bytes]):
    """A small evaluation set: a re-encoded DreamBench photo of the sample (backpack/00), a file that is not
    an image despite its name, and a README that is ignored."""
    refs = tmp_path / "dreambench"
    (refs / "backpack").mkdir(parents=True)
    (refs / "backpack" / "00.jpg").write_bytes(reencode(product_photos[0], size=512, quality=80))
    (refs / "backpack" / "99.jpg").write_bytes(b"this is not a JPEG")
    (refs / "README.md").write_text("DreamBench, a few photos")
    return refs


@pytest.mark.slow
def test_sample_cluster_with_an_evaluation_photo_is_rejected(tmp_path, evaluation_set) -> None:
    # Semantic dedup off: the blog post's photos are copies of product photos, which it would drop.
    out = run_pipeline([SAMPLE], tmp_path / "out", "--profile", "demo", "--set", "cluster_filter.enabled=false",
                       "--set", "semantic_dedup.enabled=false", "--set", "detector.enabled=false",
                       "--set", f"decontaminate.against={evaluation_set}")
    contaminated = [r for r in out.rejects() if r["reason"] == "contaminated"]
    assert [(r["page_url"], r["stage"], r["n_images"]) for r in contaminated] == [(BACKPACK, "decontaminate", 6)]
    assert "backpack/00.jpg: perceptual-hash distance" in contaminated[0]["detail"]
    kept = {c["page_url"] for c in out.clusters()}
    assert BACKPACK not in kept and len(kept) >= 25  # every other product page stays
    # The blog post shows backpack/03, not the evaluation photo: it stays.
    assert "https://blog.example.org/2024/05/my-desk-setup" in kept

    stats = out.manifest["phases"]["clusters"]["stats"]["decontaminate"]
    assert stats["references"] == 1 and stats["clip_threshold"] is None  # the demo checks hashes only
    assert len(stats["unreadable"]) == 1 and "99.jpg" in stats["unreadable"][0]
    assert out.manifest["records"]["reconciled"]
    assert out.manifest["clusters"]["rejected"]["contaminated"] == 1
    assert out.manifest["phases"]["clusters"]["counters"]["decontaminate"]["references_unreadable"] == 1


@pytest.mark.slow
def test_clip_check_catches_a_mirrored_copy(tmp_path, product_photos: list[bytes], sample_rows: list[dict]) -> None:
    # A mirrored copy is 30+ bits away in perceptual hash; the image embeddings (here of the tiny random
    # model, which still maps a mirrored photo closer to its original than to any other photo) catch it.
    refs = tmp_path / "eval"
    refs.mkdir()
    mirrored = reencode(product_photos[0], size=512, quality=90, mirror=True)
    (refs / "mirrored.jpg").write_bytes(mirrored)
    # The hash check alone misses it: the backpack page's photos, normalized as the pipeline does, are all further
    # from the mirrored copy than decontaminate.max_distance.
    (backpack,) = sample_clusters(sample_rows, ["/products/backpack"])
    hash_only = ReferenceSet.build([ReferenceImage("mirrored.jpg", int(normalize_image(mirrored,
                                                                                       NormalizeConfig()).phash, 16))])
    assert backpack.page_url == BACKPACK
    assert contamination(backpack, hash_only, DecontaminateConfig(against=str(refs))) is None
    out = run_pipeline([SAMPLE], tmp_path / "out", "--profile", "demo", *SAFETY_OFF,
                       "--set", "cluster_filter.enabled=false", "--set", f"decontaminate.against={refs}",
                       "--set", "decontaminate.clip_threshold=0.9965")
    contaminated = [r for r in out.rejects() if r["reason"] == "contaminated"]
    assert [r["page_url"] for r in contaminated] == [BACKPACK]
    assert "CLIP similarity" in contaminated[0]["detail"]
    assert out.manifest["phases"]["clusters"]["stats"]["decontaminate"]["clip_threshold"] == 0.9965


def test_references_that_do_not_exist_are_refused_before_running(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="matches no image file"):
        run_pipeline([SAMPLE], tmp_path / "out", "--set", f"decontaminate.against={tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match="matches no file"):
        run_pipeline([SAMPLE], tmp_path / "out", "--set", f"decontaminate.against={tmp_path}/*.jpg")


@pytest.mark.parametrize("kwargs", [{"against": " "}, {"max_distance": -1}, {"clip_threshold": 1.5}])
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DecontaminateConfig(**kwargs)
