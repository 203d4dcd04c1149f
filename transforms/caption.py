"""Stage *caption*: a caption for every image of a cluster.

Crawled alt text is noise, so the reference recipe recaptions every kept image with a vision-language
model. Two backends (``caption.backend``):

* ``vllm``: a VLM served by vLLM (default ``Qwen/Qwen2.5-VL-7B-Instruct``) through its OpenAI-compatible
  chat API, the image as a base64 ``data:`` URL part next to the versioned prompt
  (``transforms/llm_prompts/caption_v1.txt``; its hash goes into each cluster's provenance). A caption
  that is empty, cut off at ``max_tokens``, a refusal or longer than ``max_chars`` is asked for again
  with the problem fed back (``llm.validation_retries``).
* ``alt_text``: no model: the original alt text cleaned by :func:`clean_alt_text` (HTML, file names,
  shop boilerplate, prices, discounts, emoji), or nothing when nothing useful is left.

Failure is decided **per cluster** (``caption_failed``): if the VLM could not caption one image of a
cluster after every retry, the cluster is either rejected whole or -- ``on_failure: fallback`` -- every
image of it gets its cleaned alt text instead, and ``caption`` is added to ``provenance.fallbacks``.
Whole clusters, because the images of one cluster become the demonstrations of one training example and
should be captioned in one style, and because dropping an image would change the cluster's content id
and could take it under ``group.min_images``.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from schemas.records import Cluster, ClusterProvenance
from transforms.llm_client import (
    ChatClient,
    ChatResponse,
    LLMConfig,
    OutputInvalid,
    image_data_url,
)
from transforms.llm_stage import ClusterModelHandler, ModelStage, Outcome, ResolveFn, error_text
from transforms.naming import file_name_words
from transforms.settings import CaptionConfig

STAGE = "caption"

CAPTION_FAILED = "caption_failed"


# --- the alt-text cleaner ---------------------------------------------------------------------------------

_IMAGE_EXTENSIONS = r"(?:jpe?g|jfif|png|gif|webp|bmp|tiff?|heic|heif|avif|svg)"
_WHOLE_FILE_NAME = re.compile(rf"(?i)^\S*(?:\s+\S+){{0,3}}\.{_IMAGE_EXTENSIONS}$")
_FILE_NAME = re.compile(rf"(?i)(?<![\w/])[\w\-.~%+()]*\w\.{_IMAGE_EXTENSIONS}\b")
# Names cameras, phones and editors give files, also without an extension.
_CAMERA_NAME = re.compile(r"(?i)\b(?:IMG|DSC[NF]?|DCIM|PXL|MVIMG|VID|GOPR|DJI|SAM|WP|Screenshot|image|photo|scan)"
                          r"[_\- ]?\d{3,}(?:[_\-]\d+)*\b|\bP\d{7}\b")
_URL = re.compile(r"(?i)\b(?:https?://|www\.)\S+")
_TAG = re.compile(r"<[^<>]{0,1000}>")
_GALLERY = re.compile(r"(?i)\(?\b(?:view|image|photo|picture|pic|img|slide|thumbnail|thumb)\s*#?\s*\d+"
                      r"(?:\s*(?:of|/)\s*\d+)?\)?")
_BOILERPLATE = re.compile(
    r"(?i)\b(?:"
    r"buy\s+(?:it\s+)?now|shop\s+now|order\s+(?:it\s+)?now|add\s+to\s+(?:cart|basket|bag|wish\s*list)"
    r"|(?:in|out\s+of)\s+stock|sold\s+out|click\s+here|shop\s+the\s+look"
    r"|(?:free|fast|express)\s+(?:shipping|delivery|returns?)(?:\s+(?:on|for)\s+(?:all\s+|many\s+)?"
    r"(?:orders?|items?)(?:\s+(?:over|above|from)\s+\S+)?)?"
    r"|(?:hot|big|flash|mega|summer|winter|black\s+friday)\s+sale|on\s+sale|for\s+sale|sale"
    r"|clearance|today\s+only|limited\s+time(?:\s+(?:only|offer))?|special\s+offer|deal\s+of\s+the\s+day"
    r"|best[\s-]?sell(?:ing|ers?)|top[\s-]rated|new\s+arrivals?"
    r"|(?:discount|coupon|promo|voucher)\s+codes?|coupons?"
    r")\b")
_DISCOUNT = re.compile(r"(?i)(?:\b(?:save|extra)\s+\d+(?:[.,]\d+)?\s?%|(?<!\w)[-\u2013\u2212]\s?\d+(?:[.,]\d+)?\s?%"
                       r"|(?:\b(?:up\s+to|get)\s+)?\b\d+(?:[.,]\d+)?\s?%(?=\s*(?:off|discount|rabatt)\b))"
                       r"(?:\s*(?:off|discount|rabatt)\b)?")
_AMOUNT = (r"(?:[$€£¥₹]\s?\d[\d,]*(?:\.\d+)?(?:\s?(?:k|m|bn|million|billion|trillion)\b)?"
           r"|\b(?:rs\.?|inr|usd|eur|gbp)\s?\d[\d,]*(?:\.\d+)?"
           r"|\b\d[\d,]*(?:\.\d+)?\s?(?:usd|eur|gbp|dollars?|euros?|pounds?)\b|\b\d[\d,]*(?:\.\d+)?\s?[€$£])")
# A price with the words that sell it ("only $19.99", "was $30 now $20", "RRP of £139.99"): always out.
_PROMO_PRICE = re.compile(r"(?i)(?:\b(?:for\s+)?(?:only|just|now|was|from|price[ds]?(?:\s+at)?|starting\s+at"
                          r"|(?:with\s+)?(?:an?\s+)?rrp(?:\s+of)?|sale\s+price)\s+)+" + _AMOUNT)
# Any other price, with a preposition before it, only out of a short, alt-text-like text: inside a sentence
# ("a guarantor for $8 billion in loans") it carries meaning and removing it breaks the grammar.
_PRICE = re.compile(r"(?i)(?:\b(?:for|at|under|over|about|around|less\s+than|more\s+than)\s+)*" + _AMOUNT)
_SHORT_WORDS = 12
_AND_MORE = re.compile(r"(?i)\s*(?:&|\band)\s+more\b(?=\s*(?:$|[|\-\u2013\u2014:]))")
_SEGMENTS = re.compile(r"\s*[|\u00a6\u2022]\s*")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.!?;:%)])")
_REPEATED_PUNCT = re.compile(r"([!?.,;:])\1+")
_LEADING = re.compile(r"^[\s\-\u2013\u2014|:;,/.!?*~_+=#>\]\)]+")
_TRAILING = re.compile(r"[\s\-\u2013\u2014|:;,/*~_+=#<\[\(]+$")
_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]")
_NOTHING_WORDS = frozenset("""image images photo photos picture pictures pic pics img thumbnail thumb untitled
placeholder default banner icon null none n/a na alt spacer blank click here more new""".split())
_KEEP_SYMBOLS = frozenset("°")


def _strip_symbols(text: str) -> str:
    """Emoji, pictographs, ©®™ and invisible format characters out (``°`` stays: "360° view")."""
    out = []
    for char in text:
        category = unicodedata.category(char)
        if char in _KEEP_SYMBOLS:
            out.append(char)
        elif 0xFE00 <= ord(char) <= 0xFE0F or 0xE0100 <= ord(char) <= 0xE01EF:
            continue  # variation selectors: they only change how the emoji before them is drawn
        elif category in ("So", "Cs", "Co", "Cf", "Me", "Sk") and not char.isascii():
            out.append(" ")
        elif category == "Cc":
            out.append(" ")
        else:
            out.append(char)
    return "".join(out)


def _tidy(text: str) -> str:
    text = _EMPTY_BRACKETS.sub(" ", text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_PUNCT.sub(r"\1", text)
    text = re.sub(r"\s*([\-\u2013\u2014])(?:\s*[\-\u2013\u2014])+\s*", r" \1 ", text)
    previous = None
    while previous != text:
        previous = text
        text = _LEADING.sub("", text)
        text = _TRAILING.sub("", text)
        text = text.strip()
    return text


def _useful(text: str) -> bool:
    words = re.findall(r"[^\W\d_]+", text.lower())
    return bool(words) and any(len(w) > 1 and w not in _NOTHING_WORDS for w in words)


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars + 1].rsplit(" ", 1)[0]
    return _tidy(cut if cut else text[:max_chars])


def clean_alt_text(text: str | None, max_chars: int = 400) -> str | None:
    """Crawled alt text without its noise, or ``None`` when nothing useful is left.

    Removes HTML tags and entities, URLs, image file names but not their words (``IMG_1234.JPG`` and
    ``DSC_0137`` go, ``pink sunglasses 04.jpg`` becomes ``pink sunglasses``:
    :func:`transforms.naming.file_name_words`), gallery numbering ("(view 3)", "image 2 of 5"), shop
    boilerplate ("buy now", "free shipping on orders over $50", "sale", "best-selling", coupon codes), prices
    with their lead-in ("for only $19.99"; a bare price only from a short text, not from inside a sentence
    where it carries meaning), discounts ("-30%", "up to 25% off"), emoji and symbols, and what follows the
    first useful ``|``-separated part (titles put the site name last: "Teapot | Example Shop"). Percentages
    that describe the thing ("100% cotton") stay.
    """
    if not text:
        return None
    text = html.unescape(html.unescape(text))
    text = _TAG.sub(" ", text)
    text = unicodedata.normalize("NFC", _strip_symbols(text))
    text = _SPACES.sub(" ", text).strip()
    if _CAMERA_NAME.fullmatch(text):
        return None
    text = _URL.sub(" ", text).strip()
    if _WHOLE_FILE_NAME.match(text):  # "pink sunglasses 04.jpg": the words stay
        text = file_name_words(text)
    text = _FILE_NAME.sub(lambda match: f" {file_name_words(match.group())} ", text)
    for pattern in (_CAMERA_NAME, _GALLERY, _DISCOUNT, _PROMO_PRICE, _BOILERPLATE, _AND_MORE):
        text = pattern.sub(" ", text)
    if len(text.split()) <= _SHORT_WORDS:
        text = _PRICE.sub(" ", text)
    text = text.replace("*", " ")
    parts = [_tidy(part) for part in _SEGMENTS.split(text)]
    parts = [part for part in parts if _useful(part)]
    if not parts:
        return None
    best = _cut(parts[0], max_chars)
    return best if _useful(best) else None


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
