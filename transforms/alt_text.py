"""Crawled alt text without its noise: what the caption stage's ``alt_text`` backend writes and what the subject
stage's offline backend reads. Plain functions, no Beam and no model."""

from __future__ import annotations

import html
import re
import unicodedata

from transforms.naming import file_name_words

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
