"""The target filter on hand-made scores: each criterion, their order, calibration, the stage in Beam."""

from __future__ import annotations

import collections
import json
import random

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import ConfigError, build_config
from pipeline.console import target_filter_note
from schemas.parquet import check_schema_version
from tests.clip_helpers import orthonormal, vector_cluster
from tests.clusters import beam_counters
from tests.phase3_helpers import scored, units_of
from transforms.outputs import write_stage_extras
from transforms.settings import OutputConfig
from transforms.target_filter import (
    ABSOLUTE,
    ORDER,
    Bounds,
    TargetFilter,
    TargetFilterConfig,
    calibrate,
    failures,
    fixed_bounds,
    level_of,
    passes_floors,
    reject_detail,
    requested_count,
)

FIXED = TargetFilterConfig(target_keep_rate=None)
BOUNDS = fixed_bounds(FIXED)

# One change per criterion that fails it and nothing else (PASSING passes every default bound).
FAILING = {
    "nsfw": {"nsfw": True},
    "target_too_small": {"size": 200},
    "blank_image": {"contrast": 0.01},
    "too_dark": {"brightness": 0.02},
    "too_bright": {"brightness": 0.99},
    "blurry": {"sharpness": 10.0},
    "copy_phash": {"copy_distance": 4},
    "copy_clip": {"subject_sim_max": 0.97},
    "subject_not_preserved": {"subject_sim": 0.5},
    "prompt_not_followed": {"text_sim": 0.1},
}


def test_a_passing_candidate_is_kept() -> None:
    assert failures(scored(), FIXED, BOUNDS) == []


@pytest.mark.parametrize("reason", ORDER)
def test_each_criterion_is_its_own_reason(reason: str) -> None:
    failed = failures(scored(**FAILING[reason]), FIXED, BOUNDS)
    assert [r for r, _ in failed] == [reason]
    assert failed[0][1]  # a detail naming the value and the bound


def test_a_candidate_failing_several_is_counted_under_the_first_in_the_documented_order() -> None:
    everything = {k: v for change in FAILING.values() for k, v in change.items() if k != "brightness"}
    failed = failures(scored(brightness=0.01, **everything), FIXED, BOUNDS)
    assert [r for r, _ in failed] == [r for r in ORDER if r != "too_bright"]  # dark and bright exclude each other
    two = failures(scored(sharpness=5.0, text_sim=0.0, copy_distance=0), FIXED, BOUNDS)
    assert [r for r, _ in two] == ["blurry", "copy_phash", "prompt_not_followed"]
    detail = reject_detail(two)
    assert detail.startswith("sharpness 5.0 < min_sharpness 25.0; also fails: copy_phash")
    assert "prompt_not_followed (text_sim 0.0000 < 0.2500)" in detail


def test_bounds_at_null_are_not_checked() -> None:
    off = TargetFilterConfig(target_keep_rate=None, max_copy_sim=None, max_copy_distance=None, min_contrast=None,
                             min_brightness=None, max_brightness=None, min_sharpness=None, drop_nsfw=False)
    worst = scored(nsfw=True, contrast=0.0, brightness=0.0, sharpness=0.0, copy_distance=0,
                   subject_sim_max=1.0)
    assert failures(worst, off, fixed_bounds(off)) == []
    assert failures(scored(subject_sim=-1.0, text_sim=-1.0), off, Bounds(None, None)) == []
    assert [r for r, _ in failures(scored(contrast=0.0), FIXED, None)] == ["blank_image"]  # absolute ones only


def test_the_absolute_criteria_come_first() -> None:
    assert ORDER[:len(ABSOLUTE)] == ABSOLUTE and set(ORDER) - set(ABSOLUTE) == {"subject_not_preserved",
                                                                               "prompt_not_followed"}


# --- calibration -----------------------------------------------------------------------------------------

def _exact_quantiles(values: list[float], m: int = 1001) -> list[float]:
    """What Beam's ApproximateQuantiles returns while the values fit its buffers: quantile i at rank
    round(i (n - 1) / (m - 1))."""
    ordered = sorted(values)
    n = len(ordered)
    return [ordered[round(i * (n - 1) / (m - 1))] for i in range(m)] if ordered else []


def no_floors(keep_rate: float) -> TargetFilterConfig:
    """Calibration alone: no floor under the calibrated bounds."""
    return TargetFilterConfig(target_keep_rate=keep_rate, min_subject_sim=None, min_text_sim=None)


