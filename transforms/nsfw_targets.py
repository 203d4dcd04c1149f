"""Stage *nsfw targets* (phase 3): the NSFW check of the renders, between ``Score`` and ``TargetFilter``.

The base model's own safety checker (``synth.model.safety_checker``, SD 1.x) is the only check a render gets in
phase 2. This stage runs the detector of the phase-1 safety stage (:mod:`transforms.models.detectors`: NudeNet,
through ``RunInference``, renders of several units per batch) on every scored render and applies the same
decision (:func:`transforms.safety.nsfw_verdict`, the ``nsfw`` section's class thresholds): it stores the
render's NSFW score (``TargetScores.nsfw_score``: the highest score of the checked classes, in ``scores/`` and
the report) and sets ``Candidate.nsfw`` on a render with a class at or over its threshold. It rejects nothing
itself: the target filter rejects flagged renders as ``nsfw``, first of its criteria, so the decision, its
detail and the render's scores are in ``scores/`` with every other candidate's.

A unit whose renders do not all decode (the score stage has rejected undecodable renders already), or a batch on
which the detector raises, goes on unchecked -- logged and counted as ``nsfw_targets/units_unchecked``, its
``nsfw_score`` left null: those renders still passed the base model's safety checker, and losing them to a
detector fault would not be safer. Counters (namespace ``nsfw_targets``): ``nsfw_score_bin_0`` ...
``nsfw_score_bin_9`` (scores in tenths, for the report), ``flagged``, ``units_unchecked``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import PredictionResult
from PIL import Image

from schemas.records import ScoringUnit
from transforms.common import Reason, StageOutput, count
from transforms.models.detectors import DetectorInput, detector_inference
from transforms.safety import decode_array, nsfw_verdict
from transforms.settings import NSFW_BINS, DetectorConfig, NsfwConfig

LOG = logging.getLogger(__name__)

STAGE = "nsfw_targets"

REASONS: tuple[Reason, ...] = ()
"""None: a flagged render is rejected by the target filter (``nsfw``)."""


class PrepareTargetsFn(beam.DoFn):
    """``ScoringUnit`` -> ``DetectorInput(unit, target arrays)``; a unit whose targets cannot all be decoded goes
    on unchecked (the score stage has already rejected undecodable targets) and is counted."""

    def process(self, unit: ScoringUnit) -> Iterator[Any]:
        try:
            arrays = tuple(decode_array(scored.candidate.image) for scored in unit.candidates)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            count(STAGE, "units_unchecked")
            yield beam.pvalue.TaggedOutput("unchecked", unit)
            return
        yield DetectorInput(unit, arrays)


def score_bin(score: float) -> int:
    """The tenth of 0..1 ``score`` falls in (1.0 in the last)."""
    return min(NSFW_BINS - 1, int(score * NSFW_BINS))


def flag_targets(result: PredictionResult, nsfw: NsfwConfig) -> ScoringUnit:
    """The unit of a prediction with each render's ``scores.nsfw_score`` set, and ``candidate.nsfw`` set on the
    renders the detector flags (a flag of the base model's safety checker stays)."""
    unit = result.example.key
    scored = []
    for item, found in zip(unit.candidates, result.inference, strict=True):
        score, label = nsfw_verdict(found.class_scores, nsfw)
        count(STAGE, f"nsfw_score_bin_{score_bin(score)}")
        item = dataclasses.replace(item, scores=dataclasses.replace(item.scores, nsfw_score=round(score, 4)))
        if label is not None:
            count(STAGE, "flagged")
            item = dataclasses.replace(item, candidate=dataclasses.replace(item.candidate, nsfw=True))
        scored.append(item)
    return unit._replace(candidates=tuple(scored))


def _unchecked_units(failure: tuple[Any, Any]) -> Iterator[ScoringUnit]:
    batch, (_error_type, error_repr, _traceback) = failure
    LOG.warning("nsfw_targets: the detector failed on a batch of %d units (%s); they go on unchecked", len(batch),
                error_repr)
    for example in batch:
        count(STAGE, "units_unchecked")
        yield example.key


class FlagNsfwTargets(beam.PTransform):
    """``ScoringUnit``s (after ``Score``) -> the same with ``scores.nsfw_score`` on every render and
    ``Candidate.nsfw`` set where the detector scores a render at or over an ``nsfw`` threshold; no rejects (the
    target filter rejects flagged renders as ``nsfw``)."""

    def __init__(self, detector: DetectorConfig, nsfw: NsfwConfig) -> None:
        super().__init__()
        self._detector = detector
        self._nsfw = nsfw

    def expand(self, units: beam.PCollection) -> StageOutput:
        no_rejects = units.pipeline | "NoRejects" >> beam.Create([])
        if not self._nsfw.enabled:
            return StageOutput(units, no_rejects)
        prepared = units | "PrepareTargets" >> beam.ParDo(PrepareTargetsFn()).with_output_types(
            DetectorInput).with_outputs("unchecked", main="inputs")
        results, failed = prepared.inputs | "DetectNsfwTargets" >> detector_inference(
            self._detector, STAGE).with_exception_handling()
        flagged = results | "FlagTargets" >> beam.Map(flag_targets, self._nsfw)
        unchecked = failed.failed_inferences | "UncheckedBatches" >> beam.FlatMap(_unchecked_units)
        return StageOutput((flagged, prepared.unchecked, unchecked) | "AllUnits" >> beam.Flatten(), no_rejects)
