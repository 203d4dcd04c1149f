"""Stage *safety*: people policy and NSFW check of the crawled photos, one detector pass for both.

A DreamBooth trained on a page of portraits makes a likeness of a real person without consent, and crawled
photos can be explicit. Both are decided on the output of one detector (:mod:`transforms.models.detectors`:
NudeNet's faces and exposed-body classes, faces confirmed by OpenCV's Haar cascades), run through
``RunInference`` on whole clusters (batched by image count, like the CLIP stage), after ``Dedupe`` and before
``Embed`` -- no GPU time on photos that leave, and embeddings of the images as they are stored (blurred).

Score first, threshold second. Per image (:func:`image_verdict`): the faces that count (confirmed, score at
least ``people.min_face_score``), their number and the largest one's share of the image area
(``ImageRecord.face_count`` / ``face_share``), and the NSFW score: the highest score of the classes the ``nsfw``
section names, each with its own threshold (``ImageRecord.nsfw_score``). Then, per cluster
(:func:`apply_policy`), in this order:

1. **NSFW** (``nsfw.enabled``): an image with a class at or over its threshold leaves as ``nsfw_input``.
2. **Person subject**: an image is a *person image* when its largest face covers at least
   ``people.prominent_face_share`` of it. A cluster whose person images are at least ``person_image_fraction``
   (half) of its images has a person as its subject: with ``people.policy: drop`` (the default) it leaves whole
   as ``person_subject`` (one reject row, counting its images); with ``keep`` it stays.
3. **Blurring** (``people.blur_incidental_faces``): in a cluster that stays, faces that are not its subject
   are blurred in the stored image -- every counted face of a cluster that is not a person cluster (a shop
   assistant behind the teapot, a model wearing the scarf in one photo of five), and in a person cluster kept
   with ``policy: keep`` only the faces under ``prominent_face_share``. The blurred image is re-encoded like
   the normalize stage encodes (``normalize.output_format``, ``quality``), and it gets a new ``image_id`` (the
   content hash of the stored bytes: ids stay content hashes, so a rerun gives the same ids and the cluster id
   follows) and a new ``phash`` (of the stored pixels, which the cross-page and decontamination checks compare);
   ``record_id`` still names the crawled record, and ``faces_blurred`` says how many boxes were blurred.
4. A cluster left with fewer than ``group.min_images`` images leaves as ``cluster_too_small``.

An image that does not decode leaves as ``detection_decode_error``; a batch on which the detector raises
leaves as one ``detection_failed`` row per image. Counters (namespace ``safety``): ``images_checked``,
``images_with_faces``, ``faces``, ``person_images``, ``faces_blurred``, ``person_clusters`` (also with policy
``keep``), ``nsfw_score_bin_0`` ... ``nsfw_score_bin_9`` (NSFW scores in tenths, for the report) and one per
reject reason.

The same NSFW decision (:func:`nsfw_verdict`) checks the renders of phase 3: stage ``nsfw_targets``
(:mod:`transforms.nsfw_targets`).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import PredictionResult
from PIL import Image, ImageFilter

from schemas.ids import content_id
from schemas.records import Cluster, ImageRecord, with_images
from transforms.common import REJECTS, Reason, StageOutput, count, internal_error, reject
from transforms.models.detectors import LABELS, Detections, DetectorInput, Face, detector_inference
from transforms.settings import NSFW_BINS, DetectorConfig, NormalizeConfig, NsfwConfig, PeopleConfig

LOG = logging.getLogger(__name__)

STAGE = "safety"

PERSON_SUBJECT = "person_subject"
NSFW_INPUT = "nsfw_input"
CLUSTER_TOO_SMALL = "cluster_too_small"
DETECTION_DECODE_ERROR = "detection_decode_error"
DETECTION_FAILED = "detection_failed"

REASONS = (Reason(NSFW_INPUT), Reason(PERSON_SUBJECT, whole_cluster=True),
           Reason(CLUSTER_TOO_SMALL, whole_cluster=True), Reason(DETECTION_DECODE_ERROR), Reason(DETECTION_FAILED))



for _label in NsfwConfig().thresholds():
    assert _label in LABELS, f"NsfwConfig names {_label}, which the detector does not have"


# --- decisions (plain functions) --------------------------------------------------------------------------


class ImageVerdict(NamedTuple):
    """What the detections of one image mean under the config."""

    faces: tuple[Face, ...]
    """The faces that count: confirmed, score at least ``people.min_face_score``."""
    face_share: float
    """Area share of the largest counted face (0.0 without faces)."""
    nsfw_score: float
    """Highest score among the NSFW classes checked (0.0 when none is checked)."""
    nsfw_class: str | None
    """The class at or over its threshold with the highest score, when there is one."""


def nsfw_verdict(class_scores: dict[str, float], config: NsfwConfig) -> tuple[float, str | None]:
    """``(highest score of the checked classes, the class over its threshold with the highest score or None)``."""
    thresholds = config.thresholds() if config.enabled else {}
    score = max((class_scores.get(label, 0.0) for label in thresholds), default=0.0)
    over = [(class_scores.get(label, 0.0), label) for label, bound in thresholds.items()
            if class_scores.get(label, 0.0) >= bound]
    return score, (max(over)[1] if over else None)


def image_verdict(detections: Detections, people: PeopleConfig, nsfw: NsfwConfig) -> ImageVerdict:
    faces = tuple(face for face in detections.faces if face.confirmed and face.score >= people.min_face_score)
    share = max((detections.face_share(face) for face in faces), default=0.0)
    score, label = nsfw_verdict(detections.class_scores, nsfw)
    return ImageVerdict(faces, share, score, label)


def is_person_cluster(verdicts: Sequence[ImageVerdict], people: PeopleConfig) -> bool:
    """At least ``person_image_fraction`` of the images have a face of at least ``prominent_face_share``."""
    if not verdicts:
        return False
    persons = sum(1 for v in verdicts if v.face_share >= people.prominent_face_share)
    return persons > 0 and persons >= math.ceil(people.person_image_fraction * len(verdicts) - 1e-9)


def faces_to_blur(verdict: ImageVerdict, detections: Detections, person_cluster: bool,
                  people: PeopleConfig) -> tuple[Face, ...]:
    """The faces of an image of a kept cluster that are not its subject (see the module docstring)."""
    if not people.blur_incidental_faces:
        return ()
    if not person_cluster:
        return verdict.faces
    return tuple(f for f in verdict.faces if detections.face_share(f) < people.prominent_face_share)


def blur_boxes(image: Image.Image, faces: Sequence[Face]) -> Image.Image:
    """``image`` with each face box (grown by a fifth of its size each way) Gaussian-blurred with a radius of a
    quarter of the box's longer side: features are gone, colours and layout stay."""
    image = image.copy()
    for face in faces:
        grow_x, grow_y = face.w // 5, face.h // 5
        box = (max(0, face.x - grow_x), max(0, face.y - grow_y), min(image.width, face.x + face.w + grow_x),
               min(image.height, face.y + face.h + grow_y))
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        region = image.crop(box)
        image.paste(region.filter(ImageFilter.GaussianBlur(radius=max(2.0, max(face.w, face.h) / 4))), box[:2])
    return image


