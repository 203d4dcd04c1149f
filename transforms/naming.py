"""Naming a cluster's subject without a model: the page's URL slug, phrases its texts repeat, a class lexicon.

The offline subject backend (and the fallback when the subject model fails) calls :func:`name_subject` once
per cluster. Three kinds of evidence, one scored decision (docs/subject-naming.md has the rule and its
benchmark on the bundled sample):

* **The lexicon** (:func:`load_lexicon`): the 1,000 ImageNet-1k class names that torchvision ships in its
  wheel, plus a short, documented :data:`EXTENSION` for common product nouns ImageNet lacks. Only a lexicon
  noun can be a class noun -- it becomes DreamBooth's class prompt ("a photo of a teapot"), where a brand
  name, a foreign word or a misparsed verb does harm -- and the lexicon says whether the class is alive:
  ImageNet's first 398 classes are animals. Multiword names give their head noun too ("golden retriever",
  "Eskimo dog" -> "dog"), and ImageNet's dog and domestic-cat ranges are named "dog" and "cat", as
  DreamBench names them.
* **Phrases of the texts** (alt texts after :func:`transforms.caption.clean_alt_text`, captions): runs of
  content words; a lexicon noun at the end of a run (the head of an English noun phrase) is a *naming*, one
  elsewhere ("dog" in "dog collar") a weaker *mention*. Each image counts once.
* **The URL slug** (:func:`slug_words`): ``/products/wolf-plushie-8`` -> "wolf plushie", with ids, numbers,
  file extensions and shop path words removed and percent-encoding decoded.

Plain functions, no Beam; deterministic; the lexicon is built once per process (a few milliseconds).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from transforms.settings import MIN_SHARE

LOG = logging.getLogger(__name__)

# --- words ------------------------------------------------------------------------------------------------

STOPWORDS = frozenset("""a about above after again against all also am an and any are as at be because been before
being below between both but by could did do does doing down during each few for from further had has have having
he her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what when
where which while who whom why will with would you your yours yourself yourselves via per plus x including featuring
using""".split())
# Verbs that end many web sentences ("... it comes", "... to get"): never part of a noun phrase.
VERBS = frozenset("""get gets got make makes made use uses used come comes came see sees saw find finds found buy
buys bought add adds added take takes took give gives gave go goes went know knows need needs want wants like likes
love loves help helps keep keeps let lets put puts say says show shows try tries call calls click read learn check
start starts started starting design designed include includes feature features featured provide provides
provided available enjoy enjoys meet meets may might must shall""".split())
# Nouns that are never the subject of a product or blog photo: how it is shown, sold or laid out, and the words
# shops add to sell it. They may sit inside a phrase ("wolf plushie photo") but never name or start a subject.
GENERIC = frozenset("""photo photograph image picture pic img view shot closeup close-up detail details product
products item items shop store logo brand sale deal deals offer price set pack piece pieces pcs style styles design
designs color colour colors colours size sizes quality gift gifts idea ideas collection range selection model
models version type types kind thing things stuff page website site blog post home homepage category categories
thumbnail banner icon badge edition series number part parts today year time way look looks one ones review
reviews overview guide tips free new best top great good hot cheap official authentic genuine premium original
exclusive latest popular bestseller bestselling sample example preview screenshot gallery slide""".split())
# Words a slug or a product title puts after its noun ("teapot-red-ceramic", "t-shirt-blue-xl"): skipped when
# deciding whether a noun ends its phrase.
ATTRIBUTES = frozenset("""red blue green yellow black white pink purple orange brown grey gray beige navy gold silver
cream ivory teal turquoise multicolor multicolour xs xl xxl xxxl small medium large mini big tall men mens women
womens ladies kid kids girl girls boy boys baby toddler unisex adult ceramic wooden wood leather cotton linen silk
steel metal plastic""".split())
"""After a noun, also a person word names who it is for ("backpack-kids-blue"), not a second subject."""
# Words before a living noun that make it a thing: "toy dog", "ceramic cat", "plush bear".
OBJECT_MODIFIERS = frozenset("""toy toys plush plushie stuffed figurine figure statue sculpture ceramic porcelain
wooden plastic metal glass print printed poster painting painted drawing cartoon sticker pillow cushion costume mask
ornament model robot lego rubber inflatable balloon cookie cake candle lamp mug shirt knitted crochet crocheted
carved felt clay bronze brass stone marble resin crystal origami""".split())
# Nouns with no singular in ordinary use: the class noun keeps the plural.
PLURALIA = frozenset("""glasses sunglasses eyeglasses spectacles goggles scissors jeans pants trousers shorts leggings
tights pajamas pyjamas headphones earphones earbuds binoculars tongs pliers tweezers clothes""".split())

_IRREGULAR = {"mice": "mouse", "geese": "goose", "feet": "foot", "teeth": "tooth", "children": "child",
              "people": "person", "men": "man", "women": "woman", "oxen": "ox", "calves": "calf", "wolves": "wolf",
              "knives": "knife", "leaves": "leaf", "shelves": "shelf", "scarves": "scarf", "halves": "half"}


def singular(word: str) -> str:
    """A plural noun's singular, well enough to count "teapots" and "teapot" together."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or word.endswith(("ss", "us", "is", "ous")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zes", "sses")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def _norm(word: str) -> str:
    """A word as the lexicon spells its keys: lower case, without apostrophes and inner hyphens."""
    return word.lower().replace("'", "").replace("\u2019", "").replace("-", "")


