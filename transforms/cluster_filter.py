"""Stage *cluster filter*: keep clusters whose images are visually coherent (CLIP image similarity).

Score first, threshold second:

1. **Score** (:func:`coherence`, :class:`ScoreClustersFn`): the pairwise cosine-similarity matrix of a
   cluster's (unit-length) embeddings; per image, its mean similarity to the others. Images under
   ``cluster_filter.outlier_threshold`` leave the cluster as ``outlier_image`` -- but an image is an
   outlier only *against a majority*: when more than half of the images fall under the threshold there
   is no common subject to stray from, nothing is removed and the cluster's own mean similarity decides
   (a blog post mixing four products is an incoherent cluster, not four outliers). A cluster left with
   fewer than ``group.min_images`` images is dropped as ``cluster_too_small``. Every cluster that goes on
   carries its scores: ``ClusterStats.mean_sim`` / ``min_sim`` (mean and smallest pairwise similarity)
   and each ``ImageRecord.coherence``, all computed on the images it keeps.
2. **Threshold** (:class:`ApplyThresholdFn`): a cluster whose ``mean_sim`` is under the coherence
   threshold is dropped as ``incoherent_cluster`` (one reject row counting its images). The threshold is
   ``cluster_filter.coherence_threshold``, or -- with ``cluster_filter.target_keep_rate`` -- calibrated
   on the run's own clusters: the ``1 - target_keep_rate`` quantile of their ``mean_sim``, from Beam's
   ``ApproximateQuantiles`` (exact while the clusters fit its buffers, within a ``1/QUANTILES`` rank
   error beyond), passed to the threshold step as a side input. The keep rate is an upper bound: a calibrated
   threshold never goes under ``coherence_threshold`` (its floor; null: none), so a run of incoherent pages
   keeps only the clusters that pass the floor, however few. The stats say when the floor was the threshold
   (``floor_bound``) and how many clusters were kept short of the request (``short_of_request``).

The threshold used, the mode, and the quantiles of ``mean_sim`` leave the stage as its ``stats`` (an extra
output the phase writes to ``OUT/stats/``) and end in ``manifest.json`` under ``stats.clusters.cluster_filter``,
so a run records the numbers it filtered with and thresholds can be retuned from them.

A calibrated threshold is a global decision, and it carries only ids and scores: each scored cluster sends
``(cluster_id, mean_sim)`` to the quantiles and to a light decision step (the threshold a singleton side
input); the decisions are then joined back to the clusters by ``cluster_id`` (``CoGroupByKey``, one cluster
and one decision per key). No step waits on a global value while holding clusters and their image bytes.
With a fixed threshold, scoring and thresholding fuse with embedding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np

from schemas.records import Cluster, ImageRecord, with_images
from transforms.common import REJECTS, Reason, StageOutput, count, internal_error, reject
from transforms.settings import ClusterFilterConfig

STAGE = "cluster_filter"

OUTLIER_IMAGE = "outlier_image"
INCOHERENT_CLUSTER = "incoherent_cluster"
CLUSTER_TOO_SMALL = "cluster_too_small"

REASONS = (Reason(OUTLIER_IMAGE), Reason(CLUSTER_TOO_SMALL, whole_cluster=True),
           Reason(INCOHERENT_CLUSTER, whole_cluster=True))

QUANTILES = 1001
"""Quantiles computed of the cluster scores: a rank resolution of 0.1% for calibration."""

RECORDED_QUANTILES = tuple(range(0, 101, 5))
"""Percentiles of ``mean_sim`` written to the manifest."""


# --- the math -------------------------------------------------------------------------------------------


class Coherence(NamedTuple):
    """Similarity scores of one set of unit vectors."""

    per_image: np.ndarray
    """Mean cosine similarity of each vector to the others."""
    mean_sim: float
    """Mean pairwise cosine similarity (equal to the mean of ``per_image``)."""
    min_sim: float
    """Smallest pairwise cosine similarity."""


def coherence(embeddings: np.ndarray) -> Coherence:
    """Scores of ``[n, D]`` unit-length embeddings. One vector is trivially coherent (all scores 1)."""
    vectors = np.asarray(embeddings, dtype=np.float64)
    n = len(vectors)
    if n < 2:
        return Coherence(np.ones(n), 1.0, 1.0)
    sims = vectors @ vectors.T
    off_diagonal = ~np.eye(n, dtype=bool)
    per_image = (sims.sum(axis=1) - np.diag(sims)) / (n - 1)
    pairs = sims[off_diagonal]
    return Coherence(per_image, float(pairs.mean()), float(pairs.min()))


class Scored(NamedTuple):
    """What :func:`score_cluster` decides about one cluster."""

    cluster: Cluster
    """The cluster without its outliers, with scores in ``stats`` and each image's ``coherence``."""
    outliers: tuple[tuple[ImageRecord, float], ...]
    """Images removed, with their mean similarity to the others."""


