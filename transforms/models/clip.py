"""The CLIP model boundary: open_clip models resolved, loaded and run through Beam ``RunInference``.

Used by the embed stage (image embeddings of every cluster), by decontamination (the evaluation images) and by
phase 3's scoring (targets, real images and prompts in one pass). Pieces:

* Resolution without weights (:func:`preprocess_config`, :func:`check_model_config`, :func:`model_id`): what the
  configured model is and how its images are preprocessed, checked before a job starts.
* Loading (:func:`load_image_encoder`): the model built with ``open_clip`` from the config (a real architecture
  with a pretrained tag, a local or ``gs://`` checkpoint, or the ``tiny-random`` preset), on CUDA with autocast
  (bf16/fp16) when available and on CPU otherwise, wrapped in a :class:`ClipImageEncoder`.
* Preprocessing (:func:`decode_image`, :func:`image_transform`): normalized image bytes -> the model's eval
  transform, done where the images are (before batching).
* Handlers: :class:`OpenClipImageHandler` -- examples are :class:`ImagePixels` (an opaque key and ``n`` float
  tensors ``[3, H, W]``), predictions ``PredictionResult(example, float32 [n, D])`` with unit-length rows;
  :class:`OpenClipImageTextHandler` -- :class:`ImagesAndTexts`, one image pass and one text pass per batch.
  ``embed.share_model_across_processes`` keeps one copy per worker machine (Beam's ``large_model``) instead of
  one per process. Both batch by image count (``element_size_fn``), so a batch holds at most ``embed.batch_size``
  images and a key's images are never split.

``tiny-random`` is an open_clip ``CLIP`` of the same classes as ViT-B-32 (vision transformer, patch 32,
224 px, text transformer with the real BPE vocabulary) with 2 layers of width 64, initialized from a
fixed seed: every worker process builds bit-identical weights without downloading anything. It is
registered at load time through open_clip's ``local-dir:`` schema (a config file in a temporary folder),
so open_clip's global model registry is left alone. Its embeddings are real computations of a random
network: deterministic, but their similarities mean nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from PIL import Image

from transforms.models.coders import PickledArraysCoder
from transforms.settings import TINY_RANDOM, EmbedConfig

LOG = logging.getLogger(__name__)

METRICS_NAMESPACE = "embed"
"""Beam metrics namespace of the image inference steps: the embed stage's (also when decontamination runs one)."""


TINY_RANDOM_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
"""open_clip model config of ``tiny-random`` (the layout of ``ViT-B-32.json``, shrunk)."""


class ModelWeightsUnavailable(RuntimeError):
    """The pretrained weights named in the config could not be fetched."""


# --- model resolution (no weights touched) --------------------------------------------------------------


def model_architecture(config: EmbedConfig) -> dict[str, Any]:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) of ``config.model``."""
    if config.model == TINY_RANDOM:
        return json.loads(json.dumps(TINY_RANDOM_CONFIG))
    import open_clip

    architecture = open_clip.get_model_config(config.model)
    if architecture is None:
        close = [name for name in open_clip.list_models() if config.model.lower() in name.lower()][:8]
        raise ValueError(f"embed.model: unknown open_clip architecture {config.model!r}"
                         + (f" (similar: {', '.join(close)})" if close else "")
                         + f"; see open_clip.list_models(), or use {TINY_RANDOM!r}")
    return architecture


def pretrained_config(config: EmbedConfig) -> dict[str, Any]:
    """open_clip's record of ``config.pretrained`` for ``config.model`` ({} without a tag)."""
    if not config.pretrained:
        return {}
    import open_clip

    record = open_clip.get_pretrained_cfg(config.model, config.pretrained)
    if not record:
        tags = open_clip.list_pretrained_tags_by_model(config.model)
        raise ValueError(f"embed.pretrained: {config.pretrained!r} is not an open_clip pretrained tag of "
                         f"{config.model}; known tags: {', '.join(tags) or 'none'} (or null for random weights, "
                         f"or embed.checkpoint for a file)")
    return dict(record)