def _key_word(word: str) -> str:
    """The last word of a lexicon key: singular, unless the noun has none ("sunglasses")."""
    return word if word in PLURALIA else singular(word)


# --- the lexicon ----------------------------------------------------------------------------------------

IMAGENET_ANIMALS = range(0, 398)
"""ImageNet-1k's animal classes (tench ... puffer): the WordNet ``animal`` subtree comes first in its order."""

IMAGENET_PEOPLE = frozenset({981, 982, 983})
"""The three ImageNet-1k classes that are people: ballplayer, groom, scuba diver."""

IMAGENET_GROUPS = ((range(151, 269), "dog"), (range(281, 286), "cat"))
"""ImageNet-1k ranges named by their WordNet hypernym, as DreamBench names such subjects: the 118 dog breeds
(Chihuahua ... Mexican hairless) are "dog", the five domestic cats (tabby ... Egyptian cat) "cat"."""

_STUFFED = ("stuffed animal", False)
EXTENSION: dict[str, tuple[str, bool]] = {
    # DreamBench's class nouns that ImageNet-1k lacks (google/dreambooth dataset/prompts_and_classes.txt).
    "toy": ("toy", False), "stuffed animal": _STUFFED, "glasses": ("glasses", False), "sneaker": ("sneaker", False),
    "cartoon": ("cartoon", False),
    # Plush toys: ImageNet's only one is "teddy"; DreamBench calls them all "stuffed animal".
    "teddy": _STUFFED, "teddy bear": _STUFFED, "plushie": _STUFFED, "plush": _STUFFED, "plush toy": _STUFFED,
    "soft toy": _STUFFED, "stuffed toy": _STUFFED, "cuddly toy": _STUFFED,
    # Everyday names of ImageNet classes that torchvision's one name per class leaves out (WordNet synonyms).
    "puppy": ("dog", True), "doggy": ("dog", True), "kitten": ("cat", True), "kitty": ("cat", True),
    "bunny": ("rabbit", True), "horse": ("horse", True), "pony": ("horse", True), "cow": ("cow", True),
    "sheep": ("sheep", True), "lamb": ("sheep", True), "eyeglasses": ("glasses", False),
    "spectacles": ("glasses", False), "jeans": ("jeans", False), "phone": ("phone", False),
    "smartphone": ("phone", False), "cellphone": ("phone", False), "sofa": ("couch", False),
    "bicycle": ("bike", False), "handbag": ("handbag", False),
    # Common product nouns with no ImageNet-1k class.
    "dress": ("dress", False), "shirt": ("shirt", False), "tshirt": ("t-shirt", False), "hoodie": ("hoodie", False),
    "jacket": ("jacket", False), "skirt": ("skirt", False), "sweater": ("sweater", False), "scarf": ("scarf", False),
    "glove": ("glove", False), "ring": ("ring", False), "earring": ("earring", False),
    "bracelet": ("bracelet", False), "doll": ("doll", False), "figurine": ("figurine", False),
    "painting": ("painting", False), "poster": ("poster", False), "blanket": ("blanket", False),
    "cushion": ("cushion", False), "bed": ("bed", False), "shelf": ("shelf", False),
    "headphones": ("headphones", False), "earbuds": ("headphones", False), "jar": ("jar", False),
    # Living beings ImageNet names only by species, or not at all: the generic nouns pages use.
    "duck": ("duck", True), "parrot": ("parrot", True),
    "goat": ("goat", True), "person": ("person", True), "man": ("person", True), "woman": ("person", True),
    "child": ("person", True), "kid": ("person", True), "baby": ("person", True), "girl": ("person", True),
    "boy": ("person", True),
}
"""Lexicon entries ImageNet-1k lacks: ``phrase -> (class noun, is_live)``, grouped by why each is needed.
Four override ImageNet on purpose: "teddy" (a "stuffed animal", as DreamBench says), "glasses" (the eyewear,
not the plural of "beer glass"), "jeans" (ImageNet's WordNet name is "jean") and "jacket" (the garment;
ImageNet has only "book jacket")."""