def score_cluster(cluster: Cluster, outlier_threshold: float | None) -> Scored:
    """Score a cluster and remove its outliers (see the module docstring)."""
    missing = [image.image_id for image in cluster.images if image.embedding is None]
    if missing:
        raise ValueError(f"{len(missing)} image(s) without an embedding ({missing[0]}, ...): the cluster "
                         f"filter needs the embed stage")
    first = coherence(np.stack([image.embedding for image in cluster.images]))
    outliers: list[tuple[ImageRecord, float]] = []
    if outlier_threshold is not None:
        low = [i for i, score in enumerate(first.per_image) if score < outlier_threshold]
        if 2 * len(low) <= len(cluster.images):  # outliers only against a majority
            outliers = [(cluster.images[i], float(first.per_image[i])) for i in low]
    removed = {image.image_id for image, _ in outliers}
    images = [image for image in cluster.images if image.image_id not in removed]
    scores = coherence(np.stack([image.embedding for image in images])) if outliers else first
    if outliers:
        cluster = with_images(cluster, images)
    images = [image.replace(coherence=float(score)) for image, score in zip(images, scores.per_image, strict=True)]
    stats = dataclasses.replace(cluster.stats, n_images=len(images), mean_sim=scores.mean_sim, min_sim=scores.min_sim)
    return Scored(cluster.replace(images=tuple(images), stats=stats), tuple(outliers))


def threshold_for_keep_rate(quantiles: Sequence[float], keep_rate: float, n_scores: int) -> float | None:
    """The smallest score among the ``round(keep_rate * n_scores)`` highest: clusters scoring at least this stay.

    ``quantiles`` are evenly spaced quantiles of the ``n_scores`` scores from the minimum to the maximum
    (as ``ApproximateQuantiles`` returns them: quantile ``i`` of ``m`` sits at rank ``i (n - 1) / (m - 1)``).
    ``None`` when there were no scores. At least one cluster is kept.
    """
    if not quantiles or n_scores < 1:
        return None
    keep = min(n_scores, max(1, round(keep_rate * n_scores)))
    rank = n_scores - keep  # 0-based rank, in ascending order, of the lowest score kept
    index = 0 if n_scores == 1 else round(rank * (len(quantiles) - 1) / (n_scores - 1))
    return float(quantiles[index])


def floored(calibrated: float | None, floor: float | None) -> float | None:
    """The threshold in force: the calibrated one, never under the floor."""
    if calibrated is None or floor is None:
        return calibrated
    return max(calibrated, floor)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def calibration_stats(quantiles: Sequence[float], n_scored: int, threshold: float | None,
                      config: ClusterFilterConfig, calibrated: float | None = None,
                      n_kept: int | None = None) -> dict[str, Any]:
    """The ``stats.clusters.cluster_filter`` block of the manifest. With ``target_keep_rate``: ``calibrated`` is
    the quantile threshold before the floor, ``n_kept`` the clusters the threshold in force kept."""
    recorded = {}
    if quantiles:
        for percent in RECORDED_QUANTILES:
            index = round(percent / 100 * (len(quantiles) - 1))
            recorded[f"p{percent:02d}"] = round(float(quantiles[index]), 6)
    stats: dict[str, Any] = {
        "mode": "target_keep_rate" if config.target_keep_rate is not None else "fixed",
        "target_keep_rate": config.target_keep_rate,
        "coherence_threshold": _rounded(threshold),
        "outlier_threshold": config.outlier_threshold,
        "clusters_scored": n_scored,
        "mean_sim_quantiles": recorded,
    }
    if config.target_keep_rate is not None:
        floor = config.coherence_threshold
        requested = min(n_scored, max(1, round(config.target_keep_rate * n_scored))) if n_scored else 0
        stats.update({
            "calibrated_threshold": _rounded(calibrated),
            "floor": floor,
            "floor_bound": floor is not None and calibrated is not None and floor > calibrated,
            "requested": requested,
            "kept": n_kept,
            "short_of_request": None if n_kept is None else max(0, requested - n_kept),
        })
    return stats