def preprocess_config(config: EmbedConfig) -> dict[str, Any]:
    """The eval preprocessing of the configured model (size, mean, std, interpolation, resize mode).

    Resolved the way ``open_clip.create_model`` resolves it -- defaults, then the pretrained tag's
    values, then the vision tower's input size -- without building the model, so that preprocessing
    can run in its own step. :func:`load_image_encoder` checks that the model agrees.
    """
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    size = model_architecture(config)["vision_cfg"]["image_size"]
    merged = merge_preprocess_dict(PreprocessCfg(), pretrained_config(config))
    merged["size"] = size
    return merged


def check_model_config(config: EmbedConfig) -> None:
    """Raise ``ValueError`` if the model name or pretrained tag is unknown (cheap: reads no weights)."""
    preprocess_config(config)


def model_id(config: EmbedConfig) -> str:
    """A readable id of the model the config loads (recorded with each prediction)."""
    weights = config.checkpoint or config.pretrained or f"random(seed={config.seed})"
    return f"open_clip:{config.model}/{weights}"


def config_digest(config: EmbedConfig) -> str:
    """A short hash of every embed setting: steps with the same digest share one loaded model."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- loading ------------------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("embed.device is cuda but no CUDA device is visible to this worker")
    return device


def resolve_precision(precision: str, device: str) -> Any:
    """The autocast dtype for ``precision`` on ``device`` (``None``: plain fp32)."""
    import torch

    if precision == "auto":
        if device != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class ClipImageEncoder:
    """A loaded open_clip model with its device and autocast dtype.

    :meth:`embed` is the one call the handler makes, so that when the model lives in a shared process
    (``share_model_across_processes``) the whole step -- device transfer, autocast, normalization --
    runs there and only CPU tensors and numpy arrays cross the process boundary.
    """

    def __init__(self, model: Any, device: str, autocast_dtype: Any, model_id: str, tokenizer: Any = None) -> None:
        self.model = model
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.model_id = model_id
        self.tokenizer = tokenizer

    def embed(self, pixels: Any) -> np.ndarray:
        """``[n, 3, H, W]`` preprocessed pixels -> ``float32 [n, D]`` unit-length embeddings."""
        import torch
        import torch.nn.functional as F

        autocast = (torch.autocast(device_type=self.device, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            features = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        # Normalize in fp32: a bf16 norm would cost two decimal digits of every cosine similarity.
        return F.normalize(features.float(), dim=-1).cpu().numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> ``float32 [n, D]`` unit-length text embeddings (tokenized with the model's tokenizer,
        truncated to its context length)."""
        import torch
        import torch.nn.functional as F

        if self.tokenizer is None:
            raise RuntimeError("this encoder was loaded without its tokenizer (load_image_encoder(..., text=True))")
        tokens = self.tokenizer(list(texts))
        autocast = (torch.autocast(device_type=self.device, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            features = self.model.encode_text(tokens.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1).cpu().numpy()


def _local_checkpoint(path: str, folder: str) -> str:
    """``path`` itself when local, else a copy in ``folder`` read through Beam FileSystems."""
    if "://" not in path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"embed.checkpoint {path} does not exist")
        return path
    from apache_beam.io.filesystems import FileSystems

    local = os.path.join(folder, os.path.basename(path.rstrip("/")) or "checkpoint.bin")
    with FileSystems.open(path) as source, open(local, "wb") as target:
        while chunk := source.read(64 << 20):
            target.write(chunk)
    return local


def _fetch_pretrained(config: EmbedConfig, record: dict[str, Any]) -> str:
    import open_clip

    source = record.get("hf_hub") or record.get("url") or "?"
    try:
        path = open_clip.download_pretrained(record)
    except Exception as error:  # noqa: BLE001 -- every failure to fetch means the same thing to the user
        raise ModelWeightsUnavailable(
            f"could not fetch the pretrained weights of {config.model} / {config.pretrained} from {source}: "
            f"{error}. If this machine is offline, download them where there is network access (for example "
            f"open_clip.create_model({config.model!r}, pretrained={config.pretrained!r}) saves them in the "
            f"Hugging Face cache) and point the pipeline at the file with "
            f"--set embed.checkpoint=/path/to/open_clip_pytorch_model.bin (a local, gs:// or s3:// path; keep "
            f"embed.pretrained={config.pretrained} for its preprocessing), or copy the Hugging Face cache to "
            f"the workers and set HF_HUB_OFFLINE=1.") from error
    if not path:
        raise ModelWeightsUnavailable(f"open_clip has no download location for {config.model} / "
                                      f"{config.pretrained}; set embed.checkpoint to a local file")
    return path


def _create_model(config: EmbedConfig, folder: str) -> Any:
    import open_clip

    record = pretrained_config(config)
    if config.checkpoint:
        weights = _local_checkpoint(config.checkpoint, folder)
    elif record:
        weights = _fetch_pretrained(config, record)
    else:
        weights = None
    if config.model == TINY_RANDOM:
        # Registered through a local-dir config rather than open_clip.add_model_config, which would change
        # a registry global of the worker process. (open_clip logs that it found no weights there: true.)
        model_dir = os.path.join(folder, "tiny-random")
        os.makedirs(model_dir)
        with open(os.path.join(model_dir, "open_clip_config.json"), "w", encoding="utf-8") as handle:
            json.dump({"model_cfg": TINY_RANDOM_CONFIG, "preprocess_cfg": {}}, handle)
        model = open_clip.create_model(f"local-dir:{model_dir}")
        if weights:
            open_clip.load_checkpoint(model, weights, strict=True)
        return model
    # Weights go in as a file, so open_clip does not see the tag: its preprocessing and activation come
    # from the tag's record here (QuickGELU for OpenAI's weights, which open_clip itself only warns about).
    force_preprocess = {key: record[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in record}
    return open_clip.create_model(config.model, pretrained=weights, force_quick_gelu=bool(record.get("quick_gelu")),
                                  force_preprocess_cfg=force_preprocess or None)


def load_tokenizer(config: EmbedConfig) -> Any:
    """The configured model's text tokenizer (open_clip's; ``tiny-random`` uses CLIP's BPE tokenizer, whose
    vocabulary ships inside open_clip, so no download is needed)."""
    import open_clip

    context_length = model_architecture(config)["text_cfg"].get("context_length", 77)
    if config.model == TINY_RANDOM:
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer(context_length=context_length)
    return open_clip.get_tokenizer(config.model, context_length=context_length)


def load_image_encoder(config: EmbedConfig, text: bool = False) -> ClipImageEncoder:
    """Build the configured model, in eval mode on its device (see the module docstring); with ``text``, also
    its tokenizer, for :meth:`ClipImageEncoder.embed_texts`."""
    import torch

    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    if device == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)  # a process-wide setting: this process is the worker
    with tempfile.TemporaryDirectory(prefix="icl-clip-") as folder, torch.random.fork_rng(devices=[]):
        # The seed decides random weights only; fork_rng keeps the caller's RNG state untouched.
        torch.manual_seed(config.seed)
        model = _create_model(config, folder)
    model.eval().to(device)
    expected = preprocess_config(config)
    actual = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    mismatched = {key: (expected[key], actual.get(key)) for key in expected
                  if key in actual and _plain(key, actual[key]) != _plain(key, expected[key])}
    if mismatched:
        raise RuntimeError(f"open_clip built {config.model} with preprocessing {mismatched} (expected, actual) "
                           f"that differs from what the embed stage applies; this is a bug")
    random = "; random weights: its similarities mean nothing" if not (config.checkpoint or config.pretrained) else ""
    LOG.info("embed: loaded %s on %s (%s%s)", model_id(config), device, dtype or "fp32", random)
    return ClipImageEncoder(model, device, dtype, model_id(config), load_tokenizer(config) if text else None)


def _plain(key: str, value: Any) -> Any:
    if key == "size" and isinstance(value, int):
        return [value, value]
    return list(value) if isinstance(value, (list, tuple)) else value


def decode_image(data: bytes) -> Image.Image:
    """Normalized image bytes -> RGB PIL image (raises what Pillow raises on bad bytes)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


class PixelTransform:
    """open_clip's eval transform with its last two steps (``ToTensor``, ``Normalize``) done in numpy.

    The geometric steps (resize, centre crop, RGB) are open_clip's own, on the PIL image. The two tensor
    steps are the same float32 arithmetic (``x / 255``, then ``(x - mean) / std``) in numpy: torch runs them
    with its intra-op thread pool, whose start-up costs more than the work on one 224 px image (4x slower on
    a 2-core worker that also runs the model). ``tests/test_embed.py`` checks that both agree.
    """

    def __init__(self, geometric: Callable[[Image.Image], Image.Image], mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.geometric = geometric
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, image: Image.Image) -> Any:
        import torch

        pixels = np.asarray(self.geometric(image), dtype=np.float32) / np.float32(255)
        pixels = (pixels - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def stack_pixels(images: Sequence[Any]) -> Any:
    """``n`` CPU tensors ``[3, H, W]`` -> one ``[n, 3, H, W]`` tensor, stacked by numpy: ``torch.stack`` runs on
    torch's intra-op thread pool, which costs several times the copy on a busy 2-core worker (12 ms alone, 57 ms
    with 2 threads, 200 ms under load for a batch of 32 at 224 px; numpy: 6 ms)."""
    import torch

    if all(image.device.type == "cpu" for image in images):
        return torch.from_numpy(np.stack([image.numpy() for image in images]))
    return torch.stack(list(images))


def open_clip_transform(config: EmbedConfig) -> Callable[[Image.Image], Any]:
    """open_clip's own eval transform of the configured model (PIL RGB image -> float tensor ``[3, H, W]``)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**preprocess_config(config)), is_train=False)


