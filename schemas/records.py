"""Typed records that flow between the pipeline's stages.

Every stage takes and returns these frozen dataclasses; the Parquet layouts that persist them are in
:mod:`schemas.parquet`. Nothing here imports the rest of the project, so trainers can depend on
``schemas`` alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from schemas.ids import cluster_id


@dataclass(frozen=True)
class InputRecord:
    """One crawled image-text pair exactly as a reader found it, before any validation."""

    record_id: str
    """Stable content hash of (page URL, image URL, image bytes) as read; identical rows share it."""
    source: str
    """Where the record was read: ``path:row`` (Parquet), ``path:line`` (JSONL) or ``path#key`` (tar)."""
    page_url: str | None
    """URL of the page the image was found on, as crawled (not yet canonical)."""
    image_url: str | None
    """URL of the image itself, as crawled."""
    text: str | None
    """Alt text or caption that came with the image."""
    image: bytes | None = field(repr=False)
    """The encoded image bytes as downloaded (JPEG, PNG, WebP, GIF, ...)."""


@dataclass(frozen=True)
class StoredImage:
    """Where an image's bytes wait while stages that do not read them run (``transforms/payloads.py``)."""

    image_id: str
    """The image whose bytes these are (a record whose ``image_id`` changed, a blurred one, no longer matches)."""
    path: str
    """The pack file (local, ``gs://``, ``s3://``)."""
    offset: int
    length: int


@dataclass(frozen=True)
class ImageRecord:
    """One validated, normalized image with the page it belongs to.

    Inside a :class:`Cluster` the page fields repeat the cluster's; the Parquet struct of a cluster's
    images leaves them out.
    """

    image_id: str
    """Stable content hash of the normalized image bytes (32 hex digits)."""
    record_id: str
    """The :attr:`InputRecord.record_id` this image came from."""
    source: str
    """The :attr:`InputRecord.source` this image came from."""
    page_url: str
    """Canonical page URL (see ``transforms.normalize.canonicalize_page_url``)."""
    domain: str
    """Host name of the canonical page URL (lower case, IDNA-encoded)."""
    image_url: str | None
    text: str | None
    """Alt text as crawled, cut to ``normalize.max_text_chars`` characters when longer (see
    :attr:`text_truncated`)."""
    image: bytes = field(repr=False)
    """Normalized image: RGB, EXIF orientation applied, resized and re-encoded as configured; empty while set
    aside (:attr:`stored`)."""
    width: int
    height: int
    phash: str
    """64-bit perceptual hash (``imagehash.phash``) as 16 hex digits."""
    source_width: int
    """Width of the image as crawled, before orientation and resizing."""
    source_height: int
    source_format: str
    """Pillow's name of the crawled format (``JPEG``, ``PNG``, ``WEBP``, ``GIF``, ...)."""
    caption: str | None = None
    """Recaption by the captioning stage; ``None`` until that stage runs."""
    embedding: Any = field(default=None, repr=False, compare=False)
    """L2-normalized image embedding (a float numpy vector) from the embedding stage, or ``None``."""
    coherence: float | None = None
    """Mean cosine similarity of this image to the other images of its cluster, when computed."""
    face_count: int | None = None
    """Faces the safety stage found (confirmed, over ``people.min_face_score``); ``None`` until it runs."""
    face_share: float | None = None
    """Share of the image's area covered by its largest face's box (0.0 without faces); ``None`` until checked."""
    faces_blurred: int | None = None
    """Faces blurred in the stored image by the safety stage (its bytes, ``image_id`` and ``phash`` are then those
    of the blurred image; ``record_id`` still names the crawled record)."""
    nsfw_score: float | None = None
    """Highest score of the detector's NSFW classes (``nsfw`` section) on this image; ``None`` until checked."""
    text_truncated: bool = False
    """Whether :attr:`text` was cut: the crawled alt text was longer than ``normalize.max_text_chars``."""
    stored: StoredImage | None = field(default=None, repr=False, compare=False)
    """Where :attr:`image` is stored while it is empty (``transforms/payloads.py``); never written to Parquet."""

    def replace(self, **changes: Any) -> ImageRecord:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class BoilerplateHit:
    """A perceptual hash seen on so many distinct pages that it is boilerplate (logo, badge, banner)."""

    phash: str
    n_pages: int