# --- the DoFns ------------------------------------------------------------------------------------------


class ScoreClustersFn(beam.DoFn):
    """``Cluster`` -> scored ``Cluster``; outliers and clusters left too small to ``rejects``."""

    def __init__(self, config: ClusterFilterConfig, min_images: int) -> None:
        self._config = config
        self._min_images = min_images

    def process(self, cluster: Cluster) -> Iterator[Any]:
        try:
            scored = score_cluster(cluster, self._config.outlier_threshold)
        except Exception as error:  # noqa: BLE001
            for image in cluster.images:
                yield internal_error(STAGE, error, record=image, cluster_id=cluster.cluster_id)
            return
        for image, score in scored.outliers:
            yield reject(STAGE, OUTLIER_IMAGE, f"mean cosine similarity {score:.4f} to the other images of its "
                         f"cluster < outlier_threshold {self._config.outlier_threshold}", record=image,
                         cluster_id=cluster.cluster_id)
        kept = scored.cluster
        if len(kept.images) < self._min_images:
            yield reject(STAGE, CLUSTER_TOO_SMALL, f"{len(kept.images)} images left after {len(scored.outliers)} "
                         f"outlier(s) < min_images {self._min_images}", cluster=kept)
            count(STAGE, f"{CLUSTER_TOO_SMALL}_clusters")
            return
        count(STAGE, "clusters_scored")
        yield kept


class ApplyThresholdFn(beam.DoFn):
    """Scored ``Cluster`` -> kept, or an ``incoherent_cluster`` reject (a fixed threshold)."""

    def process(self, cluster: Cluster, threshold: float | None) -> Iterator[Any]:
        yield from apply_verdict(cluster, incoherence(cluster.cluster_id, cluster.stats.mean_sim,
                                                      cluster.stats.min_sim, threshold))


def incoherence(cluster_id: str, mean_sim: float | None, min_sim: float | None,
                threshold: float | None) -> str | None:
    """Why a cluster scoring ``mean_sim`` is incoherent under ``threshold`` (the reject detail), or ``None``."""
    if threshold is not None and mean_sim is not None and mean_sim < threshold:
        return (f"mean pairwise cosine similarity {mean_sim:.4f} < coherence threshold {threshold:.4f} "
                f"(min {min_sim:.4f})")
    return None


def apply_verdict(cluster: Cluster, why: str | None) -> Iterator[Any]:
    """The cluster, counted as kept, or its ``incoherent_cluster`` dead letter."""
    if why is not None:
        count(STAGE, f"{INCOHERENT_CLUSTER}_clusters")
        yield reject(STAGE, INCOHERENT_CLUSTER, why, cluster=cluster)
        return
    count(STAGE, "clusters")
    count(STAGE, "images_kept", len(cluster.images))
    yield cluster


class ClusterScore(NamedTuple):
    """What the calibrated threshold needs of a cluster: no images."""

    cluster_id: str
    mean_sim: float | None
    min_sim: float | None


def cluster_score(cluster: Cluster) -> ClusterScore:
    return ClusterScore(cluster.cluster_id, cluster.stats.mean_sim, cluster.stats.min_sim)


