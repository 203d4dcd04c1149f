"""Stage *caption*: a caption for every image of a cluster.

Crawled alt text is noise, so the reference recipe recaptions every kept image with a vision-language
model. Two backends (``caption.backend``):

* ``vllm``: a VLM served by vLLM (default ``Qwen/Qwen2.5-VL-7B-Instruct``) through its OpenAI-compatible
  chat API, the image as a base64 ``data:`` URL part next to the versioned prompt
  (``transforms/llm_prompts/caption_v1.txt``; its hash goes into each cluster's provenance). A caption
  that is empty, cut off at ``max_tokens``, a refusal or longer than ``max_chars`` is asked for again
  with the problem fed back (``llm.validation_retries``).
* ``alt_text``: no model: the original alt text cleaned by :func:`transforms.alt_text.clean_alt_text` (HTML, file names,
  shop boilerplate, prices, discounts, emoji), or nothing when nothing useful is left.

Failure is decided **per cluster** (``caption_failed``): if the VLM could not caption one image of a
cluster after every retry, the cluster is either rejected whole or -- ``on_failure: fallback`` -- every
image of it gets its cleaned alt text instead, and ``caption`` is added to ``provenance.fallbacks``.
Whole clusters, because the images of one cluster become the demonstrations of one training example and
should be captioned in one style, and because dropping an image would change the cluster's content id
and could take it under ``group.min_images``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from schemas.records import Cluster, ClusterProvenance
from transforms.alt_text import clean_alt_text
from transforms.common import Reason
from transforms.models.llm_client import (
    ChatClient,
    ChatResponse,
    OutputInvalid,
    image_data_url,
)
from transforms.models.model_stage import ClusterModelHandler, ModelStage, Outcome, ResolveFn, error_text
from transforms.settings import CaptionConfig, LLMConfig

STAGE = "caption"

CAPTION_FAILED = "caption_failed"

REASONS = (Reason(CAPTION_FAILED, whole_cluster=True),)


# --- the VLM backend ------------------------------------------------------------------------------------

_REFUSALS = re.compile(r"(?i)^(?:i'?m sorry|sorry,|i cannot|i can'?t|i am unable|i'm unable|as an ai)")


def validate_caption(response: ChatResponse, min_chars: int, max_chars: int) -> str:
    """A model caption on one line, or :class:`OutputInvalid` saying what is wrong with it."""
    text = " ".join(response.content.split()).strip().strip("\"'").strip()
    if response.truncated:
        raise OutputInvalid(f"the caption was cut off at the token limit; write one sentence of at most "
                            f"{max_chars} characters")
    if len(text) < min_chars:
        raise OutputInvalid(f"the caption is empty or shorter than {min_chars} characters")
    if len(text) > max_chars:
        raise OutputInvalid(f"the caption has {len(text)} characters; write at most {max_chars}")
    if _REFUSALS.match(text):
        raise OutputInvalid("the answer is a refusal, not a caption; describe what the photo shows")
    return text


def caption_messages(prompt: str, image: bytes) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                                         {"type": "text", "text": prompt}]}]


def alt_text_captions(cluster: Cluster, max_chars: int) -> tuple[str | None, ...]:
    return tuple(clean_alt_text(image.text, max_chars) for image in cluster.images)


class CaptionHandler(ClusterModelHandler):
    """RunInference handler: ``Cluster`` -> ``Outcome(value=captions, one per image)``."""

    stage = STAGE
    _config: CaptionConfig

    def offline(self, cluster: Cluster) -> tuple[str | None, ...]:
        return alt_text_captions(cluster, self._config.max_chars)

    def infer_with_model(self, clusters: Sequence[Cluster], client: ChatClient) -> list[Outcome]:
        # One request per image, all of the batch's images in flight at once; a cluster fails with its first image.
        config, llm = self._config, self._llm
        assert self._prompt is not None

        def caption(image_bytes: bytes) -> str:
            return client.chat_validated(
                config.model, caption_messages(self._prompt.text, image_bytes),
                lambda r: validate_caption(r, config.min_chars, config.max_chars), llm.validation_retries,
                max_tokens=config.max_tokens, temperature=config.temperature)

        images = [(i, image) for i, cluster in enumerate(clusters) for image in cluster.images]
        results = client.map_settled(lambda item: caption(item[1].image), images)
        captions: list[list[str]] = [[] for _ in clusters]
        errors: list[str | None] = [None] * len(clusters)
        for (i, image), result in zip(images, results, strict=True):
            if isinstance(result, BaseException):
                errors[i] = errors[i] or f"image {image.image_id}: {error_text(result)}"
            else:
                captions[i].append(result)
        return [Outcome(error=error) if error else Outcome(tuple(caps))
                for caps, error in zip(captions, errors, strict=True)]


class ApplyCaptionsFn(ResolveFn):
    """Captions into the cluster's images; on failure the cluster's cleaned alt texts, or a reject."""

    offline_backend = "alt_text"
    _config: CaptionConfig

    def __init__(self, config: CaptionConfig, prompt_tag: str | None) -> None:
        super().__init__(STAGE, CAPTION_FAILED, config, prompt_tag)

    def offline(self, cluster: Cluster) -> tuple[str | None, ...]:
        return alt_text_captions(cluster, self._config.max_chars)

    def with_value(self, cluster: Cluster, captions: Sequence[str | None], provenance: ClusterProvenance) -> Cluster:
        images = tuple(image.replace(caption=caption) for image, caption in zip(cluster.images, captions, strict=True))
        return cluster.replace(images=images, provenance=provenance)


class Caption(ModelStage):
    """``Cluster``s -> ``Cluster``s with ``caption`` on every image (+ ``caption_failed`` rejects)."""

    def __init__(self, config: CaptionConfig, llm: LLMConfig) -> None:
        handler = CaptionHandler(config, llm)
        super().__init__(STAGE, handler, ApplyCaptionsFn(config, handler.prompt_tag))