KINDS: dict[str, str] = {"sunglasses": "glasses", "sunglass": "glasses", "handbag": "bag", "sneaker": "shoe"}
"""Class nouns that are a kind of another beyond what their words show (a multiword class is always a kind of
its head noun: "running shoe" of "shoe"): evidence for "sunglasses" is evidence for "glasses" too."""


@dataclass(frozen=True)
class Entry:
    """A lexicon entry: the class noun a phrase names and whether that class is alive."""

    class_noun: str
    is_live: bool
    may_capitalize: bool = False
    """Its name is often capitalized (ImageNet writes it so: "Chihuahua"; or a dog or cat breed): a capital in a
    text does not make it a brand."""


@dataclass(frozen=True)
class Lexicon:
    """Phrases (tuples of normalized words, the last one singular) -> :class:`Entry`."""

    entries: dict[tuple[str, ...], Entry]
    words: frozenset[str] = field(default=frozenset())
    """Every word of every key: such a word is never read as a verb form ("stuffed" in "stuffed animal")."""
    max_words: int = 1
    """Words of the longest key."""
    source: str = ""

    def get(self, key: Sequence[str]) -> Entry | None:
        return self.entries.get(tuple(key))

    def find(self, phrase: str) -> Entry | None:
        """The entry a whole phrase names ("Golden Retrievers" -> dog), or ``None``."""
        words = [_norm(w) for w in phrase.split()]
        return self.get((*words[:-1], self.base(words[-1]))) if words else None

    def base(self, word: str) -> str:
        """A word's base form: itself if the lexicon knows it, else a known singular, else the rule's singular."""
        if (word,) in self.entries:
            return word
        for stem in (_IRREGULAR.get(word), singular(word), word[:-1] if word.endswith("es") else None,
                     word[:-3] + "fe" if word.endswith("ves") else None):
            if stem and (stem,) in self.entries:
                return stem
        return _key_word(word)


def imagenet_categories() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names that torchvision ships, in class-index order (no download).

    Read from ``torchvision/models/_meta.py`` without importing torchvision (which would import torch, ~2 s);
    if that file's layout changes, from the public API (``ResNet50_Weights.IMAGENET1K_V2.meta``).
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision is not installed (pip install 'icl-cluster-pipeline[models]')")
    meta = Path(next(iter(spec.submodule_search_locations))) / "models" / "_meta.py"
    try:
        for node in ast.parse(meta.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and getattr(node.targets[0], "id", None) == "_IMAGENET_CATEGORIES"):
                names = ast.literal_eval(node.value)
                if len(names) == 1000:
                    return tuple(names)
    except (OSError, SyntaxError, ValueError):
        pass
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def _key(name: str) -> tuple[str, ...]:
    words = [_norm(w) for w in name.split()]
    return (*words[:-1], _key_word(words[-1]))


def build_lexicon(categories: Sequence[str], extension: dict[str, tuple[str, bool]] = EXTENSION,
                  source: str = "") -> Lexicon:
    """The lexicon of ImageNet-style ``categories`` (index order matters: animals first) and ``extension``.

    Each class name is an entry; each proper suffix of a multiword name ("mountain dog", "dog" of "Bernese
    mountain dog") is one too, weaker than a full name. A phrase shared by several classes is alive when most
    of them are (a tie is a thing: "cardigan" is a Welsh corgi and a sweater); its class noun is the name all
    of them share, else the phrase itself.
    """
    votes: dict[tuple[tuple[str, ...], bool], list[tuple[str, bool, bool]]] = {}
    for index, name in enumerate(categories):
        live = index in IMAGENET_ANIMALS or index in IMAGENET_PEOPLE
        group = next((noun for span, noun in IMAGENET_GROUPS if index in span), None)
        key, capital = _key(name), name.split()[-1][:1].isupper() or group is not None
        votes.setdefault((key, True), []).append((group or name.lower(), live, capital))
        for k in range(1, len(key)):
            votes.setdefault((key[k:], False), []).append((group or " ".join(name.lower().split()[k:]), live, capital))
    entries: dict[tuple[str, ...], Entry] = {}
    for full in (False, True):  # full names overwrite suffixes of other names
        for (key, is_full), classes in votes.items():
            if is_full != full:
                continue
            live = sum(1 for _, alive, _ in classes if alive) * 2 > len(classes)
            nouns = {noun for noun, alive, _ in classes if alive == live}
            noun = nouns.pop() if len(nouns) == 1 else " ".join(key)
            entries[key] = Entry(noun, live, any(capital for *_, capital in classes))
    for phrase, (noun, live) in extension.items():
        entries[_key(phrase)] = Entry(noun, live)
    words = frozenset(w for key in entries for w in key)
    return Lexicon(entries, words, max(map(len, entries), default=1), source)