@dataclass(frozen=True)
class PageGroup:
    """All images found on one canonical page, after the per-page cap."""

    page_url: str
    domain: str
    images: tuple[ImageRecord, ...]
    """Images kept by the cap (boilerplate excluded), in a deterministic order (by image id, then image URL,
    record id and source)."""
    n_page_images: int = 0
    """How many images of this page reached the grouping stage (before cap and dedupe)."""


@dataclass(frozen=True)
class Prompt:
    """A scene prompt for a cluster's subject."""

    prompt: str
    """Text with a ``{subject}`` placeholder where the subject phrase goes, without its article
    ("a {subject} on a beach": the placeholder takes "sks teapot" or "red ceramic teapot")."""
    skill: str
    """One of the skills in the taxonomy (stylization, recontextualization, ...)."""


@dataclass(frozen=True)
class ClusterStats:
    """Numbers about a cluster, written whatever the filters decided."""

    n_images: int
    """Images in the cluster as written."""
    n_page_images: int
    """Images of the page that reached the grouping stage."""
    mean_sim: float | None = None
    """Mean pairwise cosine similarity of the cluster's image embeddings."""
    min_sim: float | None = None
    """Smallest pairwise cosine similarity of the cluster's image embeddings."""


@dataclass(frozen=True)
class ClusterProvenance:
    """Which backends produced a cluster's model-derived fields."""

    caption_backend: str | None = None
    subject_backend: str | None = None
    prompts_backend: str | None = None
    fallbacks: tuple[str, ...] = ()
    """Stages that fell back to their offline backend for this cluster (``caption``, ``subject``, ...)."""
    caption_model: str | None = None
    """Model id of the captions (``None`` for an offline backend)."""
    caption_prompt: str | None = None
    """Prompt file of the captions as ``name@sha256[:12]`` (``None`` for an offline backend)."""
    subject_model: str | None = None
    subject_prompt: str | None = None
    prompts_model: str | None = None
    prompts_prompt: str | None = None
    """Prompt file of the scene prompts, or the template grammar file of the ``templates`` backend."""
    embed_model: str | None = None
    """Model id of the images' stored CLIP embeddings (``open_clip:ViT-L-14/datacomp_xl_s13b_b90k``); phase 3
    reuses them only when it scores with the same model."""


@dataclass(frozen=True)
class Cluster:
    """A group of images of (ideally) one subject, from one page: the unit of ICL training data."""

    cluster_id: str
    """Stable content hash of the canonical page URL and the sorted image ids."""
    page_url: str
    domain: str
    images: tuple[ImageRecord, ...]
    stats: ClusterStats
    subject: str | None = None
    """Short description of the subject ("red ceramic teapot with bamboo handle")."""
    class_noun: str | None = None
    """Class noun of the subject ("teapot"), used as the DreamBooth class."""
    is_live: bool | None = None
    """Whether the subject is alive (pets, people): enables emotion/action prompts."""
    prompts: tuple[Prompt, ...] = ()
    provenance: ClusterProvenance = field(default_factory=ClusterProvenance)

    def replace(self, **changes: Any) -> Cluster:
        return dataclasses.replace(self, **changes)


def with_images(cluster: Cluster, images: Iterable[ImageRecord]) -> Cluster:
    """``cluster`` holding only ``images``: its id and ``stats.n_images`` follow the new image set."""
    images = tuple(images)
    return cluster.replace(cluster_id=cluster_id(cluster.page_url, (im.image_id for im in images)), images=images,
                           stats=dataclasses.replace(cluster.stats, n_images=len(images)))


