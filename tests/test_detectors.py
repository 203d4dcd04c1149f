"""The detector boundary: NudeNet's real weights from its wheel, decoding as NudeNet decodes, faces confirmed by
OpenCV's Haar cascades, batched through RunInference."""

from __future__ import annotations

import io
import os
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from tests.clusters import CreateFromFile, beam_counters
from transforms.models.detectors import (
    LABELS,
    DetectorInput,
    decode_output,
    detector_inference,
    letterbox,
    load_detector,
    overlap,
)
from transforms.settings import DetectorConfig

PHOTOS = Path(__file__).parent / "data" / "photos"


def photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(PHOTOS / name).convert("RGB"))


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def detector():
    return load_detector(DetectorConfig())


def test_weights_ship_in_the_nudenet_wheel() -> None:
    import nudenet.nudenet

    from transforms.models.detectors import bundled_model_path

    path = bundled_model_path()
    assert os.path.getsize(path) > 10_000_000  # the real 12 MB model, not a pointer file
    assert LABELS == tuple(vars(nudenet.nudenet)["__labels"])


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        DetectorConfig(resolution=500)
    with pytest.raises(ValueError, match="device"):
        DetectorConfig(device="tpu")
    with pytest.raises(ValueError, match="min_batch_size"):
        DetectorConfig(batch_size=4, min_batch_size=8)


@pytest.mark.parametrize("name", ["astronaut.jpg", "camera.jpg", "coffee.jpg"])
def test_decoding_matches_nudenet(detector, name: str) -> None:
    """Same model output -> the same boxes, labels and scores as NudeNet's own post-processing."""
    from nudenet.nudenet import _postprocess

    image = photo(name)
    height, width = image.shape[:2]
    output = detector.session.run(None, {detector.input_name: letterbox(image, detector.size)[None]})[0]
    ours, class_scores = decode_output(output[0], width, height, detector.size)
    side = max(width, height)
    theirs = _postprocess([output], side - width, side - height, side / width, side / height, width, height,
                          detector.size, detector.size)
    assert sorted((d["class"], round(d["score"], 5), tuple(d["box"])) for d in theirs) == sorted(
        (label, round(score, 5), tuple(box)) for label, score, box in ours)
    for label, score, _ in ours:  # a box's score is its class's best anchor or below it (NMS may drop the best)
        assert class_scores[label] >= round(score, 4) - 1e-4


def test_faces_found_on_the_portraits(detector) -> None:
    astronaut, camera = detector.detect([photo("astronaut.jpg"), photo("camera.jpg")])
    for found, (cx, cy) in ((astronaut, (225, 130)), (camera, (220, 160))):
        assert len(found.faces) == 1
        face = found.faces[0]
        assert face.confirmed and face.score > 0.6
        assert face.x < cx < face.x + face.w and face.y < cy < face.y + face.h  # on the face, not elsewhere
        assert 0.015 < found.face_share(face) < 0.06
    coffee = detector.detect([photo("coffee.jpg")])[0]
    assert coffee.faces == ()


def test_one_detector_answers_several_threads_as_it_answers_one(detector) -> None:
    """A multi-threaded runner's bundles share one loaded model: OpenCV's cascades may not be shared between
    threads (an assertion fails inside ``detectMultiScale``), so each thread gets its own; the answers do not
    change."""
    from concurrent.futures import ThreadPoolExecutor

    images = [photo("astronaut.jpg"), photo("camera.jpg"), photo("coffee.jpg")]
    expected = detector.detect(images)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: detector.detect(images), range(16)))
    assert all(answer == expected for answer in answers)
    assert sum(face.confirmed for found in expected for face in found.faces) == 2


def test_haar_confirmation_rejects_a_dog_face(detector, sample_rows) -> None:
    """NudeNet takes this DreamBench dog's face for a human face; the cascades do not agree."""
    row = next(r for r in sample_rows if r["image_url"] == "https://shop.example.com/products/img/dog-01.jpg")
    found = detector.detect([rgb(row["image"])])[0]
    assert found.faces and all(not face.confirmed for face in found.faces)
    unconfirmed = load_detector(DetectorConfig(face_confirmation=False)).detect([rgb(row["image"])])[0]
    assert all(face.confirmed for face in unconfirmed.faces)


def test_small_faces_need_the_larger_input(detector, product_photos) -> None:
    """A 32 px face pasted into a product photo: found at 640, missed at NudeNet's native 320."""
    scene = Image.open(io.BytesIO(product_photos[0])).convert("RGB").resize((512, 512))
    scene.paste(Image.open(PHOTOS / "astronaut.jpg").resize((160, 160)), (340, 12))
    found = detector.detect([np.asarray(scene)])[0]
    assert [f.confirmed for f in found.faces] == [True]
    assert overlap((found.faces[0].x, found.faces[0].y, found.faces[0].w, found.faces[0].h), (340, 12, 160, 160)) == 1
    small = load_detector(DetectorConfig(resolution=320)).detect([np.asarray(scene)])[0]
    assert not [f for f in small.faces if f.confirmed and f.score >= 0.55]


def test_handler_batches_images_of_several_examples(tmp_path: Path) -> None:
    images = [photo("astronaut.jpg"), photo("coffee.jpg"), photo("camera.jpg")]
    examples = [DetectorInput("a", tuple(images[:2])), DetectorInput("b", (images[2],))]
    with TestPipeline() as p:
        results = (p | CreateFromFile(examples, tmp_path)
                   | detector_inference(DetectorConfig(batch_size=4), "test_detector")
                   | beam.Map(lambda r: (r.example.key, len(r.example.images), [len(d.faces) for d in r.inference],
                                         r.model_id.split("@")[0])))
        assert_that(results, equal_to([("a", 0, [1, 0], "nudenet:320n.onnx"), ("b", 0, [1], "nudenet:320n.onnx")]))
    assert beam_counters(p.result, "test_detector")["num_inferences"] == 2  # examples