@functools.lru_cache(maxsize=1)
def load_lexicon() -> Lexicon:
    """ImageNet-1k (torchvision) plus :data:`EXTENSION`, built once per process.

    Without torchvision (an install without the ``models`` extra) the extension alone, with a warning.
    """
    try:
        categories = imagenet_categories()
    except ImportError as error:
        LOG.warning("subject naming: %s; naming with the %d-entry extension list only", error, len(EXTENSION))
        return build_lexicon((), source="extension")
    return build_lexicon(categories, source="torchvision ImageNet-1k + extension")


def kind_of(noun: str, other: str) -> bool:
    """Whether a class noun is ``other`` or a kind of it ("running shoe" of "shoe", "sunglasses" of "glasses")."""
    return noun == other or (" " not in other and noun.endswith(" " + other)) or KINDS.get(noun) == other


# --- phrases ------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[^\W\d_][\w'\u2019-]*|\d+|[^\w\s]")
_PARTICIPLE = re.compile(r"[a-z]{3,}(?:ing|ed)")
_PRONOUNS = frozenset("i you we they he she it who which that this one".split())
_PREPOSITIONS = frozenset("of for with in on and or".split())
_SENTENCE_END = frozenset(".!?:;|\u2022\u2013\u2014-\"(")


def _modal(tokens: list[str], i: int) -> bool:
    """Whether "can" at ``tokens[i]`` is the verb ("you can find", "Google can be used"), not the tin."""
    before = tokens[i - 1].lower() if i > 0 else ""
    after = tokens[i + 1].lower() if i + 1 < len(tokens) else ""
    return before in _PRONOUNS or (after.isalpha() and after not in _PREPOSITIONS
                                   and (after in STOPWORDS or after in VERBS or after.endswith("ly")))


def _prose(tokens: list[str]) -> bool:
    """Whether a text is prose, where a capital inside a sentence marks a name. A title ("Red Ceramic Teapot")
    capitalizes its words and says nothing: prose is long (8 words or more) or a third of its words are lower
    case, and not shouted in capitals."""
    words = [t for t in tokens if t[0].isalpha()]
    content = [t for t in words if len(t) > 3 and t.lower() not in STOPWORDS]
    if not content or sum(1 for t in content if t.isupper()) * 2 > len(content):
        return False
    return len(words) >= 8 or sum(1 for t in content if t.islower()) * 3 >= len(content)


@dataclass(frozen=True)
class Word:
    """A word of a run: as written (lower case), its normalized base form, and whether the text capitalizes
    it inside a sentence ("Jaguar" in "including Jaguar of Richmond": a name, not the animal)."""

    text: str
    base: str
    capitalized: bool = False


def runs(text: str, lexicon: Lexicon) -> list[list[Word]]:
    """Runs of content words of a text: what lies between stop words, verbs, numbers and punctuation.

    Two words that the lexicon knows as one are joined ("tea pot" -> "teapot", "t shirt" -> "tshirt"). An
    ``-ing``/``-ed`` word after a lexicon noun starts a new run ("wolf plushie | sitting"; before a noun it is a
    modifier: "standing spray"), and the verb "can" ends one ("you can find ...").
    """
    out: list[list[Word]] = []
    run: list[tuple[str, bool]] = []
    tokens = [*_TOKEN.findall(unicodedata.normalize("NFKC", text)), "."]
    prose = _prose(tokens)
    for i, token in enumerate(tokens):
        norm = _norm(token)
        content = (token[0].isalpha() and norm.isalpha() and norm not in STOPWORDS and norm not in VERBS
                   and not (norm == "can" and _modal(tokens, i)))
        if content and run and _PARTICIPLE.fullmatch(norm) and norm not in lexicon.words and (
                lexicon.base(_norm(run[-1][0])),) in lexicon.entries:
            out.extend(_joined(run, lexicon))  # "plushie | sitting ...": a verb after a noun starts a clause
            run = []
        if content:
            inside = i > 0 and tokens[i - 1] not in _SENTENCE_END
            run.append((token.lower(), prose and inside and token[0].isupper()))
            continue
        if run:
            out.extend(_joined(run, lexicon))
        run = []
    return out


