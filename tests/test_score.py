"""Target scoring on real photos with the tiny CLIP model: heuristics, copy detection, text path, dead letters."""

from __future__ import annotations

import dataclasses
import io
import pickle

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageFilter

from schemas.records import Candidate
from tests.clip_helpers import TINY, reencode
from tests.clusters import beam_counters, sample_clusters
from tests.phase3_helpers import as_png, candidate, png, scored
from transforms.models.clip import decode_image, image_transform, load_image_encoder, model_id
from transforms.score import (
    Score,
    ScoreConfig,
    image_quality,
    nearest_image,
    subject_phrase,
    target_prompt,
)
from transforms.target_filter import TargetFilterConfig, failures, fixed_bounds


@pytest.fixture(scope="module")
def clusters(sample_rows) -> list:
    return sample_clusters(sample_rows, ["/products/teapot", "/products/backpack", "/products/clock"])


@pytest.fixture(scope="module")
def encoder():
    return load_image_encoder(TINY, text=True)


def _with_stored_embeddings(cluster, encoder):
    transform = image_transform(TINY)
    vectors = encoder.embed(torch.stack([transform(decode_image(im.image)) for im in cluster.images]))
    images = tuple(im.replace(embedding=v.astype(np.float16).astype(np.float32))  # as stored in clusters/
                   for im, v in zip(cluster.images, vectors, strict=True))
    return cluster.replace(images=images,
                           provenance=dataclasses.replace(cluster.provenance, embed_model=model_id(TINY)))


# --- heuristics on real photos -----------------------------------------------------------------------------

