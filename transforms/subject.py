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
from transforms.caption import clean_alt_text
from transforms.common import count, option
from transforms.llm_client import (
    STRUCTURED_OUTPUT_MODES,
    ChatClient,
    ChatResponse,
    LLMConfig,
    OutputInvalid,
    PromptText,
    json_schema_params,
    parse_json_object,
)
from transforms.llm_stage import ClusterModelHandler, ModelStage, ResolveFn, check_stage_config
from transforms.naming import MIN_SHARE, name_subject, singular

STAGE = "subject"

SUBJECT_FAILED = "subject_failed"

BACKENDS = ("offline", "vllm")

DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"


@dataclass(frozen=True)
class SubjectConfig:
    """Settings of the subject stage (config section ``subject``); defaults justified in docs/defaults.md."""

    enabled: bool = option(True, "Run the stage (off: subject, class_noun and is_live stay empty).")
    backend: str = option("vllm", "vllm: a text model through vLLM's OpenAI-compatible API, JSON output; offline: "
                                  "the URL slug and the cleaned texts' phrases against a class lexicon, no model.")
    on_failure: str = option("fallback", "When the model's answer stays invalid or the calls fail: fallback (the "
                                         "offline backend, recorded in provenance.fallbacks) or reject "
                                         "(subject_failed).")
    model: str = option(DEFAULT_MODEL, "Text model id served by vLLM.")
    endpoint: str = option("", "OpenAI-compatible API root for this stage; empty: llm.endpoint, else a vLLM "
                               "server started on each worker.")
    prompt: str = option("subject_v1.txt", "Instruction file (transforms/llm_prompts/ or any path); its name and "
                                           "hash are recorded per cluster.")
    structured_output: str = option("response_format", "How the JSON schema is sent: response_format (OpenAI "
                                                       "json_schema, vLLM >= 0.6), structured_outputs (vLLM >= "
                                                       "0.10), guided_json (vLLM < 0.12) or none (prompt only).")
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
        check_stage_config("subject", self.backend, BACKENDS, self.on_failure, self.model, self.endpoint,
                           self.batch_size)
        if self.structured_output not in STRUCTURED_OUTPUT_MODES:
            raise ValueError(f"structured_output must be one of {', '.join(STRUCTURED_OUTPUT_MODES)}, "
                             f"got {self.structured_output!r}")
        if min(self.max_subject_words, self.max_class_noun_words, self.max_caption_chars, self.min_support,
               self.max_tokens) < 1:
            raise ValueError("max_subject_words, max_class_noun_words, max_caption_chars, min_support and "
                             "max_tokens must be positive")
        if not 0 <= self.min_share <= 1:
            raise ValueError(f"min_share must be within 0..1, got {self.min_share}")


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