def _joined(tokens: list[tuple[str, bool]], lexicon: Lexicon) -> list[list[Word]]:
    """A run's words with lexicon compounds joined, split again at single letters that joined nothing."""
    words: list[Word] = []
    pieces: list[list[Word]] = []
    i = 0
    while i < len(tokens):
        token, capitalized = tokens[i]
        norm = _norm(token)
        if i + 1 < len(tokens):
            joined = norm + _norm(tokens[i + 1][0])
            base = lexicon.base(joined)
            if (base,) in lexicon.entries:
                words.append(Word(joined, base, capitalized))
                i += 2
                continue
        if len(norm) < 2:
            if words:
                pieces.append(words)
            words = []
        else:
            words.append(Word(token.strip("'\u2019-"), lexicon.base(norm), capitalized))
        i += 1
    if words:
        pieces.append(words)
    return pieces


@dataclass(frozen=True)
class Naming:
    """One lexicon noun in a run: its class, whether it ends the run, and the phrases that end in it."""

    entry: Entry
    final: bool
    phrases: tuple[tuple[str, ...], ...]
    """``modifiers + head`` word tuples, shortest first ("plushie", "wolf plushie")."""
    head_words: int
    object_modified: bool
    proper: bool = False
    """A living class written as a name inside a sentence ("Jaguar of Richmond", "Red Lobster coupons")."""


def namings(run: Sequence[Word], lexicon: Lexicon, max_words: int = 4) -> list[Naming]:
    """Every lexicon noun of a run (the longest phrase the lexicon knows ending at each word), with the phrases
    that end in it: up to ``max_words`` words, never starting with a generic word ("photo") or an attribute
    after the noun."""
    out: list[Naming] = []
    bases = [w.base for w in run]
    j = len(run) - 1
    last_named = len(run)  # words after the last noun found so far (scanning right to left)
    while j >= 0:
        match = None
        for n in range(min(lexicon.max_words, j + 1), 0, -1):
            key = (*[_norm(w.text) for w in run[j - n + 1:j]], bases[j])
            entry = lexicon.get(key)
            if entry is not None and bases[j] not in GENERIC and not (
                    n == 1 and j > 0 and _attribute(run[j]) and (bases[j - 1],) in lexicon.entries):
                match = (n, entry)
                break
        if match is None:
            j -= 1
            continue
        n, entry = match
        after = run[j + 1:]
        final = all(_attribute(w) or w.base in GENERIC for w in after) and last_named == len(run)
        start = j - n + 1
        head = tuple(w.text if k < j else _surface(w) for k, w in enumerate(run[start:j + 1], start))
        phrases = [head]
        for m in range(1, max_words - n + 1):
            if start - m < 0:
                break
            modifiers = tuple(w.text for w in run[start - m:start])
            if modifiers[0] in GENERIC or _norm(modifiers[0]) in GENERIC:
                break
            phrases.append(modifiers + head)
        object_modified = any(_norm(w.text) in OBJECT_MODIFIERS for w in run[max(0, start - 2):start])
        proper = entry.is_live and not entry.may_capitalize and run[j].capitalized
        out.append(Naming(entry, final, tuple(phrases), n, object_modified, proper))
        last_named = start
        j = start - 1
    return out


def _attribute(word: Word) -> bool:
    return word.base in ATTRIBUTES or _norm(word.text) in ATTRIBUTES


def _surface(word: Word) -> str:
    """A head word as a subject phrase writes it: singular unless the lexicon or usage keeps the plural."""
    norm = _norm(word.text)
    return word.text if norm == word.base or norm in PLURALIA else word.base


# --- the URL slug ---------------------------------------------------------------------------------------------

SHOP_PATH_WORDS = frozenset("""products product produkt produkte produit produits producto productos prodotto
prodotti produto produtos artikel artikelen article articles item items p dp gp ip pd sku shop shops store stores
boutique tienda negozio loja winkel collections collection collectie kollektion category categories kategorie
catalog catalogue katalog c view detail details index default home page pages html htm www amp id pid ref
en de fr es it nl pt pl sv da fi no ja zh ko ru us uk ca au""".split())
"""Path words that say where a page sits in a shop or site, never what it shows (lower case, several languages)."""