def _on(photo: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    canvas = Image.new("RGB", (512, 512), colour)
    canvas.paste(photo.resize((100, 100)), (206, 206))
    return canvas


def test_quality_heuristics_on_a_real_photo_and_its_spoilt_copies(product_photos) -> None:
    photo = Image.open(io.BytesIO(product_photos[0])).convert("RGB").resize((512, 512))
    spoilt = {
        None: photo,
        "blank_image": Image.new("RGB", (512, 512), (128, 128, 128)),
        # A small subject on black or white: not uniform, but dark or bright overall (a uniformly darkened photo
        # is also near uniform, and counted as blank: the first failing criterion).
        "too_dark": _on(photo, (0, 0, 0)),
        "too_bright": _on(photo, (255, 255, 255)),
        "blurry": photo.filter(ImageFilter.GaussianBlur(4)),
    }
    config = TargetFilterConfig(target_keep_rate=None)
    for expected, image in spoilt.items():
        quality = image_quality(image)
        failed = [r for r, _ in failures(scored(brightness=quality.brightness, contrast=quality.contrast,
                                                sharpness=quality.sharpness), config, fixed_bounds(config))]
        assert failed[:1] == ([expected] if expected else []), (expected, quality)
    # Sharpness does not depend on the render's resolution (measured at <= 256 px).
    original = Image.open(io.BytesIO(product_photos[0])).convert("RGB")
    at_512, at_1024 = (image_quality(original.resize((s, s), Image.Resampling.LANCZOS)) for s in (512, 1024))
    assert at_1024.sharpness == pytest.approx(at_512.sharpness, rel=0.15)
    assert image_quality(photo).width == 512


def test_the_prompt_a_trainer_sees_has_the_subject_phrase_and_no_identifier(clusters) -> None:
    c = candidate(clusters[0], template="a watercolor painting of a {subject}", subject="red ceramic teapot")
    assert c.prompt == "a watercolor painting of a sks teapot"
    assert target_prompt(c) == "a watercolor painting of a red ceramic teapot"
    no_subject = dataclasses.replace(c, subject=None, class_noun="object")
    assert subject_phrase(no_subject) == "object"
    assert target_prompt(dataclasses.replace(c, prompt_template="on a beach")) == "red ceramic teapot, on a beach"


def test_the_source_is_the_nearest_photo_with_deterministic_ties() -> None:
    assert nearest_image(np.array([0.5, 0.9, 0.7]), [30, 30, 2], ["a", "b", "c"]) == 1
    assert nearest_image(np.array([0.9, 0.9, 0.9]), [30, 12, 12], ["a", "c", "b"]) == 2  # hash, then id


# --- the stage ----------------------------------------------------------------------------------------------

def _collect(path):
    """An ``assert_that`` matcher that saves what reaches it (a pipeline's elements, back in the test)."""
    def save(actual):
        with open(path, "wb") as handle:
            pickle.dump(list(actual), handle)
    return save


def score(tmp_path, candidates, clusters, config: ScoreConfig = ScoreConfig()) -> tuple[dict, list, object]:
    """Run the stage in a TestPipeline: ``({candidate_id: ScoredCandidate}, rejects, result)``."""
    p = TestPipeline()
    units, rejects = (p | "Candidates" >> beam.Create(candidates), p | "Clusters" >> beam.Create(clusters)) | Score(
        config, TINY)
    assert_that(units, _collect(tmp_path / "units.pkl"), label="Units")
    assert_that(rejects, _collect(tmp_path / "rejects.pkl"), label="Rejects")
    result = p.run()
    result.wait_until_finish()
    units = pickle.loads((tmp_path / "units.pkl").read_bytes())
    return ({s.candidate.candidate_id: s for unit in units for s in unit.candidates},
            pickle.loads((tmp_path / "rejects.pkl").read_bytes()), result)


def test_copy_of_a_demo_is_detected_and_named_as_the_source(clusters, encoder, tmp_path) -> None:
    teapot = _with_stored_embeddings(clusters[0], encoder)
    copied = teapot.images[1]
    # A target that is one of the cluster's real photos, resized to the render size and re-encoded as PNG.
    copy = candidate(teapot, as_png(reencode(copied.image, size=480, quality=85)), tag="copy")
    other_subject = candidate(teapot, as_png(clusters[2].images[0].image), tag="clock")  # a photo of another page
    result, rejects, run = score(tmp_path, [copy, other_subject], [teapot])
    assert rejects == []

    copy_scored, other_scored = result[copy.candidate_id], result[other_subject.candidate_id]
    assert copy_scored.source_image_id == copied.image_id
    assert copy_scored.scores.copy_distance <= 4 and other_scored.scores.copy_distance > 10
    assert copy_scored.scores.subject_sim_max > 0.99 > other_scored.scores.subject_sim_max
    config = TargetFilterConfig(target_keep_rate=None)
    assert [r for r, _ in failures(copy_scored, config, fixed_bounds(config))][:2] == ["copy_phash", "copy_clip"]
    assert "copy_phash" not in [r for r, _ in failures(other_scored, config, fixed_bounds(config))]
    assert beam_counters(run, "score")["reference_embeddings_reused"] == len(teapot.images)


@pytest.mark.slow
def test_text_and_image_similarities_are_the_models(clusters, encoder, tmp_path) -> None:
    """Scores through RunInference equal a direct computation with the same model; stored embeddings (float16)
    give the same subject similarities as computed ones."""
    teapot = clusters[0]
    target = candidate(teapot, as_png(clusters[1].images[0].image, 256), template="a {subject} in the snow",
                       subject="white teapot", size=256)
    stored = _with_stored_embeddings(teapot, encoder)
    out = {}
    for name, cluster in (("computed", teapot), ("stored", stored)):
        (tmp_path / name).mkdir()
        by_id, _, result = score(tmp_path / name, [target], [cluster])
        out[name] = by_id[target.candidate_id]
        assert beam_counters(result, "score")[f"reference_embeddings_{name.replace('stored', 'reused')}"] == 5
    # A cluster whose embeddings were made by another model is embedded again.
    (tmp_path / "other").mkdir()
    other_model = stored.replace(provenance=dataclasses.replace(stored.provenance, embed_model="open_clip:ViT-B-32/x"))
    result = score(tmp_path / "other", [target], [other_model])[2]
    assert "reference_embeddings_computed" in beam_counters(result, "score")

    transform = image_transform(TINY)
    image = encoder.embed(transform(decode_image(target.image))[None])[0]
    text = encoder.embed_texts(["a white teapot in the snow"])[0]
    real = encoder.embed(torch.stack([transform(decode_image(im.image)) for im in teapot.images]))
    computed = out["computed"]
    assert computed.prompt == "a white teapot in the snow"
    assert computed.scores.text_sim == pytest.approx(float(image @ text), abs=1e-5)
    assert computed.scores.subject_sim == pytest.approx(float((real @ image).mean()), abs=1e-5)
    assert computed.scores.subject_sim_max == pytest.approx(float((real @ image).max()), abs=1e-5)
    assert computed.source_image_id == teapot.images[int((real @ image).argmax())].image_id
    assert out["stored"].scores.subject_sim == pytest.approx(computed.scores.subject_sim, abs=2e-3)
    assert out["stored"].source_image_id == computed.source_image_id
    assert (computed.candidate.width, computed.candidate.height) == (256, 256)


def test_candidates_that_cannot_be_scored_are_dead_letters(clusters) -> None:
    teapot, backpack = clusters[0], clusters[1]
    good = candidate(teapot, as_png(backpack.images[0].image, 128), tag="good")
    broken = candidate(teapot, b"<html>not an image</html>", tag="broken")
    orphan = candidate("0" * 32, as_png(backpack.images[1].image, 128), tag="orphan")
    unusable = backpack.replace(images=tuple(im.replace(image=b"broken") for im in backpack.images))
    lost = candidate(unusable, as_png(backpack.images[2].image, 128), tag="lost")
    p = TestPipeline()
    units, rejects = (p | "Candidates" >> beam.Create([good, broken, orphan, lost]),
                      p | "Clusters" >> beam.Create([teapot, unusable, clusters[2]])) | Score(ScoreConfig(), TINY)
    assert_that(units | "Ids" >> beam.FlatMap(lambda u: [c.candidate.candidate_id for c in u.candidates]),
                equal_to([good.candidate_id]), label="Scored")
    assert_that(rejects | beam.Map(lambda r: (r.id, r.stage, r.reason, r.n_images, r.cluster_id)), equal_to([
        (broken.candidate_id, "score", "target_decode_error", 1, teapot.cluster_id),
        (orphan.candidate_id, "score", "cluster_missing", 1, "0" * 32),
        (lost.candidate_id, "score", "no_reference_images", 1, unusable.cluster_id),
    ]), label="Rejects")
    result = p.run()
    result.wait_until_finish()
    score = beam_counters(result, "score")
    assert score["clusters_without_candidates"] == 1 and score["reference_images_undecodable"] == len(backpack.images)
    assert score["candidates_scored"] == 1


def test_a_black_render_flagged_nsfw_is_scored_and_rejected_first_as_nsfw(clusters) -> None:
    black: Candidate = candidate(clusters[0], png(Image.new("RGB", (512, 512))), nsfw=True)
    p = TestPipeline()
    units, _ = (p | "Candidates" >> beam.Create([black]), p | "Clusters" >> beam.Create([clusters[0]])) | Score(
        ScoreConfig(), TINY)
    config = TargetFilterConfig(target_keep_rate=None)
    reasons = units | beam.Map(lambda u: [r for r, _ in failures(u.candidates[0], config, fixed_bounds(config))][:4])
    assert_that(reasons, equal_to([["nsfw", "blank_image", "too_dark", "blurry"]]))
    p.run().wait_until_finish()


def test_a_batch_the_model_fails_on_rejects_each_of_its_candidates(clusters) -> None:
    from schemas.records import ScoringUnit
    from transforms.models.clip import ImagesAndTexts
    from transforms.score import Prepared, scoring_failure_rejects

    teapot = clusters[0]
    targets = (candidate(teapot, b"", tag="a"), candidate(teapot, b"", tag="b"))
    prepared = Prepared(ScoringUnit(teapot, targets), (), (), teapot.images, None)
    failure = ([ImagesAndTexts(prepared, (), ())], (RuntimeError, "RuntimeError('CUDA OOM')", []))
    rejects = [tagged.value for tagged in scoring_failure_rejects(failure)]
    assert [(r.reason, r.id, r.cluster_id, r.n_images) for r in rejects] == [
        ("scoring_failed", c.candidate_id, teapot.cluster_id, 1) for c in targets]
    assert "CUDA OOM" in rejects[0].detail


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_text_embeddings_under_cuda_autocast_match_cpu(encoder) -> None:
    texts = ["a red ceramic teapot on a beach", "a watercolor painting of a dog", "a backpack seen from above"]
    gpu = load_image_encoder(dataclasses.replace(TINY, device="cuda", precision="auto"), text=True)
    assert gpu.device == "cuda" and gpu.autocast_dtype in (torch.bfloat16, torch.float16)
    on_gpu, on_cpu = gpu.embed_texts(texts), encoder.embed_texts(texts)
    assert on_gpu.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(on_gpu, axis=1), 1.0, atol=1e-5)
    assert (np.sum(on_cpu * on_gpu, axis=1) > 0.99).all()
