"""Stage *safety*: people policy and NSFW check with the real detector on real photos; the NSFW decision on
recorded real detector outputs (the repository holds no explicit material)."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from schemas.parquet import cluster_from_row, cluster_to_row
from tests.clip_helpers import image_record, make_cluster
from tests.clusters import CreateFromFile, beam_counters, load, save_to
from transforms.models.detectors import Detections, Face, load_detector
from transforms.safety import Safety, apply_policy, image_verdict, is_person_cluster, nsfw_verdict
from transforms.settings import DetectorConfig, NormalizeConfig, NsfwConfig, PeopleConfig

DATA = Path(__file__).parent / "data"
RECORDED = json.loads((DATA / "detector_outputs.json").read_text())
NSFW_CLASSES = ("FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "BUTTOCKS_EXPOSED",
                "ANUS_EXPOSED")


def recorded(entry: dict) -> Detections:
    return Detections(entry["width"], entry["height"], tuple(Face(**f) for f in entry["faces"]), entry["class_scores"])


def entry(source_end: str) -> dict:
    return next(e for e in RECORDED["entries"] if e["source"].endswith(source_end))


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def photo(name: str) -> Image.Image:
    return Image.open(DATA / "photos" / name).convert("RGB")


# --- config -----------------------------------------------------------------------------------------------


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="policy"):
        PeopleConfig(policy="blur")
    with pytest.raises(ValueError, match="prominent_face_share"):
        PeopleConfig(prominent_face_share=0)
    with pytest.raises(ValueError, match="buttocks_exposed"):
        NsfwConfig(buttocks_exposed=1.5)
    assert NsfwConfig(anus_exposed=None).thresholds() == {c: 0.7 for c in NSFW_CLASSES if c != "ANUS_EXPOSED"}


# --- decisions on recorded real outputs ----------------------------------------------------------------------


@pytest.mark.slow
def test_recorded_outputs_are_current(sample_rows) -> None:
    """The recording is what the detector says today (same model, same settings)."""
    detector = load_detector(DetectorConfig(**RECORDED["config"]))
    assert detector.model_id == RECORDED["detector"]
    by_url = {r["image_url"]: r["image"] for r in sample_rows}
    for item in RECORDED["entries"]:
        source = item["source"]
        data = ((DATA / "photos" / source.split("/")[-1]).read_bytes() if source.startswith("tests/")
                else by_url[source.split("image_url=")[1]])
        found = detector.detect([np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))])[0]
        assert [(f.label, f.confirmed) for f in found.faces] == [(f["label"], f["confirmed"]) for f in item["faces"]]
        for label, score in item["class_scores"].items():
            assert found.class_scores[label] == pytest.approx(score, abs=0.02), (source, label)


def test_bundled_photos_pass_the_default_nsfw_thresholds() -> None:
    """The highest NSFW-class scores the detector gives the sample (benign false alarms on dogs, toys, a teapot)
    and the scikit-image photos stay under the defaults."""
    config = NsfwConfig()
    for item in RECORDED["entries"]:
        score, label = nsfw_verdict(item["class_scores"], config)
        assert label is None and 0.0 <= score < 0.7, item["source"]
    top = max(max(e["class_scores"][c] for c in NSFW_CLASSES) for e in RECORDED["entries"])
    assert top > 0.3  # the recording does hold the strongest false alarms


@pytest.mark.parametrize("item", RECORDED["entries"], ids=lambda e: e["source"].split("/")[-1])
def test_nsfw_decision_follows_each_class_threshold(item: dict) -> None:
    scores = item["class_scores"]
    top_label = max(NSFW_CLASSES, key=lambda c: scores[c])
    top = scores[top_label]
    # A threshold at the class's score flags it, under the score too; just over it does not.
    at = NsfwConfig(**{top_label.lower(): top}) if top > 0 else None
    if at is not None:
        assert nsfw_verdict(scores, at) == (top, top_label)
        over = NsfwConfig(**{top_label.lower(): min(1.0, top + 0.001)})
        assert nsfw_verdict(scores, over)[1] is None
        # Ignoring the class (null) leaves only the others, switched off nothing is flagged.
        assert nsfw_verdict(scores, NsfwConfig(**{c.lower(): (None if c == top_label else 0.001) for c in
                                                  NSFW_CLASSES}))[1] != top_label
        assert nsfw_verdict(scores, NsfwConfig(enabled=False, **{top_label.lower(): top})) == (0.0, None)


def test_people_decisions_on_recorded_outputs() -> None:
    people = PeopleConfig()
    astronaut = image_verdict(recorded(entry("astronaut.jpg")), people, NsfwConfig())
    camera = image_verdict(recorded(entry("camera.jpg")), people, NsfwConfig())
    dog = image_verdict(recorded(entry("dog-01.jpg")), people, NsfwConfig())
    coffee = image_verdict(recorded(entry("coffee.jpg")), people, NsfwConfig())
    assert len(astronaut.faces) == len(camera.faces) == 1
    assert astronaut.face_share > 0.03 and 0.015 < camera.face_share < 0.03
    assert dog.faces == () and dog.face_share == 0.0  # NudeNet saw a face, the cascades did not confirm it
    assert coffee.faces == ()
    assert is_person_cluster([astronaut, camera, coffee], people)  # 2 of 3
    assert is_person_cluster([astronaut, coffee], people)  # 1 of 2: "at least half"
    assert not is_person_cluster([astronaut, coffee, dog], people)
    assert not is_person_cluster([astronaut, camera, coffee], PeopleConfig(prominent_face_share=0.05))
    strict = PeopleConfig(min_face_score=0.7)  # camera's face scores 0.67
    assert not is_person_cluster([image_verdict(recorded(entry("camera.jpg")), strict, NsfwConfig()), coffee], strict)


def test_policy_on_a_cluster_with_recorded_outputs(product_photos) -> None:
    page = "https://shop.example.com/people/portraits"
    images = [image_record(jpeg(photo(n)), page, i) for i, n in enumerate(("astronaut.jpg", "camera.jpg",
                                                                         "coffee.jpg"))]
    cluster = make_cluster(page, images)
    names = ("astronaut.jpg", "camera.jpg", "coffee.jpg")
    by_id = {im.image_id: recorded(entry(n)) for im, n in zip(images, names, strict=True)}
    detections = [by_id[im.image_id] for im in cluster.images]
    outcome = apply_policy(cluster, detections, PeopleConfig(), NsfwConfig(), NormalizeConfig(), 3)
    assert outcome.cluster is None and outcome.cluster_reject[1] == "person_subject"
    assert "2 of its 3 images" in outcome.cluster_reject[2]
    # Kept with policy keep: the portraits' faces are its subject and stay sharp.
    kept = apply_policy(cluster, detections, PeopleConfig(policy="keep"), NsfwConfig(), NormalizeConfig(), 3)
    assert kept.cluster is not None and kept.blurred == 0 and kept.person_cluster
    assert kept.cluster.cluster_id == cluster.cluster_id
    assert sorted(im.face_count for im in kept.cluster.images) == [0, 1, 1]
    # The coffee photo's strongest NSFW class over a lowered threshold: it leaves, and the cluster is too small.
    low = NsfwConfig(buttocks_exposed=0.15)
    outcome = apply_policy(cluster, detections, PeopleConfig(policy="keep"), low, NormalizeConfig(), 3)
    assert [(im.image_url, reason) for im, reason, _ in outcome.image_rejects] == [(images[2].image_url, "nsfw_input")]
    assert outcome.cluster_reject[1] == "cluster_too_small" and len(outcome.cluster_reject[0].images) == 2


# --- the stage with the real detector --------------------------------------------------------------------------


def pasted_face(product: bytes, side: int = 160) -> bytes:
    """A product photo with the astronaut's portrait pasted small in a corner (a face of ~32 px in 512)."""
    scene = Image.open(io.BytesIO(product)).convert("RGB").resize((512, 512))
    scene.paste(photo("astronaut.jpg").resize((side, side)), (512 - side - 12, 12))
    return jpeg(scene)