_IGNORED_QUERY_KEYS = frozenset("""lang language locale hl currency page sort order variant sid session sessionid
ref utm_source utm_medium utm_campaign utm_term utm_content gclid fbclid""".split())
_PAGE_EXTENSION = re.compile(r"(?i)\.(?:html?|shtml|xhtml|php\d?|aspx?|jsp|cfm|cgi|pl|jpe?g|png|gif|webp)$")
_SLUG_TOKEN = re.compile(r"[^\W_]+")
_NAME_WITH_NUMBER = re.compile(r"([^\W\d_]{3,})\d+")


def slug_words(page_url: str | None) -> list[str]:
    """The words of the URL segment that names the page, or ``[]``.

    Segments are tried from the last path segment, then the query's values (``view?id=wolf_plushie``), then
    the earlier path segments backwards (``/teapot/id-123``); the first with a content word wins, so a
    category (``/dogs/...``) is only read when the page's own segment is an id. Each is percent-decoded and
    NFKC-normalized, without file extensions, numbers, ids (words with digits; a trailing number is cut from a
    word: ``cat2`` -> ``cat``) and shop path words (:data:`SHOP_PATH_WORDS`).
    """
    if not page_url:
        return []
    try:
        parts = urlsplit(page_url.strip())
    except ValueError:
        return []
    path = [s for s in parts.path.split("/") if s][::-1]
    query = [value for key, value in parse_qsl(parts.query) if key.lower() not in _IGNORED_QUERY_KEYS]
    for segment in [*path[:1], *query, *path[1:]]:
        text = unicodedata.normalize("NFKC", unquote(unquote(segment).replace("+", " "), errors="replace"))
        text = _PAGE_EXTENSION.sub("", text).lower()
        words = []
        for token in _SLUG_TOKEN.findall(text):
            named = _NAME_WITH_NUMBER.fullmatch(token)
            token = named.group(1) if named else token
            if token.isalpha() and token not in SHOP_PATH_WORDS:
                words.append(token)
        if any(len(w) > 1 and w not in STOPWORDS and w not in GENERIC for w in words):
            return words
    return []


# --- file names ---------------------------------------------------------------------------------------------

_PAGESPEED = re.compile(r"(?i)^x?(.+?\.(?:jpe?g|png|gif|webp))\.pagespeed\.\w+\.[\w-]+\.\w+$")
_FILE_EXTENSIONS = re.compile(r"(?i)(?:\.(?:jpe?g|jfif|png|gif|webp|bmp|tiff?|heic|heif|avif|svg))+$")
_FILE_SPLIT = re.compile(r"[\W_]+|(?<=[a-z])(?=[A-Z][a-z])")
_FILE_NOISE = frozenset("""img dsc dscn dscf dcim pxl mvimg gopr dji screenshot scan copy edit edited final resized
scaled thumb thumbnail min web hd hq lq orig original maxresdefault hqdefault mqdefault sddefault default untitled
unnamed download image images photo photos pic pics picture""".split())


def file_name_words(name: str) -> str:
    """The words of an image file name, or ``""``: ``pink sunglasses 04.jpg`` -> ``pink sunglasses``.

    Extensions, numbers, ids (words with digits), camera and editor names (``IMG``, ``DSC``, ``screenshot``,
    ``-scaled``) and mod_pagespeed's rewrite (``xNAME.jpg.pagespeed.ic.HASH.jpg``) go; the words stay, in
    their case. Nothing is left unless a word of three letters or more that is not a stop word remains.
    """
    name = unquote(name, errors="replace").rsplit("/", 1)[-1]
    rewritten = _PAGESPEED.match(name)
    if rewritten:
        name = rewritten.group(1)
    name = _FILE_EXTENSIONS.sub("", name)
    words = [w for w in _FILE_SPLIT.split(name)
             if w and w.isalpha() and len(w) > 1 and w.lower().removeprefix("x") not in _FILE_NOISE
             and w.lower() not in _FILE_NOISE]
    if not any(len(w) >= 3 and w.lower() not in STOPWORDS for w in words):
        return ""
    return " ".join(words)


# --- the decision ---------------------------------------------------------------------------------------------