def image_transform(config: EmbedConfig) -> Callable[[Image.Image], Any]:
    """The model's eval transform: PIL RGB image -> float tensor ``[3, H, W]`` (see :class:`PixelTransform`)."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    full = open_clip_transform(config)
    steps = list(getattr(full, "transforms", []))
    if len(steps) >= 2 and isinstance(steps[-2], ToTensor) and isinstance(steps[-1], Normalize):
        return PixelTransform(Compose(steps[:-2]), steps[-1].mean, steps[-1].std)
    return full  # a layout we do not know: open_clip's transform as it is


# --- the model handler ------------------------------------------------------------------------------------


class ImagePixels(NamedTuple):
    """One example of :class:`OpenClipImageHandler`: preprocessed images and what they belong to."""

    key: Any
    """Returned untouched with the embeddings (the stage passes the cluster)."""
    pixels: tuple[Any, ...]
    """``n`` >= 1 tensors ``float32 [3, H, W]``: the images after the model's eval transform. Kept apart
    (not stacked per cluster) so that a batch is assembled with one copy, as a plain loop would."""


class ImagePixelsCoder(PickledArraysCoder):
    """Coder of :class:`ImagePixels`: pickles them, and estimates their size from the tensors' sizes.

    ``ImagePixels`` rarely leave the fused step that makes and embeds them, but Beam samples the byte size
    of elements of every PCollection for its metrics, and with the default pickle coder it would pickle a whole
    batch (40 MB of pixels at 64 images) to measure it.
    """

    value_type = ImagePixels

    def arrays(self, value: ImagePixels) -> Iterable[Any]:
        return value.pixels


beam.coders.registry.register_coder(ImagePixels, ImagePixelsCoder)


def image_count(example: ImagePixels) -> int:
    """Batch weight of an example: its number of images."""
    return len(example.pixels)


class OpenClipImageHandler(ModelHandler[ImagePixels, PredictionResult, ClipImageEncoder]):
    """``ImagePixels`` -> ``PredictionResult(example, float32 [n, D] unit rows, model_id)``."""

    namespace = METRICS_NAMESPACE
    """Beam metrics namespace of the inference step."""
    with_text = False
    """Load the tokenizer and text tower too."""

    def __init__(self, config: EmbedConfig) -> None:
        super().__init__(
            min_batch_size=config.min_batch_size or config.batch_size,
            max_batch_size=config.batch_size,
            element_size_fn=type(self).batch_weight,
            large_model=config.share_model_across_processes,
        )
        self._config = config

    @staticmethod
    def batch_weight(example: ImagePixels) -> int:
        return image_count(example)

    def load_model(self) -> ClipImageEncoder:
        return load_image_encoder(self._config, text=self.with_text)

    def run_inference(self, batch: Sequence[ImagePixels], model: ClipImageEncoder,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:

        if not batch:
            # BatchElements emits an empty batch when one element outweighs the whole target (a cluster with
            # more images than batch_size arriving first): nothing to do.
            return []
        embeddings = model.embed(stack_pixels([image for example in batch for image in example.pixels]))
        results, start = [], 0
        for example in batch:
            n = image_count(example)
            # The pixels have served: the example goes on without them (they would only cost memory, and
            # pickling when Beam samples the size of the results).
            results.append(PredictionResult(example._replace(pixels=()), embeddings[start:start + n],
                                            model_id(self._config)))
            start += n
        return results

    def get_num_bytes(self, batch: Sequence[ImagePixels]) -> int:
        # Beam's default pickles the whole batch to measure it: megabytes of pixels per batch, for a metric.
        return sum(int(image.nbytes) for example in batch for image in example.pixels)

    def get_metrics_namespace(self) -> str:
        return self.namespace

    def get_resource_hints(self) -> dict[str, Any]:
        return {"accelerator": self._config.accelerator} if self._config.accelerator else {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({model_id(self._config)}, batch_size={self._config.batch_size})"


def embed_inference(config: EmbedConfig) -> RunInference:
    """``RunInference`` with :class:`OpenClipImageHandler`; steps with the same config share the model."""
    return RunInference(OpenClipImageHandler(config), model_identifier=f"icl-clip-{config_digest(config)}")


# --- images and texts in one pass (phase 3 scoring) ---------------------------------------------------------


class ImagesAndTexts(NamedTuple):
    """One example of :class:`OpenClipImageTextHandler`: preprocessed images and texts of one key."""

    key: Any
    """Returned untouched with the embeddings."""
    pixels: tuple[Any, ...]
    """Tensors ``float32 [3, H, W]`` after the model's eval transform (may be empty)."""
    texts: tuple[str, ...]
    """Texts to embed (may be empty); tokenized by the handler's model."""


