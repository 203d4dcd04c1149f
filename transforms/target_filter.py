"""Stage *target filter* (phase 3): keep the synthesized targets that are usable training targets.

Scores are already on every candidate (stage *score*); this stage only compares them with bounds. A target
is kept when it passes every criterion below. Each criterion is its own reject reason, and a target failing
several is counted under the **first** one in this order (its reject ``detail`` and its ``scores/`` row list
all of them):

====  ========================  ======================================================================
 1    ``nsfw``                  flagged by the base model's safety checker or the NSFW detector (``drop_nsfw``)
 2    ``target_too_small``      shorter side under ``min_side``
 3    ``blank_image``           contrast (luma standard deviation) under ``min_contrast``: near uniform
 4    ``too_dark``              brightness (mean luma) under ``min_brightness``
 5    ``too_bright``            brightness over ``max_brightness``
 6    ``blurry``                sharpness (variance of the Laplacian) under ``min_sharpness``
 7    ``copy_phash``            perceptual-hash distance to a real image of the cluster <= ``max_copy_distance``
 8    ``copy_clip``             CLIP similarity to the nearest real image >= ``max_copy_sim``
 9    ``subject_not_preserved`` mean CLIP similarity to the cluster's real images under the subject bound
 10   ``prompt_not_followed``   CLIP similarity to the prompt under the text bound
====  ========================  ======================================================================

Why this order: an image that is not a usable picture (1-6) has meaningless CLIP scores, so it is rejected for
what it is; a copy of a demo (7-8) -- the failure synthesis exists to avoid -- scores *high* on subject
similarity, so it must be caught before the similarity bounds; subject preservation (9) comes before prompt
following (10) because a target of another subject is useless whatever it shows.

**Bounds.** Criteria 1-8 are absolute: their bounds are properties of an image (or of an image pair) that do
not depend on the rest of the run. The two similarity bounds (9, 10) are either fixed
(``min_subject_sim``, ``min_text_sim``) or, with ``target_keep_rate`` (the default, 0.25: the reference recipe
keeps 20-30% of its renders), calibrated on the run: among the candidates that pass 1-8, both bounds are set at
the *same quantile level* of their own score distributions, the level chosen so that ``round(target_keep_rate x
candidates scored)`` candidates pass, as nearly as the data allow (:func:`calibrate`). Equivalently: a candidate's
*level* is the lower of its two score percentiles, and the candidates whose level reaches the chosen one stay. The
quantiles come from Beam's ``ApproximateQuantiles`` (1001 of them: exact while the scores fit its buffers; the
count of candidates per level is exact, so the kept count is within one or two candidates of the request up to a
thousand candidates, and within about 0.2% beyond). When 1-8 already drop more than ``1 - target_keep_rate``, the
similarity bounds fall to the lowest scores (nothing more is dropped) and the manifest says so.

**Floors.** The keep rate is an upper bound, not a quota: "keep at most 25%, and only what passes the floors".
A calibrated bound never goes under its fixed value, ``min_subject_sim`` or ``min_text_sim`` (null: no floor):
the level is chosen among the candidates that pass both floors (so their count at or above it is exact), and each
bound is the larger of its quantile at that level and its floor. When every render of a run is poor, nothing is
kept. The calibration says, per bound, its quantile, its floor and whether the floor was the bound
(``floor_bound``), how many candidates passing 1-8 fail a floor (``below_floors``), whether the floors kept the
count under the request (``limited_by_floors``) and by how much (``short_of_request``).

The bounds used, the calibration (level, requested and expected counts, floors) and quantiles of every score go to
``manifest.json`` under ``stats.assemble.target_filter``; every scored candidate's scores and decision go to
``OUT/scores/*.parquet``, so bounds can be audited and retuned without scoring again.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam

from schemas.records import ScoredCandidate, ScoringUnit
from transforms.common import INTERNAL_ERROR, REJECTS, Reason, StageOutput, count, internal_error, reject
from transforms.settings import TargetFilterConfig

STAGE = "target_filter"

NSFW = "nsfw"
TARGET_TOO_SMALL = "target_too_small"
BLANK_IMAGE = "blank_image"
TOO_DARK = "too_dark"
TOO_BRIGHT = "too_bright"
BLURRY = "blurry"
COPY_PHASH = "copy_phash"
COPY_CLIP = "copy_clip"
SUBJECT_NOT_PRESERVED = "subject_not_preserved"
PROMPT_NOT_FOLLOWED = "prompt_not_followed"

ORDER = (NSFW, TARGET_TOO_SMALL, BLANK_IMAGE, TOO_DARK, TOO_BRIGHT, BLURRY, COPY_PHASH, COPY_CLIP,
         SUBJECT_NOT_PRESERVED, PROMPT_NOT_FOLLOWED)
"""Every criterion, in the order that decides which reason a candidate failing several is counted under."""

REASONS = tuple(Reason(code) for code in ORDER)

ABSOLUTE = ORDER[:8]
"""Criteria whose bounds never depend on the run (not calibrated)."""

KEPT = "kept"
DECISIONS = "decisions"
"""Tag of the ``(ScoredCandidate, decision, failed)`` output (written to ``scores/``)."""

QUANTILES = 1001
"""Quantile resolution of the calibration: 0.1% of rank."""

SCORE_NAMES = ("subject_sim", "subject_sim_max", "text_sim", "copy_distance", "brightness",
               "contrast", "sharpness", "nsfw_score")
RECORDED_QUANTILES = 21
"""Quantiles of each score written to the manifest: p00, p05, ..., p100."""


@dataclass(frozen=True)
class Bounds:
    """The similarity bounds in force (fixed or calibrated); ``None``: no bound."""

    min_subject_sim: float | None
    min_text_sim: float | None


def fixed_bounds(config: TargetFilterConfig) -> Bounds:
    """The fixed bounds; with ``target_keep_rate``, the floors under the calibrated ones."""
    return Bounds(config.min_subject_sim, config.min_text_sim)


NO_FLOORS = Bounds(None, None)


def passes_floors(subject_sim: float, text_sim: float, floors: Bounds) -> bool:
    return ((floors.min_subject_sim is None or subject_sim >= floors.min_subject_sim)
            and (floors.min_text_sim is None or text_sim >= floors.min_text_sim))


# --- decisions -------------------------------------------------------------------------------------------


def failures(scored: ScoredCandidate, config: TargetFilterConfig, bounds: Bounds | None) -> list[tuple[str, str]]:
    """Every criterion ``scored`` fails, as ``(reason, detail)`` in :data:`ORDER`; empty when it is kept.
    ``bounds=None`` checks the absolute criteria only."""
    s, c = scored.scores, scored.candidate
    out: list[tuple[str, str]] = []
    if config.drop_nsfw and c.nsfw:
        out.append((NSFW, "flagged as NSFW (the base model's safety checker, or the NSFW detector of "
                          "transforms.safety.FlagNsfwTargets)"))
    if min(c.width, c.height) < config.min_side:
        out.append((TARGET_TOO_SMALL, f"{c.width}x{c.height} < min_side {config.min_side}"))
    if config.min_contrast is not None and s.contrast < config.min_contrast:
        out.append((BLANK_IMAGE, f"contrast {s.contrast:.4f} < min_contrast {config.min_contrast}"))
    if config.min_brightness is not None and s.brightness < config.min_brightness:
        out.append((TOO_DARK, f"brightness {s.brightness:.4f} < min_brightness {config.min_brightness}"))
    if config.max_brightness is not None and s.brightness > config.max_brightness:
        out.append((TOO_BRIGHT, f"brightness {s.brightness:.4f} > max_brightness {config.max_brightness}"))
    if config.min_sharpness is not None and s.sharpness < config.min_sharpness:
        out.append((BLURRY, f"sharpness {s.sharpness:.1f} < min_sharpness {config.min_sharpness}"))
    if config.max_copy_distance is not None and s.copy_distance <= config.max_copy_distance:
        out.append((COPY_PHASH, f"perceptual-hash distance {s.copy_distance} to a real image <= "
                                f"max_copy_distance {config.max_copy_distance}"))
    if config.max_copy_sim is not None and s.subject_sim_max >= config.max_copy_sim:
        out.append((COPY_CLIP, f"CLIP similarity {s.subject_sim_max:.4f} to real image {scored.source_image_id} "
                               f">= max_copy_sim {config.max_copy_sim}"))
    if bounds is not None:
        if bounds.min_subject_sim is not None and s.subject_sim < bounds.min_subject_sim:
            out.append((SUBJECT_NOT_PRESERVED, f"subject_sim {s.subject_sim:.4f} < "
                                               f"{bounds.min_subject_sim:.4f}"))
        if bounds.min_text_sim is not None and s.text_sim < bounds.min_text_sim:
            out.append((PROMPT_NOT_FOLLOWED, f"text_sim {s.text_sim:.4f} < {bounds.min_text_sim:.4f}"))
    return out


def reject_detail(failed: Sequence[tuple[str, str]]) -> str:
    first = failed[0][1]
    if len(failed) == 1:
        return first
    return f"{first}; also fails: " + "; ".join(f"{reason} ({detail})" for reason, detail in failed[1:])


# --- calibration -----------------------------------------------------------------------------------------


def level_of(subject_sim: float, text_sim: float, q_subject: Sequence[float], q_text: Sequence[float]) -> int:
    """The quantile level of a candidate: the lower of its two score ranks in the quantile tables (index of the
    largest quantile it reaches). ``level >= i`` exactly when ``subject_sim >= q_subject[i]`` and
    ``text_sim >= q_text[i]``."""
    return min(bisect.bisect_right(q_subject, subject_sim), bisect.bisect_right(q_text, text_sim)) - 1


class LevelHistogram(beam.CombineFn):
    """Levels -> a list of counts per level (``QUANTILES`` bins): the exact count of candidates at each level."""

    def __init__(self, size: int = QUANTILES) -> None:
        self._size = size

    def create_accumulator(self) -> list[int]:
        return [0] * self._size

    def add_input(self, accumulator: list[int], level: int) -> list[int]:
        accumulator[max(0, min(self._size - 1, level))] += 1
        return accumulator

    def merge_accumulators(self, accumulators: Any) -> list[int]:
        merged = [0] * self._size
        for accumulator in accumulators:
            for i, n in enumerate(accumulator):
                merged[i] += n
        return merged

    def extract_output(self, accumulator: list[int]) -> list[int]:
        return accumulator


def requested_count(keep_rate: float, n_scored: int) -> int:
    """``round(keep_rate x n_scored)``, at least one when anything was scored."""
    return min(n_scored, max(1, round(keep_rate * n_scored))) if n_scored else 0


def calibrate(histogram: Sequence[int], q_subject: Sequence[float], q_text: Sequence[float], n_scored: int,
              keep_rate: float, floors: Bounds = NO_FLOORS, below_floors: int = 0) -> dict[str, Any]:
    """The similarity bounds that keep at most about ``requested_count(keep_rate, n_scored)`` candidates, never
    under their ``floors``.

    ``q_subject``, ``q_text``: quantiles of the scores of the candidates passing the absolute criteria (1-8).
    ``histogram[i]``: those of them that also pass both floors whose :func:`level_of` is ``i``; ``below_floors``:
    those that fail a floor. The level kept is the one whose count of floor-passing candidates at or above it is
    nearest the request (the larger count on a tie); each bound is the larger of its quantile at that level and its
    floor, so a candidate passes both bounds exactly when it passes the floors and its level reaches the chosen one:
    ``expected_kept`` is exact.
    """
    passing = int(sum(histogram))
    eligible = passing + below_floors
    requested = requested_count(keep_rate, n_scored)
    out: dict[str, Any] = {"requested": requested, "eligible": eligible, "below_floors": below_floors,
                           "limited_by_absolute_checks": requested > 0 and eligible <= requested,
                           "limited_by_floors": below_floors > 0 and passing < requested}
    if not eligible or not q_subject or not q_text:
        return {**out, "level": None, "expected_kept": 0, "short_of_request": requested,
                "floors": floor_report(floors, None, None), "floor_bound": False,
                "min_subject_sim": floors.min_subject_sim, "min_text_sim": floors.min_text_sim}
    at_or_above, running = [0] * len(histogram), 0
    for i in range(len(histogram) - 1, -1, -1):
        running += histogram[i]
        at_or_above[i] = running
    level = min(range(len(histogram)), key=lambda i: (abs(at_or_above[i] - requested), -at_or_above[i], i))
    report = floor_report(floors, float(q_subject[level]), float(q_text[level]))
    kept = at_or_above[level]
    return {**out, "level": level, "expected_kept": kept, "short_of_request": max(0, requested - kept),
            "floors": report,
            "floor_bound": out["limited_by_floors"] or any(bound["floor_bound"] for bound in report.values()),
            "min_subject_sim": report["min_subject_sim"]["bound"], "min_text_sim": report["min_text_sim"]["bound"]}


def floor_report(floors: Bounds, subject: float | None, text: float | None) -> dict[str, dict[str, Any]]:
    """Per similarity bound: its calibrated quantile, its floor, the bound in force (the larger) and whether the
    floor was the bound."""
    report = {}
    for name, calibrated in (("min_subject_sim", subject), ("min_text_sim", text)):
        floor = getattr(floors, name)
        bound = calibrated if floor is None else floor if calibrated is None else max(calibrated, floor)
        report[name] = {"calibrated": calibrated, "floor": floor, "bound": bound,
                        "floor_bound": floor is not None and calibrated is not None and floor > calibrated}
    return report


def bounds_from(calibration: dict[str, Any]) -> Bounds:
    return Bounds(calibration.get("min_subject_sim"), calibration.get("min_text_sim"))


def _percentiles(quantiles: Sequence[float]) -> dict[str, float]:
    if not quantiles:
        return {}
    last = len(quantiles) - 1
    return {f"p{round(100 * i / last):02d}": round(float(q), 6) for i, q in enumerate(quantiles)}


def filter_stats(calibration: dict[str, Any], score_quantiles: list[tuple[str, list[float]]], n_scored: int,
                 config: TargetFilterConfig) -> dict[str, Any]:
    """The ``stats.assemble.target_filter`` block of the manifest: mode, bounds used, calibration, quantiles."""
    bounds = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name not in ("target_keep_rate", "min_subject_sim", "min_text_sim")}
    bounds["min_subject_sim"] = calibration.get("min_subject_sim")
    bounds["min_text_sim"] = calibration.get("min_text_sim")
    return {
        "mode": "target_keep_rate" if config.target_keep_rate is not None else "fixed",
        "target_keep_rate": config.target_keep_rate,
        "candidates_scored": n_scored,
        "calibration": {k: v for k, v in calibration.items() if k not in ("min_subject_sim", "min_text_sim")},
        "bounds": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in bounds.items()},
        "order": list(ORDER),
        "score_quantiles": {name: _percentiles(values) for name, values in sorted(score_quantiles)},
    }


# --- the DoFns ---------------------------------------------------------------------------------------------


def eligible_scores(scored: ScoredCandidate, config: TargetFilterConfig) -> Iterator[tuple[float, float]]:
    """``(subject_sim, text_sim)`` of the candidate when it passes the absolute criteria."""
    if not failures(scored, config, None):
        yield scored.scores.subject_sim, scored.scores.text_sim


def score_values(unit: ScoringUnit) -> Iterator[tuple[str, float]]:
    for scored in unit.candidates:
        for name in SCORE_NAMES:
            value = getattr(scored.scores, name)
            if value is not None:  # nsfw_score: null when the renders were not checked
                yield name, float(value)


def light(scored: ScoredCandidate) -> ScoredCandidate:
    """The candidate with its scores and without its image bytes: what a decision needs, and all a global step
    may carry."""
    return dataclasses.replace(scored, candidate=dataclasses.replace(scored.candidate, image=b""))


def decide_candidate(scored: ScoredCandidate, config: TargetFilterConfig, bounds: Bounds) -> Iterator[Any]:
    """The filter's decision about one scored candidate: its reject (when it fails a criterion) and its
    ``(scored, decision, failed)`` on :data:`DECISIONS`; returns nothing else. Kept candidates are counted."""
    c = scored.candidate
    try:
        failed = failures(scored, config, bounds)
    except Exception as error:  # noqa: BLE001 -- a malformed score must not end the job
        yield internal_error(STAGE, error, id=c.candidate_id, cluster_id=c.cluster_id, page_url=c.page_url)
        yield beam.pvalue.TaggedOutput(DECISIONS, (light(scored), INTERNAL_ERROR, [INTERNAL_ERROR]))
        return
    reasons = [reason for reason, _ in failed]
    if failed:
        yield reject(STAGE, reasons[0], reject_detail(failed), id=c.candidate_id, cluster_id=c.cluster_id,
                     page_url=c.page_url)
    else:
        count(STAGE, KEPT)
    yield beam.pvalue.TaggedOutput(DECISIONS, (light(scored), reasons[0] if reasons else KEPT, reasons))


class ApplyBoundsFn(beam.DoFn):
    """``ScoringUnit`` -> the unit with its kept candidates (main, when any), a reject per other candidate, and a
    ``(scored, decision, failed)`` per candidate on ``decisions`` (fixed bounds: the filter fuses with scoring)."""

    def __init__(self, config: TargetFilterConfig) -> None:
        self._config = config

    def process(self, unit: ScoringUnit, bounds: Bounds) -> Iterator[Any]:
        kept = []
        for scored in unit.candidates:
            outputs = list(decide_candidate(scored, self._config, bounds))
            yield from outputs
            if not any(o.tag == REJECTS for o in outputs):
                kept.append(scored)
        if kept:
            yield ScoringUnit(unit.cluster, tuple(kept))


class DecideFn(beam.DoFn):
    """``(cluster_id, light scored candidate)`` -> its reject and decision, and ``(cluster_id, candidate_id)`` of
    a kept candidate (main), under the calibrated bounds (a singleton side input)."""

    def __init__(self, config: TargetFilterConfig) -> None:
        self._config = config

    def process(self, element: tuple[str, ScoredCandidate], calibration: dict[str, Any]) -> Iterator[Any]:
        cluster_id, scored = element
        outputs = list(decide_candidate(scored, self._config, bounds_from(calibration)))
        yield from outputs
        if not any(o.tag == REJECTS for o in outputs):
            yield cluster_id, scored.candidate.candidate_id


class KeepDecidedFn(beam.DoFn):
    """``(cluster_id, {"unit": [unit], "kept": [candidate ids]})`` -> the unit with only its kept candidates."""

    def process(self, element: tuple[str, dict[str, Any]]) -> Iterator[ScoringUnit]:
        _, joined = element
        kept_ids = set(joined["kept"])
        if not kept_ids:
            return
        for unit in joined["unit"]:
            kept = tuple(scored for scored in unit.candidates if scored.candidate.candidate_id in kept_ids)
            if kept:
                yield ScoringUnit(unit.cluster, kept)


# --- the stage ----------------------------------------------------------------------------------------------


class TargetFilter(beam.PTransform):
    """Scored ``ScoringUnit``s -> units of the kept candidates; ``extra["scores"]``: every candidate's
    ``(scored, decision, failed)`` (``OUT/scores/``), ``extra["stats"]``: the bounds used, the calibration and the
    score quantiles (``stats.assemble.target_filter`` of the manifest)."""

    def __init__(self, config: TargetFilterConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, units: beam.PCollection) -> StageOutput:
        config = self._config
        calibrated = config.target_keep_rate is not None
        n_scored = (units | "CandidatesPerUnit" >> beam.Map(lambda unit: len(unit.candidates))
                    | "CountScored" >> beam.CombineGlobally(sum))
        quantiles = (units | "ScoreValues" >> beam.FlatMap(score_values)
                     | "ScoreQuantiles" >> beam.ApproximateQuantiles.PerKey(RECORDED_QUANTILES)
                     | "AllScoreQuantiles" >> beam.combiners.ToList())
        if calibrated:
            # A global decision on ids and scores only: the bounds come from the light candidates, each light
            # candidate is decided under them, and the decisions are joined back to the units (their images)
            # by cluster id.
            candidates = units | "LightCandidates" >> beam.FlatMap(
                lambda unit: ((unit.cluster.cluster_id, light(scored)) for scored in unit.candidates))
            pairs = candidates | "EligibleScores" >> beam.FlatMap(lambda element: eligible_scores(element[1], config))
            q_subject = (pairs | "SubjectSims" >> beam.Map(lambda pair: pair[0])
                         | "SubjectQuantiles" >> beam.ApproximateQuantiles.Globally(QUANTILES))
            q_text = (pairs | "TextSims" >> beam.Map(lambda pair: pair[1])
                      | "TextQuantiles" >> beam.ApproximateQuantiles.Globally(QUANTILES))
            floors = fixed_bounds(config)
            below_floors = (pairs | "BelowFloors" >> beam.Filter(lambda pair: not passes_floors(*pair, floors))
                            | "CountBelowFloors" >> beam.combiners.Count.Globally())
            calibration = (
                pairs
                | "PassFloors" >> beam.Filter(lambda pair: passes_floors(*pair, floors))
                | "Levels" >> beam.Map(lambda pair, qs, qt: level_of(pair[0], pair[1], qs, qt),
                                       beam.pvalue.AsSingleton(q_subject), beam.pvalue.AsSingleton(q_text))
                | "LevelHistogram" >> beam.CombineGlobally(LevelHistogram())
                | "Calibrate" >> beam.Map(calibrate, beam.pvalue.AsSingleton(q_subject),
                                          beam.pvalue.AsSingleton(q_text), beam.pvalue.AsSingleton(n_scored),
                                          config.target_keep_rate, floors, beam.pvalue.AsSingleton(below_floors))
            )
            decided = candidates | "Decide" >> beam.ParDo(
                DecideFn(config), beam.pvalue.AsSingleton(calibration)).with_outputs(REJECTS, DECISIONS, main="kept")
            keyed = units | "KeyByCluster" >> beam.Map(lambda unit: (unit.cluster.cluster_id, unit))
            kept = (
                {"unit": keyed, "kept": decided.kept}
                | "JoinDecisions" >> beam.CoGroupByKey()
                | "ApplyBounds" >> beam.ParDo(KeepDecidedFn())
            )
            stats = calibration | "DescribeFilter" >> beam.Map(
                lambda cal, q, n: filter_stats(cal, q, n, config), beam.pvalue.AsSingleton(quantiles),
                beam.pvalue.AsSingleton(n_scored))
        else:
            # Fixed bounds are plain arguments: thresholding fuses with scoring, no barrier.
            fixed = fixed_bounds(config)
            decided = units | "ApplyBounds" >> beam.ParDo(ApplyBoundsFn(config), fixed).with_outputs(
                REJECTS, DECISIONS, main="kept")
            kept = decided.kept
            described = {"min_subject_sim": fixed.min_subject_sim, "min_text_sim": fixed.min_text_sim}
            stats = n_scored | "DescribeFilter" >> beam.Map(
                lambda n, q: filter_stats(described, q, n, config), beam.pvalue.AsSingleton(quantiles))
        return StageOutput(kept, decided[REJECTS], {"scores": decided[DECISIONS], "stats": stats})
