"""Stage *score* (phase 3): attach scores to every synthesized target, before any threshold.

Per candidate (the :class:`~schemas.records.TargetScores` it gets):

* ``subject_sim`` / ``subject_sim_max`` -- CLIP image-image cosine similarity of the target to the real
  images of its cluster (mean: is the subject preserved; max: to its nearest photo, too close is a copy);
* ``text_sim`` -- CLIP image-text cosine similarity of the target to its prompt with the identifier token
  replaced by the cluster's subject phrase ("a sks teapot on a beach" -> "a red ceramic teapot on a beach"):
  the text a trainer will pair with the target (:func:`target_prompt`);
* ``copy_distance`` -- the smallest perceptual-hash distance to a real image of the cluster;
* quality heuristics (:func:`image_quality`) -- brightness and contrast of the luma, and sharpness as the
  variance of its Laplacian; the target's size is the decoded image's.

The target's *source* is the real image it is nearest to (:func:`nearest_image`): the one behind
``subject_sim_max``, the one it could be copying. The assembly stage never shows it as a demo.

The CLIP model is the ``embed`` section's, through ``RunInference`` with
:class:`transforms.models.clip.OpenClipImageTextHandler` (images and texts of a cluster in one element, batched by
image count like the embed stage). The real images' embeddings stored in ``clusters/`` are reused when their
``provenance.embed_model`` is the model that scores (``score.reuse_embeddings``); otherwise they are computed in
the same pass as the targets.

Steps: ``JoinClusters`` (``CoGroupByKey`` of candidates and clusters on the cluster id: a cluster's candidates
meet its real images once, in one element) -> ``PrepareScoring`` (decode, heuristics, hashes, the model's eval
transform) -> ``ClipEmbeddings`` (``RunInference``) -> ``ComputeScores``. Dead letters: ``cluster_missing``
(no cluster with the candidate's cluster id in the clusters input), ``target_decode_error``,
``no_reference_images`` (none of the cluster's real images decodes), ``scoring_failed`` (the model raised on the
batch), ``internal_error``. Each is one row per candidate.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import PredictionResult
from PIL import Image

from dreambooth_synth.prompts import class_noun_or_default, render_prompt
from schemas.ids import hamming
from schemas.records import Candidate, ImageRecord, ScoredCandidate, ScoringUnit, TargetScores
from transforms.common import REJECTS, Reason, StageOutput, count, internal_error, reject
from transforms.models.clip import ImagesAndTexts, clip_text_inference, decode_image, image_transform, model_id
from transforms.settings import EmbedConfig, ScoreConfig

LOG = logging.getLogger(__name__)

STAGE = "score"

CLUSTER_MISSING = "cluster_missing"
TARGET_DECODE_ERROR = "target_decode_error"
NO_REFERENCE_IMAGES = "no_reference_images"
SCORING_FAILED = "scoring_failed"
REASONS = tuple(Reason(code) for code in (CLUSTER_MISSING, TARGET_DECODE_ERROR, NO_REFERENCE_IMAGES, SCORING_FAILED))


# --- plain functions -------------------------------------------------------------------------------------


class Quality(NamedTuple):
    """Heuristic measures of one image (see :class:`~schemas.records.TargetScores`)."""

    brightness: float
    contrast: float
    sharpness: float
    width: int
    height: int


def image_quality(image: Image.Image, sharpness_side: int = 256) -> Quality:
    """Brightness and contrast (mean and standard deviation of the luma, 0..1) and sharpness (variance of the
    4-neighbour Laplacian of the 0-255 luma, after downscaling to at most ``sharpness_side`` px a side)."""
    gray = image.convert("L")
    luma = np.asarray(gray, dtype=np.float32) / np.float32(255)
    if max(gray.size) > sharpness_side:
        gray = gray.copy()
        gray.thumbnail((sharpness_side, sharpness_side), Image.Resampling.BILINEAR)
    pixels = np.asarray(gray, dtype=np.float32)
    if min(pixels.shape) < 3:
        sharpness = 0.0
    else:
        laplacian = (pixels[1:-1, :-2] + pixels[1:-1, 2:] + pixels[:-2, 1:-1] + pixels[2:, 1:-1]
                     - 4 * pixels[1:-1, 1:-1])
        sharpness = float(laplacian.var())
    return Quality(float(luma.mean()), float(luma.std()), sharpness, image.width, image.height)


def subject_phrase(candidate: Candidate) -> str:
    """What replaces ``{subject}`` in the trainer's prompt: the cluster's subject description, else its class
    noun ("object" when it has none, as in synthesis)."""
    subject = " ".join((candidate.subject or "").split())
    return subject or class_noun_or_default(candidate.class_noun)


def target_prompt(candidate: Candidate) -> str:
    """The candidate's prompt without the identifier token: the template with the subject phrase."""
    return render_prompt(candidate.prompt_template, subject_phrase(candidate))