class ImagesAndTextsCoder(ImagePixelsCoder):
    """:class:`ImagesAndTexts` pickled, with a size estimate from the tensors (see :class:`ImagePixelsCoder`)."""

    def estimate_size(self, value: ImagesAndTexts) -> int:
        return 64 + sum(int(image.nbytes) for image in value.pixels) + sum(len(text) for text in value.texts)

    def to_type_hint(self) -> type:
        return ImagesAndTexts


beam.coders.registry.register_coder(ImagesAndTexts, ImagesAndTextsCoder)


def images_and_texts_count(example: ImagesAndTexts) -> int:
    """Batch weight of an example: its images (a text costs a small fraction of an image)."""
    return max(1, len(example.pixels))


class OpenClipImageTextHandler(OpenClipImageHandler):
    """``ImagesAndTexts`` -> ``PredictionResult(example, (float32 [n, D] image rows, float32 [t, D] text rows),
    model_id)``, all unit length; the same model (and settings) as :class:`OpenClipImageHandler`, loaded with
    its tokenizer. A batch is one image forward pass and one text forward pass."""

    namespace = "score"
    with_text = True

    @staticmethod
    def batch_weight(example: ImagesAndTexts) -> int:  # type: ignore[override]
        return images_and_texts_count(example)

    def run_inference(self, batch: Sequence[ImagesAndTexts], model: ClipImageEncoder,  # type: ignore[override]
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:

        pixels = [image for example in batch for image in example.pixels]
        texts = [text for example in batch for text in example.texts]
        image_rows = model.embed(stack_pixels(pixels)) if pixels else np.zeros((0, 0), np.float32)
        text_rows = model.embed_texts(texts) if texts else np.zeros((0, 0), np.float32)
        results, i, t = [], 0, 0
        for example in batch:
            n, m = len(example.pixels), len(example.texts)
            results.append(PredictionResult(example._replace(pixels=(), texts=()),
                                            (image_rows[i:i + n], text_rows[t:t + m]), model_id(self._config)))
            i += n
            t += m
        return results


def clip_text_inference(config: EmbedConfig) -> RunInference:
    """``RunInference`` with :class:`OpenClipImageTextHandler` (phase 3 scoring)."""
    return RunInference(OpenClipImageTextHandler(config), model_identifier=f"icl-clip-text-{config_digest(config)}")