@dataclass(frozen=True)
class Reject:
    """A record, cluster or candidate that left the pipeline, and why.

    Every input record ends either in a written cluster or in exactly one reject row (a whole-cluster
    drop is one row whose ``n_images`` counts the records it takes with it), so the counts reconcile.
    """

    id: str
    """record_id of a rejected record; cluster_id (or a page hash) of a rejected cluster."""
    stage: str
    """The stage that rejected it (``read``, ``normalize``, ``group``, ``dedupe``, ...)."""
    reason: str
    """A reason code, one per kind of failure (see docs/reasons.md)."""
    detail: str
    """Human-readable specifics (the exception text, the measured value and the bound, ...)."""
    page_url: str | None = None
    image_url: str | None = None
    n_images: int = 1
    """Input records this row accounts for."""
    source: str | None = None
    """Input location of a rejected record (``path:row``); empty for clusters."""
    cluster_id: str | None = None
    image_ids: tuple[str, ...] = ()
    """A whole-cluster row: the image ids of the cluster's members (what ``clusters/`` would have held)."""
    record_ids: tuple[str, ...] = ()
    """A whole-cluster row: the input record ids of its members, in the order of ``image_ids``; with the record
    rows' ``id`` and the kept images' ``record_id``, every input record can be traced to its fate."""


@dataclass(frozen=True)
class TrainSettings:
    """How the DreamBooth that rendered a candidate was trained (what phase 3 and a dataset card report)."""

    model: str
    """Base model (``synth.model.name``)."""
    mode: str
    """``lora`` or ``full``."""
    steps: int
    learning_rate: float
    lora_rank: int | None
    """Rank of the LoRA adapters; ``None`` in full mode."""
    train_text_encoder: bool
    batch_size: int
    resolution: int
    prior_preservation: bool
    prior_loss_weight: float | None
    precision: str
    """dtype of the frozen weights (``float32``, ``bfloat16``)."""
    seed: int
    """Seed of the training stream (from ``synth.train.seed`` and the cluster id)."""
    instance_prompt: str
    """Prompt of the real photos ("a photo of sks teapot")."""


@dataclass(frozen=True)
class SampleSettings:
    """How a candidate was rendered."""

    scheduler: str
    steps: int
    guidance_scale: float
    negative_prompt: str
    images_per_prompt: int


@dataclass(frozen=True)
class SynthSeconds:
    """Seconds the candidate's cluster spent in each part of synthesis (the same for all its candidates)."""

    load: float
    """Decoding and cropping the photos."""
    latents: float
    """VAE latents of the photos."""
    prior: float
    """Class images for prior preservation (fetched or rendered) and their latents."""
    train: float
    sample: float
    """Rendering every prompt of the cluster."""
    cleanup: float
    """Restoring the base model and releasing memory."""
    total: float


@dataclass(frozen=True)
class Candidate:
    """One synthesized training target: an image of a cluster's subject rendered for one of its prompts by
    a DreamBooth fine-tuned on the cluster's real images. Phase 3 scores and filters candidates."""

    candidate_id: str
    """Stable content hash of (cluster id, prompt template, skill, k, seed, synthesis config hash): reruns
    of the same configuration give the same ids."""
    cluster_id: str
    page_url: str
    prompt: str
    """The prompt the model rendered: ``{subject}`` replaced by the identifier and the class noun
    ("a photo of sks teapot on a beach")."""
    prompt_template: str
    """The scene prompt with its ``{subject}`` placeholder, as the cluster (or the fallback) gave it."""
    skill: str
    subject: str | None
    """The cluster's subject description, when it has one."""
    class_noun: str
    """The DreamBooth class used ("object" when the cluster had none)."""
    identifier: str
    """The rare token that names the subject in ``prompt`` ("sks")."""
    k: int
    """Which of the prompt's images this is (0-based)."""
    seed: int
    """Seed of the render, derived from (cluster id, prompt template, k)."""
    image: bytes = field(repr=False)
    """The rendered image, encoded (PNG by default)."""
    width: int
    height: int
    nsfw: bool | None
    """Flagged by the base model's safety checker (the image is then black); ``None`` without a checker."""
    train: TrainSettings
    sample: SampleSettings
    final_loss: float
    """Mean training loss of the last tenth of the steps."""
    n_train_images: int
    """Real photos the DreamBooth was trained on."""
    seconds: SynthSeconds
    synth_config_hash: str
    """Hash of the synthesis settings that produced the candidate (also the resume-cache key)."""