def nearest_image(sims: np.ndarray, distances: Sequence[int], image_ids: Sequence[str]) -> int:
    """Index of the target's source among the real images: highest CLIP similarity; ties (within 1e-6) go to
    the smaller perceptual-hash distance, then to the smaller image id (deterministic)."""
    return min(range(len(image_ids)), key=lambda j: (-round(float(sims[j]), 6), distances[j], image_ids[j]))


def target_scores(sims: np.ndarray, text_sim: float, quality: Quality, distances: Sequence[int]) -> TargetScores:
    """Scores of one target from its CLIP similarities to the real images, to its prompt, its heuristics and its
    perceptual-hash distances to the real images."""
    return TargetScores(
        subject_sim=float(np.mean(sims)),
        subject_sim_max=float(np.max(sims)),
        text_sim=float(text_sim),
        copy_distance=int(min(distances)),
        brightness=quality.brightness,
        contrast=quality.contrast,
        sharpness=quality.sharpness,
    )


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


# --- the DoFns ------------------------------------------------------------------------------------------


class Prepared(NamedTuple):
    """What :class:`PrepareScoringFn` hands to the model with the pixels: the unit and the plain measures."""

    unit: ScoringUnit
    qualities: tuple[Quality, ...]
    """Per candidate of ``unit``."""
    phashes: tuple[str, ...]
    """Per candidate of ``unit``."""
    references: tuple[ImageRecord, ...]
    """The real images to compare with (those that decode, or all with stored embeddings)."""
    stored: np.ndarray | None
    """Their stored embeddings ``[n, D]``, or ``None`` when the pixels of ``references`` follow the targets'."""


def join_cluster(element: tuple[str, dict[str, list[Any]]]) -> Iterator[Any]:
    """``(cluster_id, {"candidates": [...], "clusters": [...]})`` -> a :class:`ScoringUnit`, or a
    ``cluster_missing`` reject per candidate. Clusters without candidates are only counted."""
    cluster_id, grouped = element
    candidates = sorted(grouped["candidates"], key=lambda c: c.candidate_id)
    clusters = grouped["clusters"]
    if not candidates:
        count(STAGE, "clusters_without_candidates")
        return
    if not clusters:
        for candidate in candidates:
            yield reject(STAGE, CLUSTER_MISSING, f"no cluster {cluster_id} in the clusters input (assemble.clusters "
                         f"or OUT/clusters/): the candidate has no real images to be compared with",
                         id=candidate.candidate_id, cluster_id=cluster_id, page_url=candidate.page_url)
        return
    # Clusters are content-addressed: two rows with one id are the same images (an input listed twice, or two
    # runs' outputs); take one deterministically.
    cluster = min(clusters, key=lambda c: (c.page_url, c.subject or "", c.class_noun or ""))
    count(STAGE, "clusters")
    yield ScoringUnit(cluster, tuple(candidates))


