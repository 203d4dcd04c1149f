"""Every stage's settings: one frozen dataclass per config section, validated in ``__post_init__``.

``pipeline.config.PipelineConfig`` holds one of each (plus the launcher's own ``card`` and ``report``), and a
stage gets its section, never the whole configuration. The sections live here, apart from the stages, so that
reading, checking or listing a configuration (``icl-pipeline config --list``) imports no stage, no Beam and no
model library: this module needs the standard library and ``dreambooth_synth.config`` only. A field is made with
:func:`option` (its default and the help text the command lists); the source of every default is in
docs/defaults.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urlsplit

from dreambooth_synth.config import ModelConfig, SampleConfig, SpeedConfig, TrainConfig

if TYPE_CHECKING:
    from transforms.web.fetcher import FetchPolicy


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config dataclass field with the help text that ``icl-pipeline config --list`` shows."""
    metadata = {"help": help}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --- phase 1: reading and normalizing ------------------------------------------------------------------------


# Document presets and column mappings of the read stage (``read.preset``, ``read.columns``); the readers are in
# transforms/documents.py.
MMC4, OBELICS, IMG2DATASET, LAION = "mmc4", "obelics", "img2dataset", "laion"

DOCUMENT_FIELDS = ("page_url", "image_url", "text", "image", "status", "error")
"""Our fields a column mapping may name: the ``InputRecord`` fields and the download outcome columns."""

PRESET_COLUMNS: dict[str, dict[str, str]] = {
    # img2dataset's Parquet output: url, caption, the image in a column named after --encode_format (jpg by
    # default), status, error_message; the page URL only when listed in --save_additional_columns.
    IMG2DATASET: {"image_url": "url", "text": "caption", "image": "jpg", "page_url": "page_url",
                  "status": "status", "error": "error_message"},
    # LAION-400M / LAION-5B metadata Parquet: URL and TEXT, no page URL (such rows reach normalize without one).
    LAION: {"image_url": "URL", "text": "TEXT"},
}
PRESETS = (MMC4, OBELICS, *PRESET_COLUMNS)

DOWNLOAD_OUTCOME_COLUMNS = {"status": "status", "error": "error_message"}
"""img2dataset's names of a row's download outcome, read by any mapping with an image column."""


