"""Model boundary: NudeNet's detector (faces and exposed-body classes) for ``RunInference``.

One detector pass serves two decisions: the people policy (faces) and the NSFW check (exposed-body classes),
in phase 1 on crawled photos and in phase 3 on renders.

**The model.** NudeNet 3 (``nudenet`` on PyPI, MIT) is a YOLOv8 detector exported to ONNX, run with
onnxruntime. Its wheel ships the ``320n`` weights (``nudenet/320n.onnx``, 12 MB), so it runs offline with its
real weights; ``detector.model`` may name another ONNX file of the same family (NudeNet's ``640m``). The model
outputs, for every anchor, a box and a score for each of the 18 classes of :data:`LABELS` (faces, covered and
exposed body parts). Its input size is free: ``detector.resolution`` (default 640) sets it.

**Preprocessing and decoding** are NudeNet's own (``nudenet.nudenet._read_image`` / ``_postprocess``), re-done
here on decoded RGB arrays so that a batch is one ``session.run``: pad the image right and bottom to a square,
resize to the input size (``cv2.dnn.blobFromImage``, bilinear), scale to 0..1, channels in RGB order. (NudeNet's
own reader hands the model BGR for 3-channel images: it converts a BGR image with ``COLOR_RGBA2BGR``, a swap,
then swaps again with ``swapRB=True``. YOLOv8 models are trained on RGB, and RGB separates real faces from dog
and toy faces better on our test photos -- docs/safety.md has both measurements.) An anchor's class is its best
class, anchors scoring at least 0.2 are candidates, and OpenCV's class-agnostic NMS (score 0.25, IoU 0.45)
keeps the boxes -- ``tests/test_detectors.py`` checks that :func:`decode_output` finds exactly the boxes
``NudeDetector.detect`` finds. What a stage gets per image (:class:`Detections`):

* ``class_scores`` -- per class, the highest score of an anchor whose best class it is (0 when none): the score
  of the best box of that class before NMS, what thresholds compare with;
* ``faces`` -- the ``FACE_FEMALE`` / ``FACE_MALE`` boxes that NMS keeps, in image pixels, each with a
  ``confirmed`` flag (next paragraph).

**Face confirmation.** Measured on the 158 DreamBench photos (no person in any of them), NudeNet's face classes
fire on dog faces and toy faces at scores up to 0.68 -- as high as on real faces (0.58-0.84 on the scikit-image
portraits); see docs/safety.md. So a face counts only when an independent detector agrees: one of OpenCV's
bundled Haar cascades (frontal ``alt2``, or profile in either direction; ``opencv-python-headless`` 4.x ships
them) finds a face overlapping the NudeNet box (intersection at least half of the smaller box). The cascades
run only around NudeNet's face boxes, on the histogram-equalized grey image, so they cost little. With
``detector.face_confirmation: false`` every NudeNet face box is confirmed.

The :class:`NudeNetHandler` batches images of several clusters like the CLIP handler (``BatchElements``
weighted by image count), loads the session in ``load_model`` (once per process, or once per machine with
``share_model_across_processes``) and returns one ``PredictionResult(example, [Detections, ...], model_id)``
per example.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from transforms.models.coders import PickledArraysCoder
from transforms.settings import DetectorConfig

LOG = logging.getLogger(__name__)

LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)
"""NudeNet 3's classes in the order of the model's outputs (``nudenet.nudenet.__labels``)."""

FACE_LABELS = frozenset({"FACE_FEMALE", "FACE_MALE"})

BUNDLED_MODEL = "nudenet:320n.onnx"
"""What ``detector.model: null`` loads: the weights inside the ``nudenet`` wheel."""

CANDIDATE_SCORE = 0.2
"""NudeNet's own floor: anchors under it are never boxes."""
NMS_SCORE = 0.25
NMS_IOU = 0.45
"""NudeNet's NMS settings (``cv2.dnn.NMSBoxes(boxes, scores, 0.25, 0.45)``)."""

NEIGHBORS = 5
"""OpenCV's minNeighbors of the cascades."""

SMALL_FACE = 48
"""Face boxes smaller than this (px) are enlarged to it for the cascades, whose smallest window is 20 px."""

CONFIRM_OVERLAP = 0.5
"""A cascade hit confirms a NudeNet face box when their intersection covers this share of the smaller box."""


# --- records -------------------------------------------------------------------------------------------