def encode_like_normalize(image: Image.Image, normalize: NormalizeConfig) -> bytes:
    """``image`` encoded as the normalize stage encodes (same format and quality)."""
    buffer = io.BytesIO()
    if normalize.output_format == "PNG":
        image.save(buffer, "PNG", compress_level=6)
    else:
        image.save(buffer, normalize.output_format, quality=normalize.quality)
    return buffer.getvalue()


def blurred_record(record: ImageRecord, faces: Sequence[Face], normalize: NormalizeConfig) -> ImageRecord:
    """The record with ``faces`` blurred in its stored image, and the id and hash of the new bytes."""
    import imagehash

    image = blur_boxes(decode_rgb(record.image), faces)
    data = encode_like_normalize(image, normalize)
    return record.replace(image=data, image_id=content_id(data), phash=str(imagehash.phash(image)),
                          faces_blurred=len(faces))


def decode_rgb(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


class Outcome(NamedTuple):
    """What :func:`apply_policy` decided for one cluster."""

    cluster: Cluster | None
    """The cluster that goes on (``None`` when it left whole or every image left)."""
    image_rejects: tuple[tuple[ImageRecord, str, str], ...]
    """``(image, reason, detail)`` of images that left one by one."""
    cluster_reject: tuple[Cluster, str, str] | None
    """``(cluster as it stood, reason, detail)`` of a whole-cluster drop."""
    person_cluster: bool
    blurred: int


def apply_policy(cluster: Cluster, detections: Sequence[Detections], people: PeopleConfig, nsfw: NsfwConfig,
                 normalize: NormalizeConfig, min_images: int) -> Outcome:
    """The decisions of the stage for one cluster and the detections of its images (same order)."""
    if len(detections) != len(cluster.images):
        raise RuntimeError(f"{len(detections)} detections for {len(cluster.images)} images of {cluster.cluster_id}")
    thresholds = nsfw.thresholds()
    rejected: list[tuple[ImageRecord, str, str]] = []
    checked: list[tuple[ImageRecord, Detections, ImageVerdict]] = []
    for image, found in zip(cluster.images, detections, strict=True):
        verdict = image_verdict(found, people, nsfw)
        image = image.replace(face_count=len(verdict.faces), face_share=round(verdict.face_share, 6),
                              nsfw_score=round(verdict.nsfw_score, 4), faces_blurred=0)
        if verdict.nsfw_class is not None:
            label = verdict.nsfw_class
            rejected.append((image, NSFW_INPUT, f"detector class {label} scores {found.class_scores[label]:.3f} >= "
                                                f"nsfw.{label.lower()} {thresholds[label]}"))
            continue
        checked.append((image, found, verdict))
    verdicts = [v for _, _, v in checked]
    person = is_person_cluster(verdicts, people)
    measured = [im for im, _, _ in checked]
    remaining = with_images(cluster, measured) if rejected else cluster.replace(images=tuple(measured))
    if person and people.policy == "drop":
        persons = sum(1 for v in verdicts if v.face_share >= people.prominent_face_share)
        largest = max(v.face_share for v in verdicts)
        detail = (f"{persons} of its {len(verdicts)} images show a face covering >= {people.prominent_face_share:.1%} "
                  f"of the image (largest {largest:.1%}) >= person_image_fraction {people.person_image_fraction}: "
                  f"the subject is a person (people.policy drop)")
        return Outcome(None, tuple(rejected), (remaining, PERSON_SUBJECT, detail), True, 0)
    images, blurred = [], 0
    for image, found, verdict in checked:
        faces = faces_to_blur(verdict, found, person, people)
        if faces:
            image = blurred_record(image, faces, normalize)
            blurred += len(faces)
        images.append(image)
    if blurred:  # new ids: keep the dedupe stage's order (by id)
        images.sort(key=lambda im: (im.image_id, im.image_url or "", im.record_id))
    kept = with_images(cluster, images) if (blurred or rejected) else cluster.replace(images=tuple(images))
    if len(images) < min_images:
        if not images:
            return Outcome(None, tuple(rejected), None, person, 0)
        detail = f"{len(images)} images left after {len(rejected)} NSFW images left < min_images {min_images}"
        return Outcome(None, tuple(rejected), (kept, CLUSTER_TOO_SMALL, detail), person, blurred)
    return Outcome(kept, tuple(rejected), None, person, blurred)


# --- the DoFns ----------------------------------------------------------------------------------------------


def decode_array(data: bytes) -> np.ndarray:
    """Image bytes -> RGB ``uint8 [H, W, 3]``."""
    return np.asarray(decode_rgb(data))


class PrepareDetectionFn(beam.DoFn):
    """``Cluster`` -> ``DetectorInput(cluster, arrays)``; undecodable images and too-small clusters to rejects."""

    def __init__(self, min_images: int) -> None:
        self._min_images = min_images

    def process(self, cluster: Cluster) -> Iterator[Any]:
        try:
            arrays, kept, failed = [], [], []
            for image in cluster.images:
                try:
                    arrays.append(decode_array(image.image))
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                    failed.append((image, f"{type(error).__name__}: {error}"))
                    continue
                kept.append(image)
        except Exception as error:  # noqa: BLE001
            for image in cluster.images:
                yield internal_error(STAGE, error, record=image)
            return
        for image, detail in failed:
            yield reject(STAGE, DETECTION_DECODE_ERROR, f"normalized image does not decode: {detail}", record=image)
        if failed:
            cluster = with_images(cluster, kept)
        if not kept:
            return
        if len(kept) < self._min_images:
            yield reject(STAGE, CLUSTER_TOO_SMALL, f"{len(kept)} images left after {len(failed)} failed to decode "
                         f"< min_images {self._min_images}", cluster=cluster)
            return
        yield DetectorInput(cluster, tuple(arrays))


def count_scores(outcome_images: Sequence[ImageRecord]) -> None:
    for image in outcome_images:
        score = image.nsfw_score or 0.0
        count(STAGE, f"nsfw_score_bin_{min(NSFW_BINS - 1, int(score * NSFW_BINS))}")


class ApplyPolicyFn(beam.DoFn):
    """``PredictionResult(DetectorInput(cluster), [Detections])`` -> the cluster as it goes on, and rejects."""

    def __init__(self, people: PeopleConfig, nsfw: NsfwConfig, normalize: NormalizeConfig, min_images: int) -> None:
        self._people = people
        self._nsfw = nsfw
        self._normalize = normalize
        self._min_images = min_images

    def process(self, result: PredictionResult) -> Iterator[Any]:
        cluster: Cluster = result.example.key
        try:
            outcome = apply_policy(cluster, result.inference, self._people, self._nsfw, self._normalize,
                                   self._min_images)
        except Exception as error:  # noqa: BLE001
            for image in cluster.images:
                yield internal_error(STAGE, error, record=image, cluster_id=cluster.cluster_id)
            return
        checked = [im for im, _, _ in outcome.image_rejects]
        checked += list(outcome.cluster.images if outcome.cluster is not None
                        else outcome.cluster_reject[0].images if outcome.cluster_reject is not None else ())
        count(STAGE, "images_checked", len(checked))
        count(STAGE, "images_with_faces", sum(1 for im in checked if im.face_count))
        count(STAGE, "faces", sum(im.face_count or 0 for im in checked))
        prominent = self._people.prominent_face_share
        count(STAGE, "person_images", sum(1 for im in checked if (im.face_share or 0) >= prominent))
        count(STAGE, "faces_blurred", outcome.blurred)
        count(STAGE, "person_clusters", int(outcome.person_cluster))
        count_scores(checked)
        for image, reason, detail in outcome.image_rejects:
            yield reject(STAGE, reason, detail, record=image, cluster_id=cluster.cluster_id)
        if outcome.cluster_reject is not None:
            dropped, reason, detail = outcome.cluster_reject
            count(STAGE, f"{reason}_clusters")
            yield reject(STAGE, reason, detail, cluster=dropped)
        if outcome.cluster is not None:
            count(STAGE, "clusters")
            yield outcome.cluster


def detection_failure_rejects(failure: tuple[Any, Any]) -> Iterator[Any]:
    """A batch on which the detector raised -> one ``detection_failed`` reject per image."""
    batch, (error_type, error_repr, _traceback) = failure
    name = getattr(error_type, "__name__", str(error_type))
    LOG.warning("safety: the detector failed on a batch of %d clusters: %s", len(batch), error_repr)
    for example in batch:
        for image in example.key.images:
            yield reject(STAGE, DETECTION_FAILED, f"the detector raised {name} on this image's batch: {error_repr}",
                         record=image, cluster_id=example.key.cluster_id)


class Safety(beam.PTransform):
    """``Cluster``s -> the clusters that may be trained on: no NSFW photo, no person as subject (policy drop),
    incidental faces blurred; every image carries ``face_count``, ``face_share``, ``nsfw_score``."""

    def __init__(self, detector: DetectorConfig, people: PeopleConfig, nsfw: NsfwConfig, normalize: NormalizeConfig,
                 min_images: int) -> None:
        super().__init__()
        self._detector = detector
        self._people = people
        self._nsfw = nsfw
        self._normalize = normalize
        self._min_images = min_images

    def expand(self, clusters: beam.PCollection) -> StageOutput:
        prepared = clusters | "PrepareDetection" >> beam.ParDo(PrepareDetectionFn(self._min_images)).with_output_types(
            DetectorInput).with_outputs(REJECTS, main="inputs")
        results, failed = prepared.inputs | "DetectFacesAndNsfw" >> detector_inference(
            self._detector, STAGE).with_exception_handling()
        decided = results | "ApplyPolicy" >> beam.ParDo(ApplyPolicyFn(
            self._people, self._nsfw, self._normalize, self._min_images)).with_outputs(REJECTS, main="clusters")
        failures = failed.failed_inferences | "FailedBatches" >> beam.FlatMap(
            detection_failure_rejects).with_outputs(REJECTS, main="none")
        rejects = (prepared[REJECTS], decided[REJECTS], failures[REJECTS]) | "SafetyRejects" >> beam.Flatten()
        return StageOutput(decided.clusters, rejects)