@dataclass(frozen=True)
class DocumentSpec:
    """How rows of a file become pairs: a document preset (``mmc4``, ``obelics``) or a column mapping."""

    preset: str | None = None
    columns: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Our field -> the file's column; with a mapping preset, these override the preset's entries."""

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown read.preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        unknown = sorted(set(self.columns) - set(DOCUMENT_FIELDS))
        if unknown:
            raise ValueError(f"read.columns: unknown field(s) {', '.join(unknown)}; map any of "
                             f"{', '.join(DOCUMENT_FIELDS)}")
        if self.preset in (MMC4, OBELICS) and self.columns:
            raise ValueError(f"read.columns cannot be combined with read.preset={self.preset} (a document layout)")
        if self.preset is None and "image_url" not in self.columns and "image" not in self.columns:
            raise ValueError("read.columns must map image_url or image")

    @property
    def document(self) -> bool:
        return self.preset in (MMC4, OBELICS)

    def mapping(self) -> dict[str, str]:
        """The column mapping (preset entries, then ``columns``); empty for document presets.

        A mapping with an image column but no ``status`` / ``error`` reads img2dataset's ``status`` and
        ``error_message`` when a file has them, so that its failed downloads keep their message; a URL list (no
        image column) has no download outcome to read.
        """
        mapping = {**PRESET_COLUMNS.get(self.preset or "", {}), **self.columns}
        if "image" in mapping:
            for name, column in DOWNLOAD_OUTCOME_COLUMNS.items():
                mapping.setdefault(name, column)
        return mapping

    @property
    def byteless(self) -> bool:
        """Whether rows of this spec come without image bytes (the pipeline then needs the fetch stage)."""
        return self.document or "image" not in self.mapping()


def document_spec(preset: str | None, columns: Mapping[str, str] | None) -> DocumentSpec | None:
    """The spec for ``read.preset`` / ``read.columns``; ``None`` when neither is set (the default layouts)."""
    if preset is None and not columns:
        return None
    return DocumentSpec(preset, dict(columns or {}))


@dataclass(frozen=True)
class ReadConfig:
    """Settings of the read stage (config section ``read``)."""

    batch_rows: int = option(64, "Parquet rows decoded at a time; bounds reader memory to about "
                                 "batch_rows x image size.")
    validate_max_files: int = option(1000, "How many input files have their layout checked before the "
                                           "job starts (the rest are checked when read).")
    split_rows: int = option(1024, "Rows of a Parquet input (our layout) that one worker reads and normalizes: "
                                   "files are cut into splits of whole row groups of at least this many rows, "
                                   "spread over the workers without moving image bytes; 0 reads each file whole.")
    reshuffle: bool = option(True, "Redistribute the records of files read whole (JSONL, tar, document layouts, "
                                   "Parquet with split_rows 0), so that normalization is not fused to the one "
                                   "worker that read each file.")
    allow_truncated: bool = option(False, "Let a run whose compressed or tar input ends early finish with exit "
                                          "status 0 (the file is still reported as truncated_file in rejects/ "
                                          "and the manifest); by default such a run fails.")
    preset: str | None = option(None, "Layout of the Parquet and JSONL inputs when not ours: mmc4, obelics (one "
                                      "document per row, image URLs without bytes), img2dataset (its Parquet "
                                      "output, failed downloads kept as download_failed), laion (URL, TEXT).")
    columns: dict[str, str] = option(help="Column mapping for Parquet and JSONL inputs, our field -> their column "
                                          "(fields: page_url, image_url, text, image, status, error), e.g. "
                                          "{image_url: url, text: caption, image: jpg}; over the preset's. With "
                                          "an image column, status and error default to img2dataset's status and "
                                          "error_message (a row without bytes that failed: download_failed).",
                                     factory=dict)

    def __post_init__(self) -> None:
        if self.batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {self.batch_rows}")
        if self.validate_max_files < 0:
            raise ValueError(f"validate_max_files must be >= 0, got {self.validate_max_files}")
        if self.split_rows < 0:
            raise ValueError(f"split_rows must be >= 0, got {self.split_rows}")
        self.spec()  # an unknown preset or field fails here, before anything runs

    def spec(self) -> DocumentSpec | None:
        """The document spec of ``preset`` and ``columns``; ``None`` for our own layouts."""
        return document_spec(self.preset, self.columns)


# --- phase 1: web inputs (WARC pages, pairs without image bytes) --------------------------------------------

DEFAULT_SKIP_REGIONS = ("nav", "header", "footer")

# Hosts whose images are beacons, not pictures (analytics and advertising pixels). A host matches itself and
# its subdomains.
DEFAULT_PIXEL_HOSTS = (
    "pixel.wp.com", "stats.wp.com", "www.facebook.com/tr", "facebook.com/tr", "google-analytics.com",
    "googleadservices.com", "doubleclick.net", "bat.bing.com", "px.ads.linkedin.com", "scorecardresearch.com",
    "pixel.quantserve.com", "analytics.twitter.com", "t.co/i/adsct", "ct.pinterest.com", "adnxs.com",
    "pixel.mathtag.com", "tr.snapchat.com", "sp.analytics.yahoo.com", "pixel.adsafeprotected.com",
    "matomo.cloud", "bluekai.com", "krxd.net", "rlcdn.com", "demdex.net",
)

DEFAULT_PAGE_OPT_OUT_DIRECTIVES = ("noai", "noimageai")
"""Page-level AI opt-outs (``<meta name="robots" content="noai">``, the page's ``X-Robots-Tag``)."""

DEFAULT_IMAGE_OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
"""``X-Robots-Tag`` directives that opt an image response out: img2dataset's defaults."""

# Names the project and what it obeys; an operator adds a contact (``+https://...`` or an e-mail address) for
# site owners with fetch.user_agent.
DEFAULT_USER_AGENT = "icl-cluster-pipeline/0.1 (image-text dataset builder; obeys robots.txt and X-Robots-Tag noai)"


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of the extract stage (config section ``extract``); defaults and sources in docs/defaults.md."""

    nearby_chars: int = option(200, "Characters of page text kept on each side of an image as its nearby text.")
    text_fallback: bool = option(True, "When an <img> has neither alt nor title, its nearby text becomes the "
                                       "pair's text (else the text is empty).")
    pixel_hosts: tuple[str, ...] = option(DEFAULT_PIXEL_HOSTS, "Hosts (or host/path prefixes) of tracking pixels "
                                                               "(tracking_pixel).")
    skip_regions: tuple[str, ...] = option(DEFAULT_SKIP_REGIONS, "Elements whose images are page chrome "
                                                                 "(navigation_image).")
    page_opt_out_directives: tuple[str, ...] = option(
        DEFAULT_PAGE_OPT_OUT_DIRECTIVES, "Directives of <meta name=robots> or the page's X-Robots-Tag that opt "
                                         "all its images out (opted_out).")
    image_opt_out_directives: tuple[str, ...] = option(
        DEFAULT_IMAGE_OPT_OUT_DIRECTIVES, "X-Robots-Tag directives on a captured image response that opt it out "
                                          "(opted_out); the fetcher's defaults.")
    robots_token: str = option("icl-cluster-pipeline", "Our robots name (<meta name=TOKEN>, 'TOKEN: noai').")
    max_page_bytes: int = option(10 * 1024 * 1024, "Larger HTML bodies are not parsed (counted as "
                                                   "extract/pages_too_large).")
    max_image_bytes: int = option(32 * 1024 * 1024, "Larger captured image bodies are not joined (the pair is "
                                                    "fetched instead; normalize.max_bytes by default).")

    def __post_init__(self) -> None:
        if self.nearby_chars < 0:
            raise ValueError(f"nearby_chars must be >= 0, got {self.nearby_chars}")
        if self.max_page_bytes < 1 or self.max_image_bytes < 1:
            raise ValueError("max_page_bytes and max_image_bytes must be positive")
        if not self.robots_token.strip():
            raise ValueError("robots_token must not be blank")


@dataclass(frozen=True)
class FetchConfig:
    """Settings of the fetch stage (config section ``fetch``); defaults and their sources in docs/defaults.md."""

    enabled: Literal["auto", "always", "never"] = option(
        "auto", "auto: fetch when an input carries no image bytes (WARC pages, MMC4, OBELICS, URL lists); always: "
                "also fetch byte-less rows of other inputs; never: byte-less records reach normalize (missing_image).")
    user_agent: str = option(DEFAULT_USER_AGENT, "User-Agent header: names the project; add a contact for site "
                                                 "owners (a URL or an e-mail address) on real crawls.")
    robots_token: str = option("icl-cluster-pipeline", "Our name in robots.txt groups, X-Robots-Tag 'BOT: ...' "
                                                       "values and <meta name=BOT>.")
    total_concurrency: int = option(32, "Requests in flight at once per worker process, all hosts together.")
    per_host_concurrency: int = option(2, "Requests in flight at once per host (host:port), across the job.")
    per_host_rate: float = option(1.0, "Request starts per second per host, across the job (robots.txt's "
                                       "Crawl-delay lowers it).")
    timeout_s: float = option(10.0, "Whole-request timeout in seconds (connect, headers and body): fetch_timeout.")
    connect_timeout_s: float = option(5.0, "Connection timeout in seconds.")
    max_retries: int = option(2, "Retries after a 429, a 5xx or a dropped connection (not after a timeout).")
    backoff_s: float = option(1.0, "First retry delay without Retry-After; doubles per retry, with jitter.")
    max_retry_after_s: float = option(60.0, "Longest Retry-After (and backoff) honoured; a longer one ends the "
                                            "retries at once.")
    max_bytes: int = option(32 * 1024 * 1024, "Largest image body read, in bytes (fetch_too_large); matches "
                                              "normalize.max_bytes.")
    max_redirects: int = option(5, "Redirects followed per URL (fetch_too_many_redirects).")
    respect_robots: bool = option(True, "Obey robots.txt (RFC 9309). Turn off only for sites you own.")
    max_crawl_delay_s: float = option(10.0, "Longest robots.txt Crawl-delay honoured; a host asking for more is "
                                            "not fetched (robots_disallowed).")
    opt_out_directives: tuple[str, ...] = option(DEFAULT_IMAGE_OPT_OUT_DIRECTIVES, "X-Robots-Tag directives that "
                                                                                   "opt an image out (opted_out).")
    allow_private_addresses: bool = option(False, "Fetch from private, loopback and link-local addresses (tests, "
                                                  "intranet crawls); refused by default (fetch_private_address).")
    urls_per_shard: int = option(64, "A host with more distinct URLs is split over up to per_host_concurrency "
                                     "workers, each with its share of the host's limits.")
    max_shards_in_flight: int = option(64, "Host shards one worker fetches at once.")

    def __post_init__(self) -> None:
        if self.enabled not in ("auto", "always", "never"):
            raise ValueError(f"enabled must be auto, always or never, got {self.enabled!r}")
        for name in ("total_concurrency", "per_host_concurrency", "urls_per_shard", "max_shards_in_flight",
                     "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.per_host_concurrency > self.total_concurrency:
            raise ValueError(f"per_host_concurrency ({self.per_host_concurrency}) exceeds total_concurrency "
                             f"({self.total_concurrency})")
        for name in ("per_host_rate", "timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("backoff_s", "max_retry_after_s", "max_crawl_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.max_retries <= 10:
            raise ValueError(f"max_retries must be within 0..10, got {self.max_retries}")
        if not 0 <= self.max_redirects <= 20:
            raise ValueError(f"max_redirects must be within 0..20, got {self.max_redirects}")
        if not self.user_agent.strip() or not self.robots_token.strip():
            raise ValueError("user_agent and robots_token must not be blank")

    def policy(self) -> FetchPolicy:
        """The fetcher's settings (the fields both classes share)."""
        from transforms.web.fetcher import FetchPolicy  # (aiohttp: only where a fetcher runs)

        names = {f.name for f in dataclasses.fields(FetchPolicy)}
        return FetchPolicy(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names})