class Face(NamedTuple):
    """One face box of NudeNet, in image pixels."""

    label: str
    """``FACE_FEMALE`` or ``FACE_MALE``."""
    score: float
    x: int
    y: int
    w: int
    h: int
    confirmed: bool
    """A Haar cascade agrees (always true with ``detector.face_confirmation: false``)."""


class Detections(NamedTuple):
    """What the detector says about one image."""

    width: int
    height: int
    faces: tuple[Face, ...]
    """Face boxes after NMS, best first."""
    class_scores: dict[str, float]
    """Per class of :data:`LABELS`: the highest score of an anchor whose best class it is (0.0 when none)."""

    def face_share(self, face: Face) -> float:
        """Share of the image's area that ``face``'s box covers."""
        return face.w * face.h / max(1, self.width * self.height)


class DetectorInput(NamedTuple):
    """One example of :class:`NudeNetHandler`: decoded images and what they belong to."""

    key: Any
    """Returned untouched with the detections."""
    images: tuple[np.ndarray, ...]
    """RGB ``uint8 [H, W, 3]`` arrays."""


class DetectorInputCoder(PickledArraysCoder):
    """Pickles :class:`DetectorInput`, estimating its size from the arrays (Beam samples element sizes; the
    default coder would pickle megabytes of pixels to measure them)."""

    value_type = DetectorInput

    def arrays(self, value: DetectorInput) -> Iterable[Any]:
        return value.images


beam.coders.registry.register_coder(DetectorInput, DetectorInputCoder)


# --- plain functions -------------------------------------------------------------------------------------


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """RGB ``uint8 [H, W, 3]`` -> ``float32 [3, size, size]``: NudeNet's preprocessing (pad right and bottom
    to a square with black, bilinear resize, 0..1)."""
    import cv2

    height, width = image.shape[:2]
    side = max(height, width)
    padded = cv2.copyMakeBorder(image, 0, side - height, 0, side - width, cv2.BORDER_CONSTANT)
    # RGB in, RGB to the model (see the module docstring on NudeNet's own channel order).
    return cv2.dnn.blobFromImage(padded, 1 / 255.0, (size, size), (0, 0, 0), swapRB=False, crop=False)[0]


def decode_output(output: np.ndarray, width: int, height: int, size: int) -> tuple[list[tuple[str, float, list[int]]],
                                                                                     dict[str, float]]:
    """One image's model output ``[4 + len(LABELS), anchors]`` -> (boxes after NMS as ``(label, score,
    [x, y, w, h])`` best first, per-class scores); NudeNet's ``_postprocess`` plus the class scores."""
    import cv2

    rows = np.asarray(output, dtype=np.float32)
    scores = rows[4:]
    best = scores.argmax(axis=0)
    best_score = scores.max(axis=0)
    class_scores = {label: 0.0 for label in LABELS}
    for index in np.unique(best):
        class_scores[LABELS[int(index)]] = round(float(best_score[best == index].max()), 4)
    keep = np.flatnonzero(best_score >= CANDIDATE_SCORE)
    scale = max(width, height) / size
    boxes, box_scores, labels = [], [], []
    for i in keep:
        cx, cy, w, h = (float(v) for v in rows[:4, i])
        x, y, w, h = (cx - w / 2) * scale, (cy - h / 2) * scale, w * scale, h * scale
        x, y = max(0.0, min(x, width)), max(0.0, min(y, height))
        w, h = min(w, width - x), min(h, height - y)
        boxes.append([x, y, w, h])
        box_scores.append(float(best_score[i]))
        labels.append(LABELS[int(best[i])])
    kept = cv2.dnn.NMSBoxes(boxes, box_scores, NMS_SCORE, NMS_IOU) if boxes else []
    detections = [(labels[i], box_scores[i], [int(v) for v in boxes[i]]) for i in np.asarray(kept).reshape(-1)]
    detections.sort(key=lambda d: -d[1])
    return detections, class_scores