def _calibrated_kept(candidates: list, keep_rate: float,
                     config: TargetFilterConfig | None = None) -> tuple[int, int, dict]:
    """What the stage decides, with exact quantiles: (kept, requested, calibration)."""
    config = config or no_floors(keep_rate)
    floors = fixed_bounds(config)
    eligible = [c for c in candidates if not failures(c, config, None)]
    q_subject = _exact_quantiles([c.scores.subject_sim for c in eligible])
    q_text = _exact_quantiles([c.scores.text_sim for c in eligible])
    histogram, below = [0] * 1001, 0
    for c in eligible:
        if passes_floors(c.scores.subject_sim, c.scores.text_sim, floors):
            histogram[level_of(c.scores.subject_sim, c.scores.text_sim, q_subject, q_text)] += 1
        else:
            below += 1
    calibration = calibrate(histogram, q_subject, q_text, len(candidates), keep_rate, floors, below)
    bounds = Bounds(calibration["min_subject_sim"], calibration["min_text_sim"])
    kept = sum(1 for c in candidates if not failures(c, config, bounds))
    return kept, requested_count(keep_rate, len(candidates)), calibration


@pytest.mark.parametrize("n", [1, 7, 40, 75, 333, 1000])
@pytest.mark.parametrize("keep_rate", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("correlation", [0.0, 0.8, -0.5])
def test_calibration_keeps_the_requested_count_within_one(n: int, keep_rate: float, correlation: float) -> None:
    rng = random.Random(n * 31 + int(keep_rate * 100))
    candidates = []
    for i in range(n):
        a = rng.gauss(0, 1)
        b = correlation * a + (1 - correlation ** 2) ** 0.5 * rng.gauss(0, 1)
        candidates.append(scored(subject_sim=0.7 + 0.05 * a, text_sim=0.25 + 0.03 * b, tag=str(i)))
    kept, requested, calibration = _calibrated_kept(candidates, keep_rate)
    assert abs(kept - requested) <= 1, (kept, requested, calibration)
    assert kept == calibration["expected_kept"]  # the bounds keep exactly what the calibration counted


def test_calibration_cannot_keep_what_the_absolute_criteria_dropped() -> None:
    candidates = [scored(tag=str(i), subject_sim=0.5 + i / 100, sharpness=5.0 if i % 10 else 300.0)
                  for i in range(100)]  # 90 blurry
    kept, requested, calibration = _calibrated_kept(candidates, 0.25)
    assert (kept, requested) == (10, 25)
    assert calibration["limited_by_absolute_checks"] and calibration["eligible"] == 10
    sharp = [c.scores.subject_sim for c in candidates if c.scores.sharpness > 25]
    assert calibration["min_subject_sim"] == min(sharp)


def test_calibration_of_nothing() -> None:
    assert calibrate([0] * 1001, [], [], 0, 0.25)["expected_kept"] == 0
    nothing_eligible = calibrate([0] * 1001, [], [], 12, 0.25)
    assert nothing_eligible["min_subject_sim"] is None and nothing_eligible["requested"] == 3


# --- the stage in Beam -----------------------------------------------------------------------------------

def _hand_made_units() -> tuple[list, list]:
    """Two clusters of candidates: 12 that only differ in their similarity scores, and one failing each absolute
    criterion."""
    cluster_a = vector_cluster("https://shop.example.com/a", orthonormal(3))
    cluster_b = vector_cluster("https://shop.example.com/b", orthonormal(3, seed=1))
    similar = [scored(tag=f"s{i}", cluster_id=cluster_a.cluster_id, subject_sim=0.605 + 0.02 * i,
                      text_sim=0.355 - 0.01 * ((i * 5) % 12)) for i in range(12)]
    broken = [scored(tag=f"b{reason}", cluster_id=cluster_b.cluster_id, **FAILING[reason]) for reason in ABSOLUTE]
    return [units_of(similar, cluster_a), units_of(broken, cluster_b)], similar + broken


def test_stage_calibrates_rejects_and_records_its_numbers(tmp_path) -> None:
    units, candidates = _hand_made_units()
    config = no_floors(0.25)
    p = TestPipeline()
    filtered = p | beam.Create(units) | TargetFilter(config)
    write_stage_extras(filtered, "TargetFilter", str(tmp_path), "assemble", "target_filter", OutputConfig())
    kept, rejects = filtered
    # What the pure functions decide (exact quantiles), which the stage must reproduce with Beam's.
    n_kept, requested, calibration = _calibrated_kept(candidates, 0.25)
    bounds = Bounds(calibration["min_subject_sim"], calibration["min_text_sim"])
    expected = [failures(c, config, bounds) for c in candidates]
    assert requested == 5 and abs(n_kept - requested) <= 1
    kept_ids = kept | "KeptIds" >> beam.FlatMap(lambda unit: [c.candidate.candidate_id for c in unit.candidates])
    decided = list(zip(candidates, expected, strict=True))
    assert_that(kept_ids, equal_to([c.candidate.candidate_id for c, f in decided if not f]), label="Kept")
    reasons = rejects | "Reasons" >> beam.Map(lambda r: (r.id, r.reason, r.stage))
    assert_that(reasons, equal_to([(c.candidate.candidate_id, f[0][0], "target_filter")
                                   for c, f in decided if f]), label="Reasons")
    result = p.run()
    result.wait_until_finish()

    stage = beam_counters(result, "target_filter")
    first = collections.Counter(f[0][0] for f in expected if f)
    assert stage["kept"] == n_kept and stage["blurry"] == 1
    assert {r: stage[r] for r in first} == dict(first) and set(first) >= set(ABSOLUTE)
    assert first["subject_not_preserved"] + first["prompt_not_followed"] == 12 - n_kept
    stats = json.loads((tmp_path / "stats" / "assemble.target_filter.json").read_text())
    assert stats["mode"] == "target_keep_rate" and stats["candidates_scored"] == 20
    assert stats["calibration"]["eligible"] == 12 and stats["calibration"]["expected_kept"] == n_kept
    assert stats["bounds"]["min_subject_sim"] == pytest.approx(calibration["min_subject_sim"])
    assert stats["bounds"]["min_text_sim"] == pytest.approx(calibration["min_text_sim"])
    assert stats["bounds"]["max_copy_distance"] == 10 and stats["order"] == list(ORDER)
    assert set(stats["score_quantiles"]) >= {"subject_sim", "text_sim", "copy_distance", "sharpness"}
    assert stats["score_quantiles"]["subject_sim"]["p100"] == pytest.approx(0.825, abs=1e-6)

    table = pq.read_table(tmp_path / "scores")
    check_schema_version(table.schema, "target_scores")
    decisions = collections.Counter(table.column("decision").to_pylist())
    assert decisions["kept"] == n_kept and sum(decisions.values()) == 20
    by_id = {row["candidate_id"]: row for row in table.to_pylist()}
    copy = next(c for c in candidates if c.scores.copy_distance == 4)
    assert by_id[copy.candidate.candidate_id]["failed"] == ["copy_phash"]


# --- floors under the calibrated bounds ---------------------------------------------------------------------


def test_floors_under_calibrated_bounds_keep_only_what_passes_them() -> None:
    """Keep at most 25%, and only what passes the floors: 20 of 100 renders reach min_subject_sim 0.7, so 20 are kept
    (not 25), the subject bound is its floor, and the calibration says so."""
    candidates = [scored(tag=str(i), subject_sim=0.5 + 0.25 * i / 99, text_sim=0.3 + 0.001 * (i % 7))
                  for i in range(100)]
    kept, requested, calibration = _calibrated_kept(candidates, 0.25, TargetFilterConfig(target_keep_rate=0.25))
    passing = sum(1 for c in candidates if c.scores.subject_sim >= 0.7)
    assert (kept, requested, passing) == (20, 25, 20)
    assert calibration["expected_kept"] == 20 and calibration["short_of_request"] == 5
    assert calibration["limited_by_floors"] and calibration["floor_bound"] and calibration["below_floors"] == 80
    subject, text = calibration["floors"]["min_subject_sim"], calibration["floors"]["min_text_sim"]
    assert subject["floor_bound"] and subject["bound"] == 0.7 and subject["calibrated"] < 0.7
    assert not text["floor_bound"] and text["bound"] == text["calibrated"] >= 0.3
    # Without floors the same run keeps its quarter, under 0.7.
    assert _calibrated_kept(candidates, 0.25)[0] == 25
    # Floors under every score change nothing.
    low = TargetFilterConfig(target_keep_rate=0.25, min_subject_sim=0.1, min_text_sim=0.1)
    _, _, unbound = _calibrated_kept(candidates, 0.25, low)
    assert not unbound["floor_bound"] and unbound["expected_kept"] == 25 and unbound["short_of_request"] == 0


def _poor_units() -> tuple[list, list]:
    """Two clusters whose every render is poor: subject similarity 0.3-0.6, text similarity 0.05-0.2 (the floors are
    0.7 and 0.25)."""
    units, candidates = [], []
    for k in range(2):
        cluster = vector_cluster(f"https://shop.example.com/poor-{k}", orthonormal(3, seed=k))
        renders = [scored(tag=f"p{k}-{i}", cluster_id=cluster.cluster_id, subject_sim=0.3 + 0.05 * i,
                          text_sim=0.05 + 0.025 * ((i * 3) % 7)) for i in range(7)]
        units.append(units_of(renders, cluster))
        candidates += renders
    return units, candidates


def test_stage_keeps_nothing_above_the_floors_when_every_render_is_poor(tmp_path) -> None:
    units, candidates = _poor_units()
    config = TargetFilterConfig(target_keep_rate=0.25)
    p = TestPipeline()
    filtered = p | beam.Create(units) | TargetFilter(config)
    write_stage_extras(filtered, "TargetFilter", str(tmp_path), "assemble", "target_filter", OutputConfig())
    kept, rejects = filtered
    assert_that(kept, equal_to([]), label="NothingKept")
    assert_that(rejects | beam.Map(lambda r: r.reason), equal_to(["subject_not_preserved"] * 14), label="Reasons")
    result = p.run()
    result.wait_until_finish()
    assert beam_counters(result, "target_filter").get("kept", 0) == 0
    stats = json.loads((tmp_path / "stats" / "assemble.target_filter.json").read_text())
    calibration = stats["calibration"]
    assert calibration["requested"] == 4 and calibration["expected_kept"] == 0
    assert calibration["short_of_request"] == 4 and calibration["eligible"] == calibration["below_floors"] == 14
    assert calibration["floor_bound"] and calibration["limited_by_floors"]
    assert all(bound["floor_bound"] for bound in calibration["floors"].values())
    assert (stats["bounds"]["min_subject_sim"], stats["bounds"]["min_text_sim"]) == (0.7, 0.25)
    # The pure functions agree; and without the floors a quarter would have been kept anyway.
    assert _calibrated_kept(candidates, 0.25, config)[0] == 0 and _calibrated_kept(candidates, 0.25)[0] == 4
    # The words the console, the card and the report use.
    note = target_filter_note(stats)
    assert "the floor target_filter.min_subject_sim 0.7 bound it" in note
    assert "0 kept of the 4 requested, 4 short (limited by the floors)" in note


@pytest.mark.parametrize("write", [False, True])
def test_stage_with_fixed_bounds(tmp_path, write: bool) -> None:
    units, candidates = _hand_made_units()
    p = TestPipeline()
    filtered = p | beam.Create(units) | TargetFilter(FIXED)
    if write:
        write_stage_extras(filtered, "TargetFilter", str(tmp_path), "assemble", "target_filter", OutputConfig())
    kept, rejects = filtered
    expected = [c.candidate.candidate_id for c in candidates if not failures(c, FIXED, BOUNDS)]
    assert_that(kept | beam.FlatMap(lambda u: [c.candidate.candidate_id for c in u.candidates]), equal_to(expected))
    p.run().wait_until_finish()
    assert len(expected) == 6  # subject_sim >= 0.7 (i >= 5) and text_sim >= 0.25 (all but i = 7)
    if write:
        stats = json.loads((tmp_path / "stats" / "assemble.target_filter.json").read_text())
        assert stats["mode"] == "fixed" and stats["bounds"]["min_subject_sim"] == 0.7
        assert stats["candidates_scored"] == 20 and pq.read_table(tmp_path / "scores").num_rows == 20
    else:
        assert not (tmp_path / "stats").exists()


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="target_keep_rate must be within"):
        build_config("demo", overrides=["target_filter.target_keep_rate=0"])
    with pytest.raises(ConfigError, match="min_brightness .* must be under max_brightness"):
        build_config("demo", overrides=["target_filter.min_brightness=0.9", "target_filter.max_brightness=0.5"])
    with pytest.raises(ConfigError, match="max_copy_distance must be within 0..64"):
        build_config("demo", overrides=["target_filter.max_copy_distance=65"])
    assert build_config("local").target_filter.target_keep_rate == 0.25