class PrepareScoringFn(beam.DoFn):
    """``ScoringUnit`` -> ``ImagesAndTexts(Prepared, pixels, texts)``: targets decoded, measured, hashed and
    transformed for the model, their prompts, and the real images' pixels when their embeddings must be
    computed. Undecodable targets are ``target_decode_error`` rejects."""

    def __init__(self, config: ScoreConfig, embed: EmbedConfig) -> None:
        self._config = config
        self._embed = embed
        self._model_id = model_id(embed)

    def setup(self) -> None:
        self._transform = image_transform(self._embed)

    def process(self, unit: ScoringUnit) -> Iterator[Any]:
        try:
            outputs = list(self._process(unit))  # all or nothing: a candidate is never both rejected and failed
        except Exception as error:  # noqa: BLE001
            for candidate in unit.candidates:
                yield internal_error(STAGE, error, id=candidate.candidate_id, cluster_id=candidate.cluster_id,
                                     page_url=candidate.page_url)
            return
        yield from outputs

    def _process(self, unit: ScoringUnit) -> Iterator[Any]:
        import imagehash

        cluster = unit.cluster
        kept, pixels, qualities, phashes = [], [], [], []
        for candidate in unit.candidates:
            try:
                image = decode_image(candidate.image)
                tensor = self._transform(image)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                yield reject(STAGE, TARGET_DECODE_ERROR, f"the target image does not decode: {type(error).__name__}: "
                             f"{error}", id=candidate.candidate_id, cluster_id=candidate.cluster_id,
                             page_url=candidate.page_url)
                continue
            kept.append(candidate)
            pixels.append(tensor)
            qualities.append(image_quality(image, self._config.sharpness_side))
            phashes.append(str(imagehash.phash(image)))
        if not kept:
            return
        stored = None
        references: list[ImageRecord] = list(cluster.images)
        reuse = (self._config.reuse_embeddings and cluster.provenance.embed_model == self._model_id
                 and all(image.embedding is not None for image in references))
        if reuse:
            stored = _unit(np.stack([image.embedding for image in references]))
            count(STAGE, "reference_embeddings_reused", len(references))
        else:
            references = []
            for image in cluster.images:
                try:
                    pixels.append(self._transform(decode_image(image.image)))
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                    count(STAGE, "reference_images_undecodable")
                    continue
                references.append(image)
            count(STAGE, "reference_embeddings_computed", len(references))
        if not references:
            for candidate in kept:
                yield reject(STAGE, NO_REFERENCE_IMAGES, f"none of the {len(cluster.images)} real images of cluster "
                             f"{cluster.cluster_id} decodes: nothing to compare the target with",
                             id=candidate.candidate_id, cluster_id=candidate.cluster_id, page_url=candidate.page_url)
            return
        prepared = Prepared(ScoringUnit(cluster, tuple(kept)), tuple(qualities), tuple(phashes), tuple(references),
                            stored)
        yield ImagesAndTexts(prepared, tuple(pixels), tuple(target_prompt(c) for c in kept))


def compute_scores(result: PredictionResult) -> ScoringUnit:
    """A prediction of :class:`~transforms.models.clip.OpenClipImageTextHandler` -> the unit with every candidate
    scored (with the target's source: :func:`nearest_image`)."""
    prepared: Prepared = result.example.key
    image_rows, text_rows = result.inference
    candidates = prepared.unit.candidates
    n = len(candidates)
    targets = _unit(image_rows[:n])
    references = prepared.stored if prepared.stored is not None else _unit(image_rows[n:])
    if len(references) != len(prepared.references) or len(text_rows) != n:
        raise RuntimeError(f"{len(image_rows)} image and {len(text_rows)} text embeddings for {n} targets and "
                           f"{len(prepared.references)} real images")
    texts = _unit(text_rows)
    ids = [image.image_id for image in prepared.references]
    scored = []
    for i, candidate in enumerate(candidates):
        quality = prepared.qualities[i]
        distances = [hamming(prepared.phashes[i], image.phash) for image in prepared.references]
        sims = references.astype(np.float64) @ targets[i].astype(np.float64)
        text_sim = float(np.dot(targets[i].astype(np.float64), texts[i].astype(np.float64)))
        scores = target_scores(sims, text_sim, quality, distances)
        source = prepared.references[nearest_image(sims, distances, ids)].image_id
        # The decoded size is what a trainer gets, whatever the record says.
        candidate = dataclasses.replace(candidate, width=quality.width, height=quality.height)
        scored.append(ScoredCandidate(candidate, target_prompt(candidate), scores, source))
    count(STAGE, "candidates_scored", n)
    return ScoringUnit(prepared.unit.cluster, tuple(scored))