TEXT_WEIGHT = 2.0
"""Score of a class named in every image that has text: worth two slugs, so most images outvote a URL."""
SLUG_WEIGHT = 1.0
"""Score of the class the slug's first phrase ends in (its head noun)."""
MENTION_WEIGHT = 0.5
"""A noun inside a phrase ("dog" in "dog collar") or a later noun of the slug: weaker evidence."""
SLUG_MAX_WORDS = 3
"""Longest subject phrase taken from a slug: slugs put brand names, pet names and SKUs before the product's
name ("acme-ceramic-teapot", "bella-golden-retriever-puppy"); the texts' phrases are bounded by support instead."""


@dataclass(frozen=True)
class SubjectName:
    """What :func:`name_subject` decided, with the evidence, for reports and benchmarks."""

    subject: str | None
    class_noun: str | None
    is_live: bool | None
    score: float = 0.0
    evidence: str = ""


NO_SUBJECT = SubjectName(None, None, None)



@dataclass
class _Class:
    entry: Entry
    slug_weight: float = 0.0
    object_modified: int = 0
    occurrences: int = 0
    proper_uses: int = 0


def _image_namings(texts: Iterable[str], lexicon: Lexicon, max_words: int) -> list[Naming]:
    return [naming for text in texts for run in runs(text, lexicon) for naming in namings(run, lexicon, max_words)]


def _slug_namings(page_url: str | None, lexicon: Lexicon, max_words: int) -> list[tuple[Naming, float]]:
    """The slug's nouns with their weight: its head noun (the first noun that ends a phrase in the slug's name,
    the words before any stop word or verb) ``SLUG_WEIGHT``, the others ``MENTION_WEIGHT``. A slug that reads as
    a sentence ("how-to-build-end-walls-of-barrel-sauna", "my-desk-setup") has no head noun."""
    words = slug_words(page_url)
    cut = next((i for i, w in enumerate(words) if w in STOPWORDS or w in VERBS), len(words))
    out: list[tuple[Naming, float]] = []
    head_taken = False
    for in_name, part in ((True, words[:cut]), (False, words[cut:])):
        for run in runs(" ".join(part), lexicon):
            for naming in reversed(namings(run, lexicon, max_words)):  # left to right
                head = naming.final and not head_taken and in_name
                head_taken = head_taken or head
                out.append((naming, SLUG_WEIGHT if head else MENTION_WEIGHT))
    return out