@dataclass(frozen=True)
class TargetScores:
    """Scores of one synthesized target (phase 3), attached before any threshold is applied.

    Similarities are cosine similarities of L2-normalized CLIP embeddings (the ``embed`` section's model).
    """

    subject_sim: float
    """Mean image-image similarity of the target to the real images of its cluster (subject preservation)."""
    subject_sim_max: float
    """Largest of those similarities: to the target's source image. Too close is a copy (``copy_clip``)."""
    text_sim: float
    """Image-text similarity of the target to its prompt with the subject phrase in place of the identifier."""
    copy_distance: int
    """Smallest perceptual-hash (64-bit pHash) Hamming distance to a real image of the cluster."""
    brightness: float
    """Mean luma (ITU-R 601-2) of the target, 0 (black) to 1 (white)."""
    contrast: float
    """Standard deviation of the luma, 0 to 0.5: near 0 is a blank, uniform image."""
    sharpness: float
    """Variance of the 4-neighbour Laplacian of the luma (0-255) at most ``score.sharpness_side`` px: low is blurry."""
    nsfw_score: float | None = None
    """Highest score (0-1) of the NSFW detector's checked classes on the target (stage ``nsfw_targets``); null when
    the detector did not check it (``detector.enabled`` or ``nsfw.enabled`` false, or a detector fault)."""


@dataclass(frozen=True)
class ScoredCandidate:
    """A candidate with its scores, its trainer-facing prompt and the real image it is nearest to."""

    candidate: Candidate
    prompt: str
    """The prompt a trainer sees: the template with the cluster's subject phrase, no identifier token
    ("a red ceramic teapot on a beach"); the text ``text_sim`` scores."""
    scores: TargetScores
    source_image_id: str
    """The target's source: the real image of the cluster it is nearest to -- highest CLIP similarity, ties
    broken by the smaller perceptual-hash distance, then the smaller image id. It is the image the target
    could be copying, and never one of its example's demos."""


class ScoringUnit(NamedTuple):
    """A cluster and its candidates: the unit the score, filter and assembly stages of phase 3 work on."""

    cluster: Cluster
    candidates: tuple[Any, ...]
    """``Candidate``s (before scoring) or ``ScoredCandidate``s (after), sorted by candidate id."""


@dataclass(frozen=True)
class Demo:
    """One real demonstration of an example: an image of the cluster with its caption."""

    image_id: str
    image: bytes = field(repr=False)
    """The normalized image bytes from ``clusters/`` (JPEG by default)."""
    caption: str | None
    width: int
    height: int


@dataclass(frozen=True)
class ExampleProvenance:
    """What produced an example: models, prompt files, settings hashes and the pipeline version."""

    pipeline_version: str | None
    config_hash: str
    """Hash of the configuration of the run that assembled the example."""
    clip_model: str
    """Model id of the CLIP model that scored the target."""
    synth_model: str
    """Base model of the DreamBooth that rendered the target."""
    synth_config_hash: str
    caption_backend: str | None
    caption_model: str | None
    caption_prompt: str | None
    subject_backend: str | None
    subject_model: str | None
    subject_prompt: str | None
    prompts_backend: str | None
    prompts_model: str | None
    prompts_prompt: str | None
    fallbacks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Example:
    """One ICL training example: real demos of a subject and one synthesized target of it."""

    example_id: str
    """Stable content hash of the target's candidate id and the demos' image ids."""
    cluster_id: str
    page_url: str
    subject: str | None
    class_noun: str | None
    demos: tuple[Demo, ...]
    target: ScoredCandidate
    provenance: ExampleProvenance