def overlap(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection of two ``(x, y, w, h)`` boxes over the smaller one's area."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / max(1, min(a[2] * a[3], b[2] * b[3]))


class FaceConfirmer:
    """OpenCV's bundled Haar cascades (frontal ``alt2``; profile, also mirrored), run around a candidate box.

    A ``CascadeClassifier`` must not be shared between threads (``detectMultiScale`` keeps its scale data in the
    object: two threads at once fail with an OpenCV assertion), so every thread that asks -- a multi-threaded
    runner's bundles share one loaded model -- gets its own pair, loaded once.
    """

    def __init__(self) -> None:
        import cv2

        self._folder = cv2.data.haarcascades
        self._local = threading.local()
        self.cascades()  # missing files fail here, at load time

    def cascades(self) -> tuple[Any, Any]:
        """This thread's ``(frontal, profile)`` classifiers."""
        pair = getattr(self._local, "pair", None)
        if pair is None:
            import cv2

            pair = (cv2.CascadeClassifier(self._folder + "haarcascade_frontalface_alt2.xml"),
                    cv2.CascadeClassifier(self._folder + "haarcascade_profileface.xml"))
            if pair[0].empty() or pair[1].empty():
                raise RuntimeError(f"OpenCV's Haar cascades are missing from {self._folder} (opencv-python-headless "
                                   f"4.x ships them; OpenCV 5 has no CascadeClassifier)")
            self._local.pair = pair
        return pair

    def hits(self, gray: np.ndarray, box: Sequence[int]) -> list[tuple[int, int, int, int]]:
        """Cascade faces in the region of ``box`` (grown by half its size each way) of the equalized grey image."""
        import cv2

        x, y, w, h = box
        height, width = gray.shape
        x0, y0 = max(0, x - w // 2), max(0, y - h // 2)
        x1, y1 = min(width, x + w + w // 2), min(height, y + h + h // 2)
        region = gray[y0:y1, x0:x1]
        if region.size == 0 or min(w, h) < 1:
            return []
        # The cascades' smallest window is 20 px: a small face is enlarged so that it spans ~48 px.
        scale = min(3.0, max(1.0, SMALL_FACE / min(w, h)))
        if scale > 1.0:
            region = cv2.resize(region, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        min_side = max(20, int(0.4 * min(w, h) * scale))
        found: list[tuple[int, int, int, int]] = []
        frontal, profile = self.cascades()
        for cascade, mirrored in ((frontal, False), (profile, False), (profile, True)):
            image = cv2.flip(region, 1) if mirrored else region
            for fx, fy, fw, fh in cascade.detectMultiScale(image, scaleFactor=1.1, minNeighbors=NEIGHBORS,
                                                           minSize=(min_side, min_side)):
                fx = region.shape[1] - fx - fw if mirrored else fx
                found.append((round(fx / scale) + x0, round(fy / scale) + y0, round(fw / scale), round(fh / scale)))
        return found

    def confirms(self, gray: np.ndarray, box: Sequence[int]) -> bool:
        return any(overlap(box, hit) >= CONFIRM_OVERLAP for hit in self.hits(gray, box))


def equalized_gray(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))


# --- the loaded model ----------------------------------------------------------------------------------------


class NudeNetDetector:
    """An onnxruntime session of a NudeNet model, with the face confirmer. :meth:`detect` is the one call the
    handler makes, so with a shared model the whole step runs in the process that holds it."""

    def __init__(self, session: Any, size: int, confirmer: FaceConfirmer | None, model_id: str) -> None:
        self.session = session
        self.size = size
        self.confirmer = confirmer
        self.model_id = model_id
        self.input_name = session.get_inputs()[0].name

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """RGB ``uint8 [H, W, 3]`` arrays -> one :class:`Detections` each (one forward pass for all)."""
        if not images:
            return []
        blob = np.stack([letterbox(image, self.size) for image in images])
        output = self.session.run(None, {self.input_name: blob})[0]
        results = []
        for image, rows in zip(images, output, strict=True):
            height, width = image.shape[:2]
            boxes, class_scores = decode_output(rows, width, height, self.size)
            faces = [(label, score, box) for label, score, box in boxes if label in FACE_LABELS]
            gray = equalized_gray(image) if faces and self.confirmer is not None else None
            results.append(Detections(width, height, tuple(
                Face(label, round(score, 4), *box,
                     confirmed=True if gray is None else self.confirmer.confirms(gray, box))
                for label, score, box in faces), class_scores))
        return results


def bundled_model_path() -> str:
    """Path of the 320n weights inside the installed ``nudenet`` package."""
    from importlib import resources

    return str(resources.files("nudenet").joinpath("320n.onnx"))


def check_detector(config: DetectorConfig) -> None:
    """Raise ``ValueError`` when the detector's weights cannot be found (cheap: nothing is read or loaded)."""
    if config.model is None:
        import importlib.util
        import os

        spec = importlib.util.find_spec("nudenet")
        folders = list(spec.submodule_search_locations or ()) if spec is not None else []
        if not any(os.path.exists(os.path.join(folder, "320n.onnx")) for folder in folders):
            raise ValueError("detector.model is null (the 320n weights of the nudenet wheel), but the nudenet package "
                             "or its 320n.onnx is not installed: install nudenet, set detector.model to an ONNX file, "
                             "or switch the detector off (detector.enabled=false)")
        return
    from apache_beam.io.filesystems import FileSystems

    if not FileSystems.exists(config.model):
        raise ValueError(f"detector.model {config.model!r} does not exist")


def read_model(config: DetectorConfig) -> bytes:
    """The ONNX model's bytes: the bundled file, or ``detector.model`` through Beam FileSystems."""
    if config.model is None:
        with open(bundled_model_path(), "rb") as handle:
            return handle.read()
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(config.model) as handle:
        return handle.read()


def model_id(config: DetectorConfig, data: bytes | None = None) -> str:
    """A readable id of the detector: its file and, once read, the first 12 hex digits of its SHA-256."""
    name = BUNDLED_MODEL if config.model is None else config.model
    digest = f"@{hashlib.sha256(data).hexdigest()[:12]}" if data is not None else ""
    return f"nudenet:{name.split('/')[-1].removeprefix('nudenet:')}{digest}/{config.resolution}"


def providers(device: str) -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device == "cpu" or (device == "auto" and "CUDAExecutionProvider" not in available):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise RuntimeError("detector.device is cuda but onnxruntime offers no CUDAExecutionProvider (install "
                           "onnxruntime-gpu instead of onnxruntime)")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def load_detector(config: DetectorConfig) -> NudeNetDetector:
    """Build the onnxruntime session (and the Haar cascades) of ``config``."""
    import onnxruntime

    data = read_model(config)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = config.threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(data, sess_options=options, providers=providers(config.device))
    confirmer = FaceConfirmer() if config.face_confirmation else None
    detector = NudeNetDetector(session, config.resolution, confirmer, model_id(config, data))
    LOG.info("detector: loaded %s (%s)", detector.model_id, ", ".join(session.get_providers()))
    return detector


# --- the model handler -----------------------------------------------------------------------------------


def image_count(example: DetectorInput) -> int:
    """Batch weight of an example: its number of images."""
    return len(example.images)


class NudeNetHandler(ModelHandler[DetectorInput, PredictionResult, NudeNetDetector]):
    """``DetectorInput`` -> ``PredictionResult(example without its pixels, [Detections, ...], model_id)``."""

    def __init__(self, config: DetectorConfig, namespace: str = "detector") -> None:
        super().__init__(
            min_batch_size=config.min_batch_size or config.batch_size,
            max_batch_size=config.batch_size,
            element_size_fn=image_count,
            large_model=config.share_model_across_processes,
        )
        self._config = config
        self._namespace = namespace

    def load_model(self) -> NudeNetDetector:
        return load_detector(self._config)

    def run_inference(self, batch: Sequence[DetectorInput], model: NudeNetDetector,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        if not batch:
            return []  # BatchElements emits an empty batch when one element outweighs the target
        detections = model.detect([image for example in batch for image in example.images])
        results, start = [], 0
        for example in batch:
            n = image_count(example)
            results.append(PredictionResult(example._replace(images=()), detections[start:start + n],
                                            model.model_id))
            start += n
        return results

    def get_num_bytes(self, batch: Sequence[DetectorInput]) -> int:
        return sum(int(image.nbytes) for example in batch for image in example.images)

    def get_metrics_namespace(self) -> str:
        return self._namespace

    def __repr__(self) -> str:
        return f"NudeNetHandler({model_id(self._config)}, batch_size={self._config.batch_size})"


def detector_inference(config: DetectorConfig, namespace: str = "detector") -> RunInference:
    """``RunInference`` with :class:`NudeNetHandler`; steps with the same config share the loaded model."""
    digest = hashlib.sha256(repr(config).encode()).hexdigest()[:16]
    return RunInference(NudeNetHandler(config, namespace), model_identifier=f"icl-nudenet-{digest}")