def name_subject(page_url: str | None, texts_per_image: Sequence[Iterable[str | None]], *, min_support: int = 2,
                 min_share: float = MIN_SHARE, max_words: int = 4, lexicon: Lexicon | None = None) -> SubjectName:
    """The subject of a cluster from its page URL and each image's texts (cleaned alt text, caption).

    Every lexicon class found scores ``TEXT_WEIGHT x`` the share of images with text that name it (a naming
    counts 1, a mention 0.5, each image once) ``+ SLUG_WEIGHT`` when it is the slug's head noun (0.5 for other
    slug nouns). Evidence for a kind counts for its class too ("sunglasses" for "glasses"). A class needs to
    be the slug's head noun, or named in at least ``min_support`` images and ``min_share`` of the images with
    text; a living class the texts only write as a name ("Jaguar of Richmond") is out. The best score wins, a
    more specific class wins a tie with its own kind, and a tie between unrelated classes names nothing.

    The subject is the longest phrase ending in the class (or a kind of it) that the slug gives or that at
    least ``max(min_support, half the namings)`` images share (the slug wins a tie of length); ``is_live`` is
    the class's, unless an object word makes it a thing ("toy dog": not alive, and its class is "toy").
    """
    lexicon = lexicon or load_lexicon()
    classes: dict[str, _Class] = {}
    per_image: list[dict[str, float]] = []  # per image with text: class noun -> 1 (named) or 0.5 (mentioned)
    phrase_images: dict[tuple[str, tuple[str, ...]], int] = {}
    head_words: dict[tuple[str, ...], int] = {}
    for texts in texts_per_image:
        texts = [text for text in texts if text and text.strip()]
        if not texts:
            continue
        weights: dict[str, float] = {}
        seen: set[tuple[str, tuple[str, ...]]] = set()
        for naming in _image_namings(texts, lexicon, max_words):
            noun = naming.entry.class_noun
            cls = classes.setdefault(noun, _Class(naming.entry))
            if naming.proper:
                cls.proper_uses += 1
                continue
            cls.occurrences += 1
            cls.object_modified += naming.object_modified
            weights[noun] = max(weights.get(noun, 0.0), 1.0 if naming.final else MENTION_WEIGHT)
            for phrase in naming.phrases:
                seen.add((noun, phrase))
                head_words[phrase] = naming.head_words
        per_image.append(weights)
        for key in seen:
            phrase_images[key] = phrase_images.get(key, 0) + 1
    slug_phrases: dict[str, tuple[str, ...]] = {}
    for naming, weight in _slug_namings(page_url, lexicon, min(max_words, SLUG_MAX_WORDS)):
        noun = naming.entry.class_noun
        cls = classes.setdefault(noun, _Class(naming.entry))
        cls.occurrences += 1
        cls.object_modified += naming.object_modified
        if weight > cls.slug_weight:
            cls.slug_weight = weight
            slug_phrases[noun] = naming.phrases[-1]
            head_words[naming.phrases[-1]] = naming.head_words
    # A living class the texts only write as a name is a brand or a restaurant, whatever the slug says.
    for noun in [noun for noun, cls in classes.items() if cls.proper_uses and not any(noun in w for w in per_image)]:
        del classes[noun]
    n_text = len(per_image)

    def kinds(noun: str) -> list[str]:
        return [other for other in classes if kind_of(other, noun)]

    scored: list[tuple[float, str, int, float]] = []
    for noun in classes:
        family = kinds(noun)
        text = sum(max((w for other, w in weights.items() if other in family), default=0.0) for weights in per_image)
        named_in = sum(1 for weights in per_image if any(weights.get(other) == 1.0 for other in family))
        slug = max(classes[other].slug_weight for other in family)
        if slug == SLUG_WEIGHT or (named_in >= min_support and named_in >= min_share * n_text):
            scored.append((TEXT_WEIGHT * text / max(n_text, 1) + slug, noun, named_in, slug))
    if not scored:
        return NO_SUBJECT
    top = max(item[0] for item in scored)
    tied = [item for item in scored if top - item[0] < 1e-9]
    tied = [item for item in tied if not any(other[1] != item[1] and kind_of(other[1], item[1]) for other in tied)]
    if len(tied) > 1:
        return SubjectName(None, None, None, round(top, 3), "tie: " + ", ".join(sorted(item[1] for item in tied)))
    score, noun, named_in, slug = tied[0]
    family = kinds(noun)
    phrase = _subject_phrase(family, phrase_images, slug_phrases, named_in, min_support)
    modifiers = phrase[:-head_words.get(phrase, 1)]
    modified = sum(classes[o].object_modified for o in family) * 2 > sum(classes[o].occurrences for o in family)
    class_noun, is_live = noun, classes[noun].entry.is_live
    if is_live and (modified or any(_norm(m) in OBJECT_MODIFIERS for m in modifiers)):
        is_live = False
        # "toy dog", "plush wolf": the thing's own class when the modifier has one ("toy", "stuffed animal").
        things = [entry for m in reversed(modifiers) if (entry := lexicon.get((lexicon.base(_norm(m)),)))]
        if things and not things[0].is_live:
            class_noun = things[0].class_noun
    evidence = f"named in {named_in}/{n_text} images with text" + (", slug head" if slug == SLUG_WEIGHT else "")
    return SubjectName(" ".join(phrase), class_noun, is_live, round(score, 3), evidence)


def _subject_phrase(family: list[str], phrase_images: dict[tuple[str, tuple[str, ...]], int],
                    slug_phrases: dict[str, tuple[str, ...]], named_in: int, min_support: int) -> tuple[str, ...]:
    """The longest phrase ending in the class (or a kind of it) from the slug or shared by enough images."""
    needed = max(min_support, math.ceil(named_in / 2))
    candidates = [(-len(slug_phrases[noun]), 0, 0, slug_phrases[noun]) for noun in family if noun in slug_phrases]
    candidates += [(-len(phrase), 1, -support, phrase) for (noun, phrase), support in phrase_images.items()
                   if noun in family and support >= needed]
    if candidates:
        return min(candidates)[3]
    # Named in too few images to agree on a longer phrase: the noun as it is written most often.
    heads = [(support, phrase) for (noun, phrase), support in phrase_images.items() if noun in family]
    return max(heads, key=lambda item: (item[0], -len(item[1]), item[1]))[1]


def is_live_phrase(phrase: str, lexicon: Lexicon | None = None) -> bool | None:
    """Whether a noun phrase names a living being: its head noun's class is alive and no modifier makes it a
    thing ("golden retriever": yes; "toy dog", "dog bowl": no). ``None`` when the lexicon knows no head."""
    lexicon = lexicon or load_lexicon()
    for run in runs(phrase, lexicon):
        found = namings(run, lexicon)
        if found and found[0].final:
            return found[0].entry.is_live and not found[0].object_modified
    return None