class ComputeScoresFn(beam.DoFn):
    """:func:`compute_scores`, with an unexpected error as an ``internal_error`` reject per candidate."""

    def process(self, result: PredictionResult) -> Iterator[Any]:
        try:
            yield compute_scores(result)
        except Exception as error:  # noqa: BLE001
            for candidate in result.example.key.unit.candidates:
                yield internal_error(STAGE, error, id=candidate.candidate_id, cluster_id=candidate.cluster_id,
                                     page_url=candidate.page_url)


def scoring_failure_rejects(failure: tuple[Any, Any]) -> Iterator[Any]:
    """A batch on which the model raised -> one ``scoring_failed`` reject per candidate in it."""
    batch, (error_type, error_repr, _traceback) = failure
    name = getattr(error_type, "__name__", str(error_type))
    LOG.warning("score: inference failed on a batch of %d clusters: %s", len(batch), error_repr)
    for example in batch:
        for candidate in example.key.unit.candidates:
            yield reject(STAGE, SCORING_FAILED, f"the CLIP model raised {name} on this candidate's batch: "
                         f"{error_repr}", id=candidate.candidate_id, cluster_id=candidate.cluster_id,
                         page_url=candidate.page_url)


# --- the stage ------------------------------------------------------------------------------------------


class Score(beam.PTransform):
    """``(candidates, clusters)`` -> ``ScoringUnit``s whose candidates are ``ScoredCandidate``s."""

    def __init__(self, config: ScoreConfig, embed: EmbedConfig) -> None:
        super().__init__()
        self._config = config
        self._embed = embed

    def expand(self, inputs: tuple[beam.PCollection, beam.PCollection]) -> StageOutput:
        candidates, clusters = inputs
        keyed_candidates = candidates | "KeyCandidates" >> beam.Map(lambda c: (c.cluster_id, c))
        keyed_clusters = clusters | "KeyClusters" >> beam.Map(lambda c: (c.cluster_id, c))
        joined = (
            {"candidates": keyed_candidates, "clusters": keyed_clusters}
            | "JoinClusters" >> beam.CoGroupByKey()
            | "MakeUnits" >> beam.FlatMap(join_cluster).with_outputs(REJECTS, main="units")
        )
        prepared = joined.units | "PrepareScoring" >> beam.ParDo(
            PrepareScoringFn(self._config, self._embed)).with_output_types(ImagesAndTexts).with_outputs(
            REJECTS, main="inputs")
        inference = clip_text_inference(self._embed).with_exception_handling()
        results, failed = prepared.inputs | "ClipEmbeddings" >> inference
        scored = results | "ComputeScores" >> beam.ParDo(ComputeScoresFn()).with_outputs(REJECTS, main="units")
        failures = failed.failed_inferences | "FailedBatches" >> beam.FlatMap(
            scoring_failure_rejects).with_outputs(REJECTS, main="none")
        rejects = ((joined[REJECTS], prepared[REJECTS], scored[REJECTS], failures[REJECTS])
                   | "ScoreRejects" >> beam.Flatten())
        return StageOutput(scored.units, rejects)