DEFAULT_TRACKING_PARAMS = (
    "utm_*", "fbclid", "gclid", "dclid", "gbraid", "wbraid", "msclkid", "yclid", "mc_cid", "mc_eid",
    "_ga", "_gl", "igshid", "srsltid", "_hsenc", "_hsmi", "mkt_tok", "oly_anon_id", "oly_enc_id",
    "vero_id", "rb_clickid", "s_cid",
)

_OUTPUT_FORMATS = ("JPEG", "PNG", "WEBP")

# What crawls serve as photos. Pillow opens more (EPS through Ghostscript, PSD, ICO, ...), which we
# neither want in training data nor want to hand to external decoders.
DEFAULT_ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")


@dataclass(frozen=True)
class NormalizeConfig:
    """Settings of the normalize stage (config section ``normalize``); defaults justified in docs/defaults.md."""

    tracking_params: tuple[str, ...] = option(
        DEFAULT_TRACKING_PARAMS, "Query parameters removed from page URLs (shell-style patterns, case-insensitive).")
    max_bytes: int = option(32 * 1024 * 1024, "Largest encoded image accepted, in bytes (file_too_large).")
    max_pixels: int = option(89_478_485, "Largest width x height accepted, checked from the header before "
                                         "decoding (decompression_bomb). Default: Pillow's own limit.")
    min_side: int = option(256, "Smallest accepted shorter side, in pixels, as crawled (too_small).")
    max_aspect_ratio: float = option(2.0, "Largest accepted long side / short side (bad_aspect_ratio).")
    max_side: int = option(768, "Images are shrunk so that their longest side is at most this (never enlarged).")
    output_format: str = option("JPEG", "Format of the normalized image bytes: JPEG, PNG or WEBP.")
    quality: int = option(90, "Encoder quality for JPEG and WEBP (1-100).")
    allowed_formats: tuple[str, ...] = option(DEFAULT_ALLOWED_FORMATS, "Pillow format names accepted as "
                                                                       "input (others: unsupported_format).")

    min_contrast: float | None = option(0.015, "Smallest contrast (0..0.5): the standard deviation of the luma "
                                               "(or of an RGB channel, if larger) of the image shrunk to 32 x 32, "
                                               "values scaled to 0..1; under it the image is blank or a single "
                                               "colour (blank_image). null: no check.")
    max_text_chars: int | None = option(1000, "Longest alt text stored, in characters; a longer one is cut "
                                              "(ImageRecord.text_truncated is then true). null: no cap.")

    def __post_init__(self) -> None:
        if self.output_format not in _OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {', '.join(_OUTPUT_FORMATS)}, got {self.output_format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be within 1..100, got {self.quality}")
        if self.min_side < 1 or self.max_side < self.min_side:
            raise ValueError(f"need 1 <= min_side <= max_side, got min_side={self.min_side}, max_side={self.max_side}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.max_pixels < self.min_side * self.min_side:
            raise ValueError(f"max_pixels ({self.max_pixels}) is below min_side^2 ({self.min_side ** 2})")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        if self.min_contrast is not None and not 0 <= self.min_contrast < 0.5:
            raise ValueError(f"min_contrast must be within [0, 0.5) or null, got {self.min_contrast}")
        if self.max_text_chars is not None and self.max_text_chars < 1:
            raise ValueError(f"max_text_chars must be positive or null, got {self.max_text_chars}")


# --- phase 1: pages, duplicates and CLIP ------------------------------------------------------------------


@dataclass(frozen=True)
class GroupConfig:
    """Settings of page grouping (config section ``group``); defaults justified in docs/defaults.md."""

    max_images_per_page: int = option(32, "Images kept per page; the excess is rejected as page_cap.")
    min_images: int = option(3, "Smallest cluster kept (after dedupe and every later filter): a training "
                                "example needs 3 demos.")

    def __post_init__(self) -> None:
        if self.min_images < 1:
            raise ValueError(f"min_images must be at least 1, got {self.min_images}")
        if self.max_images_per_page < self.min_images:
            raise ValueError(f"max_images_per_page ({self.max_images_per_page}) must be >= min_images "
                             f"({self.min_images})")


@dataclass(frozen=True)
class DedupeConfig:
    """Settings of deduplication (config section ``dedupe``); defaults justified in docs/defaults.md."""

    near_duplicate_max_distance: int = option(5, "Images on one page whose 64-bit perceptual hashes differ "
                                                 "in at most this many bits are near duplicates (MMC4: 5).")
    boilerplate_max_pages: int = option(10, "An image (by perceptual hash) on more than this many distinct "
                                            "pages is boilerplate and leaves every page (OBELICS: 10).")

    def __post_init__(self) -> None:
        if not 0 <= self.near_duplicate_max_distance <= 64:
            raise ValueError(f"near_duplicate_max_distance must be within 0..64, got "
                             f"{self.near_duplicate_max_distance}")
        if self.boilerplate_max_pages < 1:
            raise ValueError(f"boilerplate_max_pages must be at least 1, got {self.boilerplate_max_pages}")


TINY_RANDOM = "tiny-random"
"""Name of the preset: a few-layer open_clip CLIP with random weights from ``embed.seed``."""

DEFAULT_CLIP_MODEL = "ViT-L-14"
DEFAULT_CLIP_PRETRAINED = "datacomp_xl_s13b_b90k"

_DEVICES = ("auto", "cpu", "cuda")
_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of the CLIP embedding stage (config section ``embed``); see docs/defaults.md."""

    enabled: bool = option(True, "Compute CLIP image embeddings (needed by cluster_filter and by the CLIP "
                                 "check of decontaminate).")
    model: str = option(DEFAULT_CLIP_MODEL, "open_clip architecture (ViT-L-14, ViT-B-32, ...; see "
                                            "open_clip.list_models()) or 'tiny-random' (a few random layers, for "
                                       "tests and the demo).")
    pretrained: str | None = option(DEFAULT_CLIP_PRETRAINED, "open_clip pretrained tag of the weights (fetched from "
                                                        "the Hugging Face Hub and cached); null for random "
                                                        "weights from `seed`. With `checkpoint`, only its "
                                                        "preprocessing (mean, std, interpolation) is used.")
    checkpoint: str | None = option(None, "Path of an open_clip checkpoint file with the model's weights (local, "
                                          "gs://, s3://); use it where the hub cannot be reached.")
    seed: int = option(0, "Seed of the random initialization (tiny-random, or pretrained: null).")
    device: str = option("auto", "auto (CUDA when available), cpu or cuda.")
    precision: str = option("auto", "Autocast precision of inference: auto (bf16 on CUDA when supported, else "
                                    "fp16; fp32 on CPU), fp32, bf16 or fp16.")
    cpu_threads: int = option(0, "Torch threads of a worker process on CPU (0: torch's default, one per core). With "
                                 "several worker processes on a machine, 1 each avoids their thread pools "
                                 "fighting over the cores.")
    batch_size: int = option(64, "Images per inference batch (clusters are batched whole, weighted by their "
                                 "image count).")
    min_batch_size: int | None = option(None, "Smallest batch Beam's adaptive batching may emit; null: equal "
                                              "to batch_size (fixed batches, best for GPUs).")
    share_model_across_processes: bool = option(False, "One model copy per worker machine shared by its "
                                                       "processes (Beam large_model), for models too big to "
                                                       "load once per process.")
    accelerator: str | None = option(None, "Beam resource hint for the inference step, e.g. "
                                           "'type:nvidia-l4;count:1;install-nvidia-driver' on Dataflow.")
    store_embeddings: bool = option(True, "Write each image's embedding to clusters/ (float16) for downstream "
                                          "dedupe and analysis.")

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be an open_clip architecture name or 'tiny-random'")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be >= 0, got {self.cpu_threads}")
        if self.model == TINY_RANDOM and self.pretrained:
            raise ValueError(f"model {TINY_RANDOM} has no pretrained weights; set pretrained to null "
                             f"(got {self.pretrained!r})")
        if self.device not in _DEVICES:
            raise ValueError(f"device must be one of {', '.join(_DEVICES)}, got {self.device!r}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, got {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.min_batch_size is not None and not 1 <= self.min_batch_size <= self.batch_size:
            raise ValueError(f"min_batch_size must be within 1..batch_size ({self.batch_size}), "
                             f"got {self.min_batch_size}")


@dataclass(frozen=True)
class ClusterFilterConfig:
    """Settings of the coherence filter (config section ``cluster_filter``); see docs/defaults.md."""

    enabled: bool = option(True, "Drop incoherent clusters and outlier images (needs embed.enabled).")
    outlier_threshold: float | None = option(0.6, "An image whose mean cosine similarity to the other images of "
                                                  "its cluster is under this leaves it (outlier_image), unless "
                                                  "most images are under it; null: no outlier removal.")
    coherence_threshold: float | None = option(0.75, "Smallest mean pairwise cosine similarity of a kept cluster "
                                                     "(incoherent_cluster); with target_keep_rate, the floor under "
                                                     "the calibrated threshold. null: no threshold.")
    target_keep_rate: float | None = option(None, "Calibrate the coherence threshold on this run so that at most "
                                                  "this share of the scored clusters is kept (0 < rate <= 1), never "
                                                  "under coherence_threshold (its floor); the threshold used goes to "
                                                  "manifest.json.")

    def __post_init__(self) -> None:
        for name in ("outlier_threshold", "coherence_threshold"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} is a cosine similarity and must be within -1..1, got {value}")
        if self.target_keep_rate is not None and not 0.0 < self.target_keep_rate <= 1.0:
            raise ValueError(f"target_keep_rate must be within (0, 1], got {self.target_keep_rate}")


@dataclass(frozen=True)
class CrossPageConfig:
    """Settings of cross-page duplicate detection (config section ``cross_page``); see docs/defaults.md."""

    enabled: bool = option(True, "Drop clusters that mostly repeat another page's cluster (duplicate_cluster).")
    max_distance: int = option(5, "Images of two clusters whose 64-bit perceptual hashes differ in at most this "
                                  "many bits are near duplicates (as in dedupe).")
    min_shared_fraction: float = option(0.5, "Two clusters are duplicates when at least this share of either "
                                             "one's images have a near duplicate in the other.")
    bands: int = option(4, "The 64-bit hash is cut into this many bands; clusters sharing a band value of "
                           "some image are compared.")
    max_bucket_clusters: int = option(1000, "A band value shared by more clusters than this is skipped "
                                            "(counted as cross_page/hot_buckets).")

    def __post_init__(self) -> None:
        if not 0 <= self.max_distance <= 64:
            raise ValueError(f"max_distance must be within 0..64, got {self.max_distance}")
        if not 0.0 < self.min_shared_fraction <= 1.0:
            raise ValueError(f"min_shared_fraction must be within (0, 1], got {self.min_shared_fraction}")
        if not 1 <= self.bands <= 64:
            raise ValueError(f"bands must be within 1..64, got {self.bands}")
        if self.max_bucket_clusters < 2:
            raise ValueError(f"max_bucket_clusters must be at least 2, got {self.max_bucket_clusters}")


@dataclass(frozen=True)
class DecontaminateConfig:
    """Settings of benchmark decontamination (config section ``decontaminate``); see docs/defaults.md."""

    against: str | None = option(None, "Evaluation images no cluster may contain: a directory (searched "
                                       "recursively for image files) or a glob, on any Beam file system. "
                                       "Unset: no decontamination.")
    max_distance: int = option(8, "An image within this many bits (64-bit perceptual hash) of an evaluation "
                                  "image is a near duplicate of it.")
    clip_threshold: float | None = option(0.95, "An image whose CLIP cosine similarity to an evaluation image "
                                                "reaches this is a near duplicate of it (when embeddings "
                                                "exist); null: perceptual hash only.")

    def __post_init__(self) -> None:
        if self.against is not None and not self.against.strip():
            raise ValueError("against must be a directory or a glob (or null for no decontamination)")
        if not 0 <= self.max_distance <= 64:
            raise ValueError(f"max_distance must be within 0..64, got {self.max_distance}")
        if self.clip_threshold is not None and not -1.0 <= self.clip_threshold <= 1.0:
            raise ValueError(f"clip_threshold is a cosine similarity and must be within -1..1, got "
                             f"{self.clip_threshold}")


# --- phase 1: faces, NSFW and semantic duplicates (stages safety, semantic_dedup; phase 3's nsfw_targets) ---------


_DETECTOR_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DetectorConfig:
    """Settings of the face and NSFW detector (config section ``detector``); see docs/defaults.md."""

    enabled: bool = option(True, "Run the face and NSFW detector: phase 1's safety stage (people policy, NSFW check "
                                 "of the crawled photos) and phase 3's NSFW check of the renders. false: neither "
                                 "runs, whatever the people and nsfw sections say (renders keep the base model's "
                                 "safety checker).")
    model: str | None = option(None, "ONNX file of a NudeNet 3 detector (local, gs://, s3://); null: the 320n "
                                     "weights bundled in the nudenet wheel.")
    resolution: int = option(640, "Input size of the detector, in pixels (images are padded to a square and "
                                  "resized to it). Small faces need 640: at 320 a face under ~50 px is missed.")
    face_confirmation: bool = option(True, "Count a NudeNet face only where an OpenCV Haar cascade (frontal or "
                                           "profile) also finds one: NudeNet alone takes dog and toy faces for "
                                           "human faces.")
    batch_size: int = option(16, "Images per inference batch (clusters are batched whole, weighted by their "
                                 "image count).")
    min_batch_size: int | None = option(None, "Smallest batch Beam's adaptive batching may emit; null: equal to "
                                              "batch_size.")
    threads: int = option(1, "onnxruntime intra-op threads per worker process; 0: onnxruntime's default (all "
                             "cores). Dataflow runs one process per vCPU, so 1 uses the machine without "
                             "oversubscribing it.")
    device: str = option("cpu", "cpu, cuda (needs the onnxruntime-gpu package) or auto (CUDA when "
                                "onnxruntime offers it).")
    share_model_across_processes: bool = option(False, "One detector per worker machine shared by its processes "
                                                       "(Beam large_model); the 12 MB model rarely needs it.")

    def __post_init__(self) -> None:
        if not 64 <= self.resolution <= 2048 or self.resolution % 32:
            raise ValueError(f"resolution must be a multiple of 32 within 64..2048, got {self.resolution}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.min_batch_size is not None and not 1 <= self.min_batch_size <= self.batch_size:
            raise ValueError(f"min_batch_size must be within 1..batch_size ({self.batch_size}), "
                             f"got {self.min_batch_size}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.device not in _DETECTOR_DEVICES:
            raise ValueError(f"device must be one of {', '.join(_DETECTOR_DEVICES)}, got {self.device!r}")


PEOPLE_POLICIES = ("drop", "keep")


@dataclass(frozen=True)
class PeopleConfig:
    """People policy of the safety stage (config section ``people``); defaults and their sources in
    docs/defaults.md."""

    policy: str = option("drop", "drop: a cluster whose subject is a person (a prominent face in at least "
                                 "person_image_fraction of its images) leaves as person_subject; keep: it stays.")
    blur_incidental_faces: bool = option(True, "Blur faces that are not the cluster's subject in the stored "
                                               "images (the image id and phash become those of the blurred image).")
    min_face_score: float = option(0.55, "Smallest detector score of a face that counts (after Haar "
                                         "confirmation).")
    prominent_face_share: float = option(0.01, "A face whose box covers at least this share of the image area "
                                               "makes a person image (1%: a box a tenth of the image's side).")
    person_image_fraction: float = option(0.5, "A cluster is a person cluster when at least this share of its "
                                               "images are person images.")

    def __post_init__(self) -> None:
        if self.policy not in PEOPLE_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(PEOPLE_POLICIES)}, got {self.policy!r}")
        for name in ("min_face_score", "prominent_face_share", "person_image_fraction"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be within (0, 1], got {value}")

    @property
    def acts(self) -> bool:
        """Whether the policy changes anything: drops person clusters or blurs faces."""
        return self.policy == "drop" or self.blur_incidental_faces


NSFW_BINS = 10
"""The NSFW stages count scores in this many bins of equal width of 0..1 (counters ``nsfw_score_bin_K``), which
the report draws."""


@dataclass(frozen=True)
class NsfwConfig:
    """NSFW check of crawled photos and renders (config section ``nsfw``): one threshold per detector class,
    null to ignore the class; see docs/defaults.md."""

    enabled: bool = option(True, "Reject crawled photos (nsfw_input) and flag renders (nsfw) the detector scores "
                                 "at or over a class threshold.")
    female_breast_exposed: float | None = option(0.7, "Threshold of NudeNet's FEMALE_BREAST_EXPOSED.")
    female_genitalia_exposed: float | None = option(0.7, "Threshold of NudeNet's FEMALE_GENITALIA_EXPOSED.")
    male_genitalia_exposed: float | None = option(0.7, "Threshold of NudeNet's MALE_GENITALIA_EXPOSED.")
    buttocks_exposed: float | None = option(0.7, "Threshold of NudeNet's BUTTOCKS_EXPOSED.")
    anus_exposed: float | None = option(0.7, "Threshold of NudeNet's ANUS_EXPOSED.")

    def __post_init__(self) -> None:
        for label, value in self.thresholds().items():
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{label.lower()} must be within (0, 1] or null, got {value}")

    def thresholds(self) -> dict[str, float]:
        """``{detector class: threshold}`` of the classes checked."""
        names = [f.name for f in dataclasses.fields(self) if f.name != "enabled"]
        return {name.upper(): getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass(frozen=True)
class SemanticDedupConfig:
    """Settings of dataset-wide semantic dedup (config section ``semantic_dedup``); see docs/defaults.md."""

    enabled: bool = option(True, "Drop semantic duplicates across the dataset by CLIP embeddings (needs "
                                 "embed.enabled).")
    image_threshold: float | None = option(0.95, "Two images whose CLIP cosine similarity reaches this are one "
                                                 "picture; the lower-ranked copy leaves (semantic_duplicate_image). "
                                                 "null: no image level.")
    cluster_threshold: float | None = option(0.95, "Two clusters whose mean embeddings reach this cosine similarity "
                                                   "show the same subject; the lower-ranked leaves "
                                                   "(semantic_duplicate_cluster). null: no cluster level.")
    bucket_size: int = option(500, "Mean number of items per k-means bucket: k = ceil(items / bucket_size) "
                                   "centroids; pairs are compared only within a bucket.")
    max_centroids: int = option(4096, "Most k-means centroids (their float32 matrix is a side input of every "
                                      "worker: 12 MB at 4096 x 768).")
    sample_per_centroid: int = option(16, "Sample items per centroid for fitting k-means.")
    max_sample: int = option(32768, "Most items in the k-means sample (one element: 48 MB of float16 at 768 "
                                    "dimensions).")
    assignments: int = option(2, "Each item is compared in the buckets of its this many nearest centroids, so that "
                                 "duplicates on either side of a bucket boundary still meet (1: SemDeDup's single "
                                 "assignment, about 5% of duplicates missed; see docs/defaults.md).")
    max_bucket_items: int = option(2000, "A bucket with more items is split again by k-means (counted as "
                                          "semantic_dedup/split_buckets), up to 3 times, then compared in chunks "
                                          "of this size (semantic_dedup/hot_buckets).")
    kmeans_iterations: int = option(20, "Lloyd iterations of the k-means fit.")
    seed: int = option(0, "Seed of the k-means initialization.")

    def __post_init__(self) -> None:
        for name in ("image_threshold", "cluster_threshold"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} is a cosine similarity and must be within -1..1, got {value}")
        for name in ("bucket_size", "max_centroids", "sample_per_centroid", "kmeans_iterations", "assignments"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_sample < 2:
            raise ValueError(f"max_sample must be at least 2, got {self.max_sample}")
        if self.max_bucket_items < 2:
            raise ValueError(f"max_bucket_items must be at least 2, got {self.max_bucket_items}")


# --- phase 1: the model stages (captions, subjects, scene prompts) -----------------------------------------


def check_base_url(url: str) -> str:
    """Raise ``ValueError`` unless ``url`` is an absolute http(s) URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint must be an http:// or https:// URL with a host, got {url!r}")
    return url


@dataclass(frozen=True)
class LLMConfig:
    """How every model stage reaches its model (config section ``llm``); defaults in docs/defaults.md."""

    endpoint: str = option("", "Base URL of an existing OpenAI-compatible server (vLLM: http://HOST:8000/v1), "
                               "used by every stage whose own `endpoint` is empty. Empty: each worker starts "
                               "one vLLM server per model (needs the `vllm` extra and a GPU).")
    api_key_env: str = option("VLLM_API_KEY", "Environment variable holding the endpoint's API key, sent as a "
                                              "Bearer token (read on the workers, never stored in the config). "
                                              "Unset or empty: no key is sent.")
    request_timeout_s: float = option(120.0, "Deadline of one HTTP request, from connecting to the last byte "
                                             "of the answer. A request past it is abandoned and retried.")
    connect_timeout_s: float = option(10.0, "Deadline of opening the connection (within request_timeout_s).")
    max_retries: int = option(4, "Retries of one request after a connection error, a timeout, a broken "
                                 "answer, HTTP 429 or 5xx.")
    backoff_s: float = option(1.0, "Delay before the first retry; it doubles with every retry (with jitter).")
    backoff_max_s: float = option(60.0, "Longest delay between retries; also caps a server's Retry-After.")
    max_concurrency: int = option(16, "Requests in flight per worker process (vLLM batches them on the GPU).")
    validation_retries: int = option(2, "New attempts after a model answer fails validation (malformed JSON, "
                                        "wrong count, ...), each with the validation error fed back.")
    server_startup_timeout_s: float = option(1800.0, "How long a vLLM server started by a worker may take to "
                                                     "serve its model (download and load included).")
    server_args: dict[str, dict[str, Any]] = option(
        help="Extra arguments of the vLLM servers that workers start, per model id: "
             "{MODEL: {max-model-len: 8192, enforce-eager: true}} -> --max-model-len 8192 --enforce-eager.",
        factory=dict)
    accelerator: str = option("", "Beam accelerator resource hint put on the model stages when they start "
                                  "their own servers (Dataflow: 'type:nvidia-l4;count:1;install-nvidia-driver').")

    def __post_init__(self) -> None:
        if self.endpoint:
            check_base_url(self.endpoint)
        for name in ("request_timeout_s", "connect_timeout_s", "server_startup_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_retries < 0 or self.validation_retries < 0:
            raise ValueError("max_retries and validation_retries must be >= 0")
        if self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ValueError(f"need 0 <= backoff_s <= backoff_max_s, got {self.backoff_s}, {self.backoff_max_s}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        for model, args in self.server_args.items():
            if not isinstance(args, dict):
                raise ValueError(f"server_args[{model!r}] must be a mapping of vLLM arguments, got {args!r}")

    def base_url_for(self, stage_endpoint: str) -> str:
        """The endpoint a stage talks to: its own, else the shared one; empty: start a server."""
        return stage_endpoint or self.endpoint


ON_FAILURE = ("fallback", "reject")
"""``on_failure`` of a model stage: use the offline backend (recorded per cluster), or drop the cluster."""

STRUCTURED_OUTPUT_MODES = ("response_format", "structured_outputs", "guided_json", "none")
"""How a JSON schema reaches the server (``transforms.models.llm_client.json_schema_params``)."""

DEFAULT_VLM = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_TEXT_MODEL = "Qwen/Qwen2.5-7B-Instruct"


@dataclass(frozen=True)
class ModelStageConfig:
    """The keys every model stage's section has (``caption``, ``subject``, ``prompts``), and their checks.

    A stage's class names its ``section``, its ``backends`` (``vllm`` and its offline one), the ``defaults`` of
    ``model`` and ``prompt`` where they differ from these, and the words of these keys' help texts (``help_words``,
    filling the ``{...}`` below); :meth:`__init_subclass__` restates the keys on it with them. Its own keys follow
    these.
    """

    section: ClassVar[str] = ""
    backends: ClassVar[tuple[str, ...]] = ("vllm",)
    defaults: ClassVar[Mapping[str, Any]] = {}
    help_words: ClassVar[Mapping[str, str]] = {}

    enabled: bool = option(True, "Run the stage (off: {off}).")
    backend: str = option("vllm", "vllm: a {model} through vLLM's OpenAI-compatible API{answer}; {offline}: "
                                  "{offline_help}, no model.")
    on_failure: str = option("fallback", "When {failure}: fallback ({fallback}, recorded in provenance.fallbacks) "
                                         "or reject ({reject}).")
    model: str = option(DEFAULT_TEXT_MODEL, "{Model} id served by vLLM.")
    endpoint: str = option("", "OpenAI-compatible API root for this stage (http://HOST:8000/v1); empty: "
                               "llm.endpoint, else a vLLM server started on each worker.")
    prompt: str = option("", "Instruction file: one in transforms/llm_prompts/ or any path (gs://...); its name "
                             "and hash are recorded per cluster.")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "help_words" not in cls.__dict__:  # an intermediate base (JsonModelStageConfig)
            return
        offline = next(backend for backend in cls.backends if backend != "vllm")
        words = {**cls.help_words, "offline": offline, "Model": cls.help_words["model"].capitalize()}
        # Restated before @dataclass reads the class: the same keys, in the same places, with this stage's
        # defaults and help.
        shared = {}
        for f in dataclasses.fields(ModelStageConfig):
            shared[f.name] = ModelStageConfig.__annotations__[f.name]
            setattr(cls, f.name, option(cls.defaults.get(f.name, f.default), f.metadata["help"].format_map(words)))
        cls.__annotations__ = {**shared, **cls.__dict__.get("__annotations__", {})}

    def __post_init__(self) -> None:
        if self.backend not in self.backends:
            raise ValueError(f"backend must be one of {', '.join(self.backends)}, got {self.backend!r}")
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {', '.join(ON_FAILURE)}, got {self.on_failure!r}")
        if self.backend == "vllm" and not self.model:
            raise ValueError(f"{self.section}.model is required with backend vllm")
        if self.endpoint:
            check_base_url(self.endpoint)
        batch_size = getattr(self, "batch_size", 1)  # every stage has one, after its own keys
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")


@dataclass(frozen=True)
class JsonModelStageConfig(ModelStageConfig):
    """A model stage whose model answers JSON under a schema (``subject``, ``prompts``)."""

    structured_output: str = option("response_format", "How the JSON schema is sent: response_format (OpenAI "
                                                       "json_schema, vLLM >= 0.6), structured_outputs (vLLM >= "
                                                       "0.10), guided_json (vLLM < 0.12) or none (prompt only).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.structured_output not in STRUCTURED_OUTPUT_MODES:
            raise ValueError(f"structured_output must be one of {', '.join(STRUCTURED_OUTPUT_MODES)}, "
                             f"got {self.structured_output!r}")


@dataclass(frozen=True)
class CaptionConfig(ModelStageConfig):
    """Settings of the caption stage (config section ``caption``); defaults justified in docs/defaults.md."""

    section: ClassVar[str] = "caption"
    backends: ClassVar[tuple[str, ...]] = ("alt_text", "vllm")
    defaults: ClassVar[Mapping[str, Any]] = {"model": DEFAULT_VLM, "prompt": "caption_v1.txt"}
    help_words: ClassVar[Mapping[str, str]] = {
        "off": "captions stay empty", "model": "vision-language model", "answer": "",
        "offline_help": "the cleaned alt text", "failure": "the model fails on an image after every retry",
        "fallback": "the whole cluster gets cleaned alt text", "reject": "the cluster is dropped as caption_failed"}

    max_tokens: int = option(120, "Longest caption the model may generate, in tokens.")
    temperature: float = option(0.0, "Sampling temperature (0: greedy, reproducible captions).")
    min_chars: int = option(10, "Shorter model captions are invalid (asked again).")
    max_chars: int = option(400, "Longer model captions are invalid (asked again); cleaned alt text is cut at a "
                                 "word boundary to this length.")
    batch_size: int = option(8, "Clusters per RunInference batch; their images are captioned concurrently.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.min_chars <= self.max_chars:
            raise ValueError(f"need 1 <= min_chars <= max_chars, got {self.min_chars}, {self.max_chars}")
        if self.max_tokens < 1 or not 0 <= self.temperature <= 2:
            raise ValueError("max_tokens must be positive and temperature within 0..2")


MIN_SHARE = 1 / 3
"""Default share of the images with text that must name a class the slug does not name (``transforms/naming.py``):
on a page whose texts wander (a blog post, a listing), two images of nine mentioning a "table" do not make it the
subject."""


@dataclass(frozen=True)
class SubjectConfig(JsonModelStageConfig):
    """Settings of the subject stage (config section ``subject``); defaults justified in docs/defaults.md."""

    section: ClassVar[str] = "subject"
    backends: ClassVar[tuple[str, ...]] = ("offline", "vllm")
    defaults: ClassVar[Mapping[str, Any]] = {"prompt": "subject_v1.txt"}
    help_words: ClassVar[Mapping[str, str]] = {
        "off": "subject, class_noun and is_live stay empty", "model": "text model", "answer": ", JSON output",
        "offline_help": "the URL slug and the cleaned texts' phrases against a class lexicon",
        "failure": "the model's answer stays invalid or the calls fail", "fallback": "the offline backend",
        "reject": "subject_failed"}

    max_tokens: int = option(4096, "Longest answer, in tokens (one rewritten caption per image plus the subject).")
    temperature: float = option(0.0, "Sampling temperature.")
    max_subject_words: int = option(12, "Longest valid subject phrase, in words.")
    max_class_noun_words: int = option(3, "Longest valid class noun, in words (\"stuffed animal\": 2).")
    max_caption_chars: int = option(400, "Longest valid rewritten caption, in characters.")
    require_class_noun: bool = option(True, "A rewritten caption must name the class noun (consistent naming).")
    min_support: int = option(2, "Offline backend: a class the URL slug does not name must be named in the texts of "
                                 "at least this many images of the cluster.")
    min_share: float = option(MIN_SHARE, "Offline backend: ... and in at least this share of its images with text.")
    batch_size: int = option(16, "Clusters per RunInference batch (their requests run concurrently).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.max_subject_words, self.max_class_noun_words, self.max_caption_chars, self.min_support,
               self.max_tokens) < 1:
            raise ValueError("max_subject_words, max_class_noun_words, max_caption_chars, min_support and "
                             "max_tokens must be positive")
        if not 0 <= self.min_share <= 1:
            raise ValueError(f"min_share must be within 0..1, got {self.min_share}")


PLACEHOLDER = "{subject}"
"""What every scene prompt holds once, for the subject phrase."""

SKILLS = ("stylization", "recontextualization", "novel_view", "property_change", "accessorization",
          "emotion_action")
"""The skill taxonomy, in the order prompts are listed."""

DEFAULT_MIX = {"stylization": 0.25, "recontextualization": 0.30, "novel_view": 0.10, "property_change": 0.15,
               "accessorization": 0.10, "emotion_action": 0.10}


def check_mix(mix: Mapping[str, float]) -> None:
    unknown = sorted(set(mix) - set(SKILLS))
    if unknown:
        raise ValueError(f"mix: unknown skill(s) {', '.join(unknown)}; skills: {', '.join(SKILLS)}")
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError("mix: weights must be >= 0 and not all 0")


@dataclass(frozen=True)
class PromptsConfig(JsonModelStageConfig):
    """Settings of the scene-prompt stage (config section ``prompts``); defaults justified in docs/defaults.md."""

    section: ClassVar[str] = "prompts"
    backends: ClassVar[tuple[str, ...]] = ("templates", "vllm")
    defaults: ClassVar[Mapping[str, Any]] = {"prompt": "prompts_v1.txt"}
    help_words: ClassVar[Mapping[str, str]] = {
        "off": "clusters get no prompts", "model": "text model", "answer": ", JSON output",
        "offline_help": "the skill-template grammar", "failure": "the model's prompts stay invalid or the calls fail",
        "fallback": "the templates", "reject": "prompts_failed"}

    max_tokens: int = option(2048, "Longest answer, in tokens.")
    temperature: float = option(0.8, "Sampling temperature: varied prompts need some; the request's seed comes "
                                     "from the cluster id, so a rerun on the same server asks the same way.")
    n: int = option(8, "Prompts per cluster.")
    mix: dict[str, float] = option(help="Share of each skill among a cluster's prompts (normalized; skills a "
                                        "subject cannot have are left out and the rest renormalized).",
                                   factory=lambda: dict(DEFAULT_MIX))
    accessorize_objects: bool = option(False, "Give objects accessorization prompts too (decorations, wrappings).")
    min_chars: int = option(12, "Shortest valid prompt, in characters (with the placeholder).")
    max_chars: int = option(160, "Longest valid prompt, in characters (CLIP's text encoder reads 77 tokens).")
    max_similarity: float = option(0.6, "Two prompts of a cluster whose content words have a Jaccard similarity "
                                        "at least this high are near-duplicates (invalid).")
    batch_size: int = option(16, "Clusters per RunInference batch (their requests run concurrently).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_mix(self.mix)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not len(PLACEHOLDER) < self.min_chars <= self.max_chars:
            raise ValueError(f"need {len(PLACEHOLDER)} < min_chars <= max_chars, got {self.min_chars}, "
                             f"{self.max_chars}")
        if not 0 < self.max_similarity <= 1:
            raise ValueError(f"max_similarity must be within (0, 1], got {self.max_similarity}")


# --- phase outputs ------------------------------------------------------------------------------------------


_CODECS = ("none", "snappy", "gzip", "brotli", "lz4", "zstd")


@dataclass(frozen=True)
class OutputConfig:
    """How outputs are written (config section ``output``)."""

    num_shards: int = option(0, "Files per output; 0 sizes them by bytes (shard_bytes).")
    shard_bytes: int = option(512 * 1024 * 1024, "Target size of one output file when num_shards is 0.")
    row_group_bytes: int = option(64 * 1024 * 1024, "Target size of one Parquet row group (at least one row): "
                                                    "what a reader holds in memory at a time, and the largest "
                                                    "element the writer builds.")
    codec: str = option("zstd", f"Parquet compression codec: {', '.join(_CODECS)}. Images are already "
                                "compressed; the codec matters for text and ids.")

    def __post_init__(self) -> None:
        if self.num_shards < 0:
            raise ValueError(f"num_shards must be >= 0, got {self.num_shards}")
        if self.shard_bytes < 1 or self.row_group_bytes < 1:
            raise ValueError("shard_bytes and row_group_bytes must be positive")
        if self.row_group_bytes > self.shard_bytes:
            raise ValueError(f"row_group_bytes ({self.row_group_bytes}) must not exceed shard_bytes "
                             f"({self.shard_bytes})")
        if self.codec not in _CODECS:
            raise ValueError(f"codec must be one of {', '.join(_CODECS)}, got {self.codec!r}")


# --- phase 2: synthesis -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthConfig:
    """Settings of synthesis (config section ``synth``); defaults justified in docs/defaults.md."""

    model: ModelConfig = option(factory=ModelConfig, help="The base model.")
    train: TrainConfig = option(factory=TrainConfig, help="DreamBooth training per cluster.")
    sample: SampleConfig = option(factory=SampleConfig, help="Rendering of the cluster's prompts.")
    speed: SpeedConfig = option(factory=SpeedConfig, help="Speed switches (cost, not results: left out of the "
                                                          "resume-cache key).")
    max_prompts: int = option(0, "Render at most this many prompts per cluster, in the cluster's order "
                                 "(0: all of them).")
    fallback_prompts: int = option(6, "Clusters that reach phase 2 without prompts (the prompts stage was off "
                                      "or left them empty) get this many from the prompts stage's template "
                                      "grammar (transforms/scene_templates.py), deterministic per cluster.")
    cache_dir: str = option("", "Resume cache of finished clusters (and the shared prior-preservation class "
                                "images); any Beam file system path. Empty: OUT/cache/synthesize.")
    overwrite: bool = option(False, "Redo clusters already in the cache (default: a rerun reuses them).")
    accelerator: str = option("", "Beam accelerator resource hint of the synthesis step, for example "
                                  "type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver "
                                  "(Dataflow). Empty: none.")
    require_gpu: bool = option(False, "Fail at worker start-up when no CUDA device is visible (always on when "
                                      "accelerator is set): a GPU job must not crawl along on CPUs.")

    def __post_init__(self) -> None:
        if self.max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0, got {self.max_prompts}")
        if self.fallback_prompts < 1:
            raise ValueError(f"fallback_prompts must be at least 1, got {self.fallback_prompts}")
        self.speed.check(self.train)

    @property
    def needs_gpu(self) -> bool:
        return self.require_gpu or bool(self.accelerator.strip())


# --- phase 3: scoring, filtering, assembling ---------------------------------------------------------------


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of target scoring (config section ``score``); the CLIP model is the ``embed`` section's."""

    reuse_embeddings: bool = option(True, "Use the real images' embeddings stored in clusters/ when they were made "
                                          "by the model that scores (provenance.embed_model); otherwise (or "
                                          "false) compute them in phase 3.")
    sharpness_side: int = option(256, "Sharpness (variance of the Laplacian) is measured on the luma downscaled "
                                      "to at most this many pixels a side, so that it does not depend on the "
                                      "render resolution.")

    def __post_init__(self) -> None:
        if self.sharpness_side < 16:
            raise ValueError(f"sharpness_side must be at least 16, got {self.sharpness_side}")


@dataclass(frozen=True)
class TargetFilterConfig:
    """Bounds of the target filter (config section ``target_filter``); see docs/defaults.md."""

    target_keep_rate: float | None = option(0.25, "Calibrate the two similarity bounds on this run so that at most "
                                                  "this share of the scored candidates is kept (0 < rate <= 1), "
                                                  "never under min_subject_sim and min_text_sim (their floors); "
                                                  "null: use min_subject_sim and min_text_sim as they are.")
    min_subject_sim: float | None = option(0.7, "Smallest mean CLIP image similarity of a target to its cluster's "
                                                "real images (subject_not_preserved); with target_keep_rate, the "
                                                "floor under the calibrated bound. null: no bound.")
    min_text_sim: float | None = option(0.25, "Smallest CLIP image-text similarity of a target to its prompt "
                                              "(prompt_not_followed); with target_keep_rate, the floor under the "
                                              "calibrated bound. null: no bound.")
    max_copy_sim: float | None = option(0.95, "A target whose CLIP similarity to a real image of its cluster "
                                              "reaches this is a copy of it (copy_clip); null: no check.")
    max_copy_distance: int | None = option(10, "A target within this many bits (64-bit pHash) of a real image of "
                                               "its cluster is a copy of it (copy_phash); null: no check.")
    min_side: int = option(256, "Shorter side, in pixels, a target must have (target_too_small).")
    min_contrast: float | None = option(0.03, "Smallest standard deviation of the luma (0..0.5); under it the "
                                              "image is blank or near uniform (blank_image). null: no check.")
    min_brightness: float | None = option(0.04, "Smallest mean luma (0..1) (too_dark); null: no check.")
    max_brightness: float | None = option(0.96, "Largest mean luma (0..1) (too_bright); null: no check.")
    min_sharpness: float | None = option(25.0, "Smallest variance of the Laplacian of the luma (blurry); null: no "
                                               "check.")
    drop_nsfw: bool = option(True, "Reject targets the base model's safety checker flagged (nsfw).")

    def __post_init__(self) -> None:
        if self.target_keep_rate is not None and not 0.0 < self.target_keep_rate <= 1.0:
            raise ValueError(f"target_keep_rate must be within (0, 1], got {self.target_keep_rate}")
        for name in ("min_subject_sim", "min_text_sim", "max_copy_sim"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} is a cosine similarity and must be within -1..1, got {value}")
        if self.max_copy_distance is not None and not 0 <= self.max_copy_distance <= 64:
            raise ValueError(f"max_copy_distance must be within 0..64 bits, got {self.max_copy_distance}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be at least 1, got {self.min_side}")
        for name in ("min_contrast", "min_brightness", "max_brightness"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {value}")
        if (self.min_brightness is not None and self.max_brightness is not None
                and self.min_brightness >= self.max_brightness):
            raise ValueError(f"min_brightness ({self.min_brightness}) must be under max_brightness "
                             f"({self.max_brightness})")
        if self.min_sharpness is not None and self.min_sharpness < 0:
            raise ValueError(f"min_sharpness must be >= 0, got {self.min_sharpness}")


@dataclass(frozen=True)
class AssembleConfig:
    """Settings of example assembly (config section ``assemble``); see docs/defaults.md."""

    demos: int = option(3, "Real demonstrations per example.")
    min_demos: int = option(3, "Fewest demos an example may have when its cluster has fewer than `demos` images "
                               "besides the target's source; under it the target is rejected (too_few_demos).")
    clusters: str = option("", "Glob of the clusters files the candidates were made from (any Beam file system "
                               "path); empty: OUT/clusters/*.parquet.")
    shard_bytes: int = option(512 * 1024 * 1024, "Target size of one examples/ file; the number of files is the "
                                                 "total size divided by this, rounded up.")
    row_group_bytes: int = option(64 * 1024 * 1024, "Target size of one Parquet row group (at least one row): "
                                                    "what a streaming reader holds in memory at a time.")
    def __post_init__(self) -> None:
        if self.demos < 1:
            raise ValueError(f"demos must be at least 1, got {self.demos}")
        if not 1 <= self.min_demos <= self.demos:
            raise ValueError(f"min_demos must be within 1..demos ({self.demos}), got {self.min_demos}")
        if self.shard_bytes < 1 or self.row_group_bytes < 1:
            raise ValueError("shard_bytes and row_group_bytes must be positive")
        if self.row_group_bytes > self.shard_bytes:
            raise ValueError(f"row_group_bytes ({self.row_group_bytes}) must not exceed shard_bytes "
                             f"({self.shard_bytes})")