def decide(score: ClusterScore, threshold: float | None) -> tuple[str, str | None]:
    """``(cluster_id, reject detail or None)`` of one cluster under the calibrated threshold."""
    return score.cluster_id, incoherence(score.cluster_id, score.mean_sim, score.min_sim, threshold)


class JoinVerdictFn(beam.DoFn):
    """``(cluster_id, {"cluster": [cluster], "verdict": [detail or None]})`` -> kept cluster or reject."""

    def process(self, element: tuple[str, dict[str, Any]]) -> Iterator[Any]:
        cluster_id, joined = element
        clusters, verdicts = list(joined["cluster"]), list(joined["verdict"])
        if len(verdicts) != 1:
            error = RuntimeError(f"{len(verdicts)} coherence verdicts for cluster {cluster_id}")
            for cluster in clusters:
                for image in cluster.images:
                    yield internal_error(STAGE, error, record=image, cluster_id=cluster_id)
            return
        for cluster in clusters:
            yield from apply_verdict(cluster, verdicts[0])


# --- the stage ------------------------------------------------------------------------------------------


class ClusterFilter(beam.PTransform):
    """Scored ``Cluster``s that pass the coherence filter, and (``extra["stats"]``) the threshold used with the
    quantiles of the scores, for ``OUT/stats`` and the manifest."""

    def __init__(self, config: ClusterFilterConfig, min_images: int) -> None:
        super().__init__()
        self._config = config
        self._min_images = min_images

    def expand(self, clusters: beam.PCollection) -> StageOutput:
        config = self._config
        scored = clusters | "ScoreCoherence" >> beam.ParDo(ScoreClustersFn(config, self._min_images)).with_outputs(
            REJECTS, main="scored")
        scores = scored.scored | "ClusterScores" >> beam.Map(cluster_score)
        values = scores | "MeanSimilarities" >> beam.Map(lambda score: score.mean_sim)
        quantiles = values | "ScoreQuantiles" >> beam.ApproximateQuantiles.Globally(QUANTILES)
        n_scored = values | "CountScored" >> beam.combiners.Count.Globally()
        if config.target_keep_rate is None:
            # A fixed threshold is a plain argument: thresholding fuses with scoring, no barrier.
            kept = scored.scored | "ApplyThreshold" >> beam.ParDo(
                ApplyThresholdFn(), config.coherence_threshold).with_outputs(REJECTS, main="kept")
            threshold = scored.scored.pipeline | "FixedThreshold" >> beam.Create([config.coherence_threshold])
            stats = quantiles | "DescribeCalibration" >> beam.Map(
                calibration_stats, beam.pvalue.AsSingleton(n_scored), beam.pvalue.AsSingleton(threshold), config)
        else:
            calibrated = quantiles | "CalibrateThreshold" >> beam.Map(
                threshold_for_keep_rate, config.target_keep_rate, beam.pvalue.AsSingleton(n_scored))
            threshold = calibrated | "FloorThreshold" >> beam.Map(floored, config.coherence_threshold)
            verdicts = scores | "Decide" >> beam.Map(decide, beam.pvalue.AsSingleton(threshold))
            n_kept = (verdicts | "PassingVerdicts" >> beam.Filter(lambda verdict: verdict[1] is None)
                      | "CountKept" >> beam.combiners.Count.Globally())
            keyed = scored.scored | "KeyById" >> beam.Map(lambda cluster: (cluster.cluster_id, cluster))
            kept = (
                {"cluster": keyed, "verdict": verdicts}
                | "JoinVerdicts" >> beam.CoGroupByKey()
                | "ApplyThreshold" >> beam.ParDo(JoinVerdictFn()).with_outputs(REJECTS, main="kept")
            )
            stats = quantiles | "DescribeCalibration" >> beam.Map(
                calibration_stats, beam.pvalue.AsSingleton(n_scored), beam.pvalue.AsSingleton(threshold), config,
                beam.pvalue.AsSingleton(calibrated), beam.pvalue.AsSingleton(n_kept))
        rejects = (scored[REJECTS], kept[REJECTS]) | "FilterRejects" >> beam.Flatten()
        return StageOutput(kept.kept, rejects, {"stats": stats})
