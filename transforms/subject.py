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
* ``offline``: no model. :func:`offline_subject` picks the most frequent content noun phrase of the
  cleaned texts (the phrase that ends a run of content words, counted once per image, in at least
  ``min_support`` images); ``class_noun`` is its head noun (or a known compound such as "stuffed
  animal"), ``is_live`` comes from a list of living-being nouns unless a modifier says otherwise ("toy
  dog"). It may leave the subject empty -- downstream stages handle that -- and only fills captions that
  are empty, with the subject phrase.
"""

from __future__ import annotations

import collections
import json
import math
import re
import string
from collections.abc import Iterable, Sequence
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

STAGE = "subject"

SUBJECT_FAILED = "subject_failed"

BACKENDS = ("offline", "vllm")

DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"


@dataclass(frozen=True)
class SubjectConfig:
    """Settings of the subject stage (config section ``subject``); defaults justified in docs/defaults.md."""

    enabled: bool = option(True, "Run the stage (off: subject, class_noun and is_live stay empty).")
    backend: str = option("vllm", "vllm: a text model through vLLM's OpenAI-compatible API, JSON output; offline: "
                                  "the most frequent noun phrase of the cleaned texts, no model.")
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
    min_support: int = option(2, "Offline backend: a phrase must occur in the texts of at least this many images "
                                 "of the cluster to become its subject.")
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


@dataclass(frozen=True)
class SubjectResult:
    """What the stage sets on a cluster."""

    subject: str | None
    class_noun: str | None
    is_live: bool | None
    captions: tuple[str | None, ...]


# --- the offline backend ----------------------------------------------------------------------------------

STOPWORDS = frozenset("""a about above after again against all also am an and any are as at be because been before
being below between both but by could did do does doing down during each few for from further had has have having
he her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what when
where which while who whom why will with would you your yours yourself yourselves via per plus x including featuring
using""".split())
# Verbs that end many web sentences ("... it comes", "... to get"): never a subject's head noun.
_VERBS = frozenset("""get gets got make makes made use uses used come comes came see sees saw find finds found buy
buys bought add adds added take takes took give gives gave go goes went know knows need needs want wants like likes
love loves help helps keep keeps let lets put puts say says show shows try tries call calls click read learn check
start starts started starting design designed include includes feature features featured provide provides
provided available enjoy enjoys""".split())
# Nouns that are never the subject of a product or blog photo: how it is shown, sold or laid out.
_GENERIC = frozenset("""photo photograph image picture pic img view shot closeup close-up detail details product
products item items shop store logo brand sale deal deals offer price set pack piece pieces pcs style styles design
designs color colour colors colours size sizes quality gift gifts idea ideas collection range selection model
models version type types kind thing things stuff page website site blog post home homepage category categories
thumbnail banner icon badge edition series number part parts today year time way look looks one ones review
reviews overview guide tips free new best top great good""".split())
# Two-word class names a head noun alone would misname ("stuffed animal" is not an "animal").
_COMPOUNDS = frozenset({
    "stuffed animal", "teddy bear", "action figure", "rc car", "race car", "toy car", "sports car", "alarm clock",
    "wall clock", "wrist watch", "coffee mug", "tea cup", "coffee cup", "rubber duck", "t-shirt", "sun glasses",
    "rain boots", "ankle boots", "running shoes", "high heels", "hot dog", "guinea pig", "polar bear"})
# Living beings (singular); anything else, or a living noun with an object modifier, is an object.
_LIVE = frozenset("""dog puppy pup cat kitten kitty bird parrot budgie canary horse pony donkey rabbit bunny
hamster ferret guinea-pig fish goldfish turtle tortoise lizard gecko snake frog cow calf sheep lamb goat pig
piglet chicken hen rooster duckling owl fox wolf bear lion tiger leopard cheetah elephant giraffe zebra monkey
gorilla panda koala kangaroo deer squirrel hedgehog otter seal dolphin whale penguin camel alpaca llama
person man woman boy girl child kid baby toddler lady gentleman bride groom dachshund retriever labrador poodle
terrier bulldog corgi husky beagle pug chihuahua spaniel shepherd collie""".split()) | {"guinea pig", "polar bear"}
_OBJECT_MODIFIERS = frozenset("""toy toys plush plushie stuffed figurine figure statue sculpture ceramic porcelain
wooden plastic metal glass print printed poster painting drawing cartoon sticker pillow cushion costume mask
ornament model robot lego rubber inflatable balloon cookie cake candle lamp mug shirt""".split())

_PLURALIA = frozenset("""glasses sunglasses eyeglasses goggles scissors jeans pants trousers shorts leggings tights
pajamas pyjamas headphones earphones earbuds binoculars tongs pliers tweezers clothes""".split())

_WORD = re.compile(r"[^\W\d_][\w'\u2019-]*|\d+|[^\w\s]")


def singular(word: str) -> str:
    """A plural noun's singular, well enough to count "teapots" and "teapot" together."""
    if len(word) <= 3 or word.endswith(("ss", "us", "is", "ous")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zes", "sses")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def candidate_phrases(text: str, max_words: int = 3) -> list[tuple[str, ...]]:
    """Noun-phrase candidates of a text: the last 1..``max_words`` words of each run of content words.

    A run ends at a stop word, punctuation, a number or the end of the text; English noun phrases end in
    their head noun, so the suffixes of a run are its noun phrases ("red ceramic teapot", "ceramic teapot",
    "teapot"), while a word in the middle of a run ("can" in "you can find ...") is not a candidate.
    """
    phrases: list[tuple[str, ...]] = []
    run: list[str] = []
    for token in [*_WORD.findall(text.lower()), "."]:
        if token[0].isalpha() and token not in STOPWORDS and len(token) > 1:
            run.append(token.strip("'\u2019-"))
            continue
        for k in range(1, min(max_words, len(run)) + 1):
            phrases.append(tuple(run[-k:]))
        run = []
    return phrases


def _key(phrase: tuple[str, ...]) -> tuple[str, ...]:
    return (*phrase[:-1], singular(phrase[-1]))


def offline_subject(texts_per_image: Sequence[Iterable[str | None]], min_support: int = 2
                    ) -> tuple[str | None, str | None, bool | None]:
    """``(subject, class_noun, is_live)`` from each image's texts, or ``(None, None, None)``.

    Each image counts a phrase once, however many of its texts contain it. The class noun is the
    non-generic head noun found in the most images (at least ``min_support``; ties: more occurrences,
    then alphabetical); the subject is the longest phrase ending in it that at least half of those images
    share (so "red teapot" wins over "teapot" only when most images say "red").
    """
    image_support: collections.Counter[tuple[str, ...]] = collections.Counter()
    occurrences: collections.Counter[tuple[str, ...]] = collections.Counter()
    surface: dict[tuple[str, ...], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for texts in texts_per_image:
        seen: set[tuple[str, ...]] = set()
        for text in texts:
            if not text:
                continue
            for phrase in candidate_phrases(text):
                key = _key(phrase)
                if key[-1] in _GENERIC or phrase[-1] in _GENERIC or phrase[-1] in _VERBS:
                    continue
                occurrences[key] += 1
                surface[key][" ".join(phrase)] += 1
                seen.add(key)
        image_support.update(seen)
    heads = [(key, n) for key, n in image_support.items() if len(key) == 1 and n >= min_support]
    if not heads:
        return None, None, None
    head, head_support = min(heads, key=lambda item: (-item[1], -occurrences[item[0]], item[0]))
    needed = max(min_support, math.ceil(head_support / 2))
    longer = [key for key, n in image_support.items() if key[-1] == head[0] and len(key) > 1 and n >= needed]
    best = min([head, *longer], key=lambda key: (-len(key), -image_support[key], key))
    subject = surface[best].most_common(1)[0][0]
    # The class is named in the singular ("a photo of a cover"), except for nouns that have none ("glasses").
    plural = surface[head].most_common(1)[0][0]
    class_noun = plural if plural in _PLURALIA else head[0]
    pair = " ".join(best[-2:]) if len(best) >= 2 else ""
    if pair in _COMPOUNDS or pair.replace(" ", "-") in _COMPOUNDS:
        class_noun = " ".join(subject.split()[-2:])
    return subject, class_noun, is_live_noun(subject, class_noun)


def is_live_noun(subject: str, class_noun: str) -> bool:
    """Whether a subject phrase names a living being: its class noun is one, and no modifier makes it a thing."""
    words = [singular(w) for w in re.findall(r"[a-z'-]+", subject.lower())]
    noun = " ".join(singular(w) for w in class_noun.lower().split())
    if noun not in _LIVE and (not words or words[-1] not in _LIVE):
        return False
    return not any(w in _OBJECT_MODIFIERS for w in words)


def with_article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def offline_result(cluster: Cluster, min_support: int) -> SubjectResult:
    """The offline backend on a cluster: each image's caption and cleaned alt text vote."""
    texts = [(image.caption, clean_alt_text(image.text)) for image in cluster.images]
    subject, class_noun, is_live = offline_subject(texts, min_support)
    captions = tuple(image.caption or (with_article(subject) if subject else None) for image in cluster.images)
    return SubjectResult(subject, class_noun, is_live, captions)


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
        return offline_result(cluster, self._config.min_support)

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
        return offline_result(cluster, self._config.min_support)

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
