"""Stage *subject*: what a cluster shows, its class noun, whether it is alive, and captions that name it.

The synthesis stage trains a DreamBooth on each cluster with ``class_noun`` as the class ("teapot"), and
the scene prompts put ``subject`` in new scenes. Two backends (``subject.backend``):

* ``vllm``: a text model served by vLLM (default ``Qwen/Qwen2.5-7B-Instruct``) reads the cluster's captions
  and cleaned alt texts and answers JSON constrained by a schema (``response_format`` json_schema, or
  vLLM's ``structured_outputs`` / ``guided_json``): ``subject``, ``class_noun``, ``is_live`` and one
  rewritten caption per image that names the subject consistently. The answer is validated (types,
  lengths, one caption per image, each caption naming the class noun); an invalid one is asked for again
  with the error fed back, then the cluster fails (``subject_failed``: rejected, or the offline backend
  with ``subject`` in ``provenance.fallbacks``).
* ``offline``: no model. :func:`transforms.naming.name_subject` weighs the page's URL slug and the
  phrases its cleaned alt texts and captions repeat against a class lexicon (torchvision's ImageNet-1k names
  plus a short extension), which gives the class noun and whether it is alive (docs/subject-naming.md). It
  leaves the subject empty when the evidence is too weak or contradicts itself -- downstream stages handle
  that -- and only fills captions that are empty, with the subject phrase.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from typing import Any

from schemas.records import Cluster, ClusterProvenance
from transforms.alt_text import clean_alt_text
from transforms.common import Reason, count
from transforms.models.llm_client import (
    ChatClient,
    ChatResponse,
    OutputInvalid,
    json_schema_params,
    parse_json_object,
)
from transforms.models.model_stage import ClusterModelHandler, ModelStage, ResolveFn
from transforms.naming import name_subject, singular
from transforms.prompt_files import PromptText
from transforms.settings import MIN_SHARE, LLMConfig, SubjectConfig

STAGE = "subject"

SUBJECT_FAILED = "subject_failed"

REASONS = (Reason(SUBJECT_FAILED, whole_cluster=True),)


@dataclass(frozen=True)
class SubjectResult:
    """What the stage sets on a cluster."""

    subject: str | None
    class_noun: str | None
    is_live: bool | None
    captions: tuple[str | None, ...]


# --- the offline backend ----------------------------------------------------------------------------------

def with_article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def offline_result(cluster: Cluster, min_support: int, min_share: float = MIN_SHARE) -> SubjectResult:
    """The offline backend on a cluster: its page URL, and each image's caption and cleaned alt text."""
    texts = [(image.caption, clean_alt_text(image.text)) for image in cluster.images]
    name = name_subject(cluster.page_url, texts, min_support=min_support, min_share=min_share)
    captions = tuple(image.caption or (with_article(name.subject) if name.subject else None)
                     for image in cluster.images)
    return SubjectResult(name.subject, name.class_noun, name.is_live, captions)


# --- the LLM backend -------------------------------------------------------------------------------------------

def subject_schema(n_captions: int, config: SubjectConfig) -> dict[str, Any]:
    """The JSON schema of the model's answer for a cluster of ``n_captions`` images."""
    return {
        "type": "object",
        "properties": {
            "subject": {"type": "string", "minLength": 1, "maxLength": 16 * config.max_subject_words},
            "class_noun": {"type": "string", "minLength": 1, "maxLength": 16 * config.max_class_noun_words},
            "is_live": {"type": "boolean"},
            "captions": {"type": "array", "minItems": n_captions, "maxItems": n_captions,
                         "items": {"type": "string", "minLength": 1, "maxLength": config.max_caption_chars}},
        },
        "required": ["subject", "class_noun", "is_live", "captions"],
        "additionalProperties": False,
    }


_ARTICLE = re.compile(r"(?i)^(?:a|an|the)\s+")


def names_class(caption: str, class_noun: str) -> bool:
    """Whether a caption names the class noun (its head word, singular or plural)."""
    head = singular(class_noun.lower().split()[-1])
    return any(singular(word) == head for word in re.findall(r"[^\W_]+", caption.lower()))  # "teapot's" too