@pytest.fixture(scope="module")
def pages(product_photos) -> dict:
    astronaut, camera = photo("astronaut.jpg"), photo("camera.jpg")
    crop = astronaut.crop((60, 20, 452, 412)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    portraits = "https://people.example.com/eileen"
    incidental = "https://shop.example.com/products/teapot-with-customer"
    plain = "https://shop.example.com/products/plain"
    return {
        "portraits": make_cluster(portraits, [image_record(jpeg(p), portraits, i) for i, p in
                                              enumerate((astronaut, camera, crop))] +
                                  [image_record(product_photos[3], portraits, 3)]),
        "incidental": make_cluster(incidental, [image_record(pasted_face(product_photos[0]), incidental, 0)] +
                                   [image_record(p, incidental, i) for i, p in enumerate(product_photos[1:3], 1)]),
        "plain": make_cluster(plain, [image_record(p, plain, i) for i, p in enumerate(product_photos[4:7])]),
    }


def run_stage(pages: dict, people: PeopleConfig, tmp_path: Path, nsfw: NsfwConfig = NsfwConfig()):
    with TestPipeline() as p:
        kept, rejects = p | beam.Create(list(pages.values())) | Safety(DetectorConfig(batch_size=4), people, nsfw,
                                                                        NormalizeConfig(), 3)
        assert_that(kept | beam.Map(lambda c: c.page_url), equal_to(
            [c.page_url for k, c in pages.items() if k != "portraits" or people.policy == "keep"]), label="KeptPages")
        assert_that(rejects | beam.Map(lambda r: (r.page_url, r.reason, r.n_images)), equal_to(
            [] if people.policy == "keep" else [(pages["portraits"].page_url, "person_subject", 4)]), label="Rejects")
        assert_that(kept, save_to(tmp_path / "kept.pickle", key=lambda c: c.cluster_id), label="SaveKept")
    return p.result, load(tmp_path / "kept.pickle")


@pytest.mark.slow
def test_stage_drops_portraits_blurs_incidental_faces_keeps_products(pages: dict, tmp_path: Path) -> None:
    result, kept = run_stage(pages, PeopleConfig(), tmp_path)
    by_page = {c.page_url: c for c in kept}
    plain = by_page[pages["plain"].page_url]
    assert plain.cluster_id == pages["plain"].cluster_id  # untouched: same images, same bytes
    assert all(im.face_count == 0 and im.faces_blurred == 0 and im.nsfw_score < 0.7 for im in plain.images)
    teapot = by_page[pages["incidental"].page_url]
    assert teapot.cluster_id != pages["incidental"].cluster_id  # one image's bytes changed
    blurred = [im for im in teapot.images if im.faces_blurred]
    assert len(blurred) == 1 and blurred[0].face_count == 1 and blurred[0].face_share < 0.01
    original = next(im for im in pages["incidental"].images if im.record_id == blurred[0].record_id)
    assert blurred[0].image_id != original.image_id and blurred[0].image != original.image
    # The blurred photo no longer shows a face the detector finds, and the rest of it is unchanged.
    detector = load_detector(DetectorConfig())
    after = np.asarray(Image.open(io.BytesIO(blurred[0].image)).convert("RGB"))
    assert not [f for f in detector.detect([after])[0].faces if f.confirmed and f.score >= 0.55]
    before = np.asarray(Image.open(io.BytesIO(original.image)).convert("RGB"))
    assert np.abs(after[300:, :300].astype(int) - before[300:, :300].astype(int)).mean() < 2  # re-encoding only
    metrics = beam_counters(result, "safety")
    assert metrics["images_checked"] == 10 and metrics["person_clusters"] == 1
    # Faces: the astronaut, her mirrored crop, the pasted one. The cameraman's 3/4 view, re-encoded at quality 90 by
    # normalize, is no longer confirmed by the profile cascade (a known miss, docs/safety.md); the portraits are
    # still a person cluster (2 of 4 images).
    assert metrics["faces"] == 3 and metrics["faces_blurred"] == 1 and metrics["person_subject"] == 4
    assert sum(v for k, v in metrics.items() if k.startswith("nsfw_score_bin_")) == 10
    # Stored in clusters/ and read back.
    assert cluster_from_row(cluster_to_row(teapot)).images == teapot.images


@pytest.mark.slow
def test_policy_keep_keeps_portraits_sharp(pages: dict, tmp_path: Path) -> None:
    _, kept = run_stage(pages, PeopleConfig(policy="keep"), tmp_path)
    portraits = next(c for c in kept if c.page_url == pages["portraits"].page_url)
    assert portraits.cluster_id == pages["portraits"].cluster_id
    assert sorted(im.face_count for im in portraits.images) == [0, 0, 1, 1]  # the cameraman is missed (see above)
    assert all(im.faces_blurred == 0 for im in portraits.images)


def test_no_detection_on_the_bundled_sample(sample_phase1) -> None:
    """Every photo of the bundled DreamBench crawl that reaches the stage in the demo run (the sample's broken
    records and duplicates leave before it): no face counts, nothing is NSFW, no cluster leaves as a person's."""
    counters = sample_phase1.manifest["phases"]["clusters"]["counters"]["safety"]
    assert counters["images_checked"] > 150
    assert sum(v for k, v in counters.items() if k.startswith("nsfw_score_bin_")) == counters["images_checked"]
    assert not {"images_with_faces", "faces", "person_images", "faces_blurred", "person_clusters"} & {
        k for k, v in counters.items() if v}
    assert not [r for r in sample_phase1.rejects() if r["stage"] == "safety"]


# --- phase 3: the renders ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_flag_nsfw_targets_sets_the_candidates_flag(tmp_path: Path) -> None:
    """Renders are real photos here; the coffee photo's strongest NSFW class (0.15, a false alarm) is over a lowered
    threshold, so the detector flags that render and the target filter would reject it as nsfw. A flag of the base
    model's safety checker stays. Every checked render carries its NSFW score (for scores/ and the report)."""
    from schemas.records import ScoredCandidate
    from tests.clip_helpers import photo_cluster
    from tests.phase3_helpers import PASSING, as_png, candidate, units_of
    from transforms.nsfw_targets import FlagNsfwTargets
    from transforms.target_filter import TargetFilterConfig, failures

    photos = [(DATA / "photos" / n).read_bytes() for n in ("astronaut.jpg", "camera.jpg", "coffee.jpg")]
    cluster = photo_cluster("https://shop.example.com/cups", photos)
    cands = [candidate(cluster, as_png(photo), tag=str(i), nsfw=(True if i == 0 else None))
             for i, photo in enumerate(photos)]
    unit = units_of([ScoredCandidate(c, "a cup", PASSING, "x") for c in cands], cluster)
    assert all(s.scores.nsfw_score is None for s in unit.candidates)
    with TestPipeline() as p:
        flagged, rejects = p | CreateFromFile([unit], tmp_path) | FlagNsfwTargets(DetectorConfig(),
                                                                     NsfwConfig(buttocks_exposed=0.1))
        # (id, flag, stored score over the lowered threshold): only the coffee render's is
        assert_that(flagged | beam.Map(lambda u: sorted((s.candidate.candidate_id, s.candidate.nsfw,
                                                         s.scores.nsfw_score >= 0.1) for s in u.candidates)),
                    equal_to([sorted([(cands[0].candidate_id, True, False), (cands[1].candidate_id, None, False),
                                      (cands[2].candidate_id, True, True)])]))
        assert_that(rejects, equal_to([]), label="NoRejects")
    stage = beam_counters(p.result, "nsfw_targets")
    assert stage["flagged"] == 1 and sum(v for k, v in stage.items() if k.startswith("nsfw_score_bin_")) == 3
    flagged_unit = dataclasses.replace(unit.candidates[0], candidate=dataclasses.replace(cands[2], nsfw=True))
    assert failures(flagged_unit, TargetFilterConfig(), None)[0][0] == "nsfw"
    # Switched off, the step is the identity.
    with TestPipeline() as p:
        same, _ = p | beam.Create([unit]) | FlagNsfwTargets(DetectorConfig(), NsfwConfig(enabled=False))
        assert_that(same | beam.Map(lambda u: [(s.candidate.nsfw, s.scores.nsfw_score) for s in u.candidates]),
                    equal_to([[(s.candidate.nsfw, None) for s in unit.candidates]]))