def validate_subject(response: ChatResponse, n_captions: int, config: SubjectConfig) -> SubjectResult:
    """The model's answer as a :class:`SubjectResult`, or :class:`OutputInvalid` listing what is wrong."""
    data = parse_json_object(response)
    problems: list[str] = []
    missing = [key for key in ("subject", "class_noun", "is_live", "captions") if key not in data]
    if missing:
        raise OutputInvalid(f"missing key(s) {', '.join(missing)}")
    subject, class_noun, is_live, captions = (data["subject"], data["class_noun"], data["is_live"],
                                              data["captions"])
    if not isinstance(subject, str) or not _ARTICLE.sub("", subject.strip()):
        problems.append("subject must be a non-empty string")
    elif len(subject.split()) > config.max_subject_words:
        problems.append(f"subject has {len(subject.split())} words, at most {config.max_subject_words} allowed")
    if not isinstance(class_noun, str) or not re.fullmatch(r"[^\W\d_][\w' -]*", class_noun.strip()):
        problems.append("class_noun must be one to a few words")
    elif len(class_noun.split()) > config.max_class_noun_words:
        problems.append(f"class_noun has {len(class_noun.split())} words, at most {config.max_class_noun_words}")
    if not isinstance(is_live, bool):
        problems.append("is_live must be true or false")
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        problems.append("captions must be a list of strings")
    elif len(captions) != n_captions:
        problems.append(f"expected {n_captions} captions (one per photo), got {len(captions)}")
    else:
        for i, caption in enumerate(captions, 1):
            text = caption.strip()
            if not text:
                problems.append(f"caption {i} is empty")
            elif len(text) > config.max_caption_chars:
                problems.append(f"caption {i} has {len(text)} characters, at most {config.max_caption_chars}")
            elif config.require_class_noun and isinstance(class_noun, str) and class_noun.strip() and not (
                    names_class(text, class_noun)):
                problems.append(f"caption {i} does not name the class noun {class_noun.strip()!r}")
    if problems:
        raise OutputInvalid("; ".join(problems[:6]))
    return SubjectResult(subject=_ARTICLE.sub("", subject.strip()), class_noun=class_noun.strip().lower(),
                         is_live=is_live, captions=tuple(" ".join(c.split()) for c in captions))


def subject_input(cluster: Cluster) -> str:
    """The JSON the model reads: page URL, the captions in image order, the cleaned alt texts."""
    return json.dumps({"page_url": cluster.page_url,
                       "captions": [image.caption for image in cluster.images],
                       "alt_texts": [clean_alt_text(image.text) for image in cluster.images]},
                      ensure_ascii=False)


def subject_messages(prompt: PromptText, cluster: Cluster, config: SubjectConfig) -> list[dict[str, Any]]:
    instructions = string.Template(prompt.text).safe_substitute(
        max_subject_words=config.max_subject_words, max_caption_chars=config.max_caption_chars,
        n_captions=len(cluster.images))
    return [{"role": "system", "content": instructions},
            {"role": "user", "content": subject_input(cluster)}]


class SubjectHandler(ClusterModelHandler):
    """RunInference handler: ``Cluster`` -> ``Outcome(value=SubjectResult)``."""

    stage = STAGE
    _config: SubjectConfig

    def offline(self, cluster: Cluster) -> SubjectResult:
        return offline_result(cluster, self._config.min_support, self._config.min_share)

    def ask(self, client: ChatClient, cluster: Cluster) -> SubjectResult:
        config, prompt, n = self._config, self._prompt, len(cluster.images)
        assert prompt is not None
        return client.chat_validated(
            config.model, subject_messages(prompt, cluster, config),
            lambda response: validate_subject(response, n, config), self._llm.validation_retries,
            max_tokens=config.max_tokens, temperature=config.temperature,
            **json_schema_params(subject_schema(n, config), "cluster_subject", config.structured_output))


class ApplySubjectFn(ResolveFn):
    """Subject, class noun, liveness and captions into the cluster; on failure the offline backend or a reject."""

    _config: SubjectConfig

    def __init__(self, config: SubjectConfig, prompt_tag: str | None) -> None:
        super().__init__(STAGE, SUBJECT_FAILED, config, prompt_tag)

    def offline(self, cluster: Cluster) -> SubjectResult:
        return offline_result(cluster, self._config.min_support, self._config.min_share)

    def with_value(self, cluster: Cluster, result: SubjectResult, provenance: ClusterProvenance) -> Cluster:
        if not result.subject:
            count(STAGE, "no_subject_clusters")
        images = tuple(image.replace(caption=caption)
                       for image, caption in zip(cluster.images, result.captions, strict=True))
        return cluster.replace(images=images, subject=result.subject, class_noun=result.class_noun,
                               is_live=result.is_live, provenance=provenance)


class Subject(ModelStage):
    """``Cluster``s -> ``Cluster``s with ``subject``, ``class_noun``, ``is_live`` and consistent captions."""

    def __init__(self, config: SubjectConfig, llm: LLMConfig) -> None:
        handler = SubjectHandler(config, llm)
        super().__init__(STAGE, handler, ApplySubjectFn(config, handler.prompt_tag))
