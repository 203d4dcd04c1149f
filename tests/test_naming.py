"""Offline subject naming: the ImageNet lexicon, URL slugs, file names, and realistic pages through the backend.

The pages below are written for these tests in the shapes crawled pages take (shop slugs with ids and
variants, noisy alt texts, non-English and percent-encoded URLs, pages with no usable evidence); their photos
are the bundled sample's real DreamBench photos. Real crawled pages are in tests/test_subject.py
(tests/data/web_pages.json).
"""

from __future__ import annotations

import random
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.clusters import sample_clusters
from transforms.naming import (
    EXTENSION,
    build_lexicon,
    file_name_words,
    imagenet_categories,
    is_live_phrase,
    kind_of,
    load_lexicon,
    name_subject,
    runs,
    slug_words,
)
from transforms.prompts import PromptsConfig, ScenePrompts
from transforms.scene_templates import LIVE_ONLY, allowed_skills
from transforms.settings import LLMConfig
from transforms.subject import Subject, SubjectConfig, offline_result

# --- the lexicon -------------------------------------------------------------------------------------------------


def test_lexicon_is_torchvisions_imagenet_1k() -> None:
    from torchvision.models import ResNet50_Weights

    names = imagenet_categories()
    assert names == tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])  # the fast read is the public list
    assert (names[0], names[397], names[398], names[207]) == ("tench", "puffer", "abacus", "golden retriever")
    assert load_lexicon().source.startswith("torchvision ImageNet-1k")


@pytest.mark.parametrize("phrase, class_noun, live", [
    ("golden retriever", "dog", True), ("Golden Retrievers", "dog", True), ("Persian cat", "cat", True),
    ("tabby", "cat", True), ("dog", "dog", True), ("cat", "cat", True), ("wolves", "wolf", True),
    ("fox", "fox", True), ("toy poodle", "dog", True), ("scuba diver", "scuba diver", True),
    ("puppy", "dog", True), ("kitten", "cat", True), ("hotdog", "hotdog", False), ("teapots", "teapot", False),
    ("backpack", "backpack", False), ("running shoe", "running shoe", False), ("shoe", "shoe", False),
    ("sunglasses", "sunglasses", False), ("wall clock", "wall clock", False), ("clock", "clock", False),
    ("teddy", "stuffed animal", False), ("plushie", "stuffed animal", False), ("sneakers", "sneaker", False),
    # "cardigan" is a Welsh corgi (class 264) and a sweater (474): a tie is a thing.
    ("cardigan", "cardigan", False),
])
def test_lexicon_tells_animals_from_things(phrase: str, class_noun: str, live: bool) -> None:
    entry = load_lexicon().find(phrase)
    assert entry is not None and (entry.class_noun, entry.is_live) == (class_noun, live)


def test_the_extension_only_adds_what_imagenet_lacks() -> None:
    imagenet = build_lexicon(imagenet_categories(), extension={})
    missing = {phrase for phrase in EXTENSION if imagenet.find(phrase) is None}
    # Where ImageNet has the phrase, the extension overrides it on purpose (see EXTENSION's docstring).
    assert set(EXTENSION) - missing == {"teddy", "glasses", "jeans", "jacket"}
    # "dog", "cat", "bird", "fish" are ImageNet's own, from its breeds and species.
    assert all(imagenet.find(noun).is_live for noun in ("dog", "cat", "bird", "fish"))
    assert imagenet.find("sneaker") is None
    assert len(EXTENSION) < 80


@pytest.mark.parametrize("phrase, live", [
    ("golden retriever", True), ("cat", True), ("little girl", True), ("toy poodle", True),
    ("toy dog", False), ("plush bear", False), ("stuffed animal", False), ("rubber duck", False),
    ("dog bowl", False), ("wooden horse", False), ("ceramic cat", False), ("dog collar", None),
])
def test_is_live(phrase: str, live: bool | None) -> None:
    assert is_live_phrase(phrase) is live


def test_kinds() -> None:
    assert kind_of("running shoe", "shoe") and kind_of("sunglasses", "glasses") and kind_of("sneaker", "shoe")
    assert not kind_of("shoe", "running shoe") and not kind_of("teapot", "pot") and not kind_of("elephant", "ant")


def test_runs_join_compounds_and_cut_at_verbs() -> None:
    lexicon = load_lexicon()

    def words(text: str) -> list[list[str]]:
        return [[w.text for w in run] for run in runs(text, lexicon)]

    assert words("A red tea pot, for tea.") == [["red", "teapot"], ["tea"]]
    assert words("wolf plushie sitting on a shelf") == [["wolf", "plushie"], ["sitting"], ["shelf"]]
    assert words("floral standing spray") == [["floral", "standing", "spray"]]
    assert words("You can find awesome fonts") == [["awesome", "fonts"]]  # "can", the verb
    assert words("Buy the can - today") == [["can"], ["today"]]  # the tin


# --- URL slugs and file names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("url, words", [
    ("https://shop.example.com/products/wolf-plushie-8", ["wolf", "plushie"]),
    ("https://shop.example.com/products/view?id=wolf_plushie&lang=en", ["wolf", "plushie"]),
    ("https://shop.example.com/products/wolf-plushie-8?variant=40123&utm_source=mail", ["wolf", "plushie"]),
    ("https://store.example.net/p/8812-ceramic-tea-pot", ["ceramic", "tea", "pot"]),
    ("https://www.example.com/Acme-Ceramic-Teapot-Red/dp/B07XYZ1234", ["acme", "ceramic", "teapot", "red"]),
    ("https://shop.example.com/products/pink%20sunglasses%2004.html", ["pink", "sunglasses"]),
    ("https://shop.example.com/products/cat2", ["cat"]),
    ("https://shop.example.jp/products/%E3%83%86%E3%82%A3%E3%83%BC%E3%83%9D%E3%83%83%E3%83%88-2", ["ティーポット"]),
    ("https://boutique.example.fr/produits/th%C3%A9i%C3%A8re-fonte-noire", ["théière", "fonte", "noire"]),
    ("https://xn--mbel-5qa.example/de/produkte/Teekanne%20rot", ["teekanne", "rot"]),
    ("https://www.1stdibs.com/furniture/tables/console-tables/tessellated-stone-bronze-console-table-maitland-"
     "smith/id-f_13522602/", ["tessellated", "stone", "bronze", "console", "table", "maitland", "smith"]),
    ("http://johanthermaenius.se/index.php?page=work&id=115", []),
    ("https://blog.example.org/2024/05/", []),
    ("https://www.example.com/", []),
    (None, []),
])
def test_slug_words(url: str | None, words: list[str]) -> None:
    assert slug_words(url) == words


@pytest.mark.parametrize("name, words", [
    ("pink sunglasses 04.jpg", "pink sunglasses"),
    ("wolf-plushie-photo-3.jpg", "wolf plushie"),
    ("wolfPlushie_01-scaled.jpg", "wolf Plushie"),
    ("images/products/wolf-plushie-8.jpg", "wolf plushie"),
    ("Christmas+Gift+ideas.png", "Christmas Gift ideas"),
    ("xdog-gastric-dilation.jpg.pagespeed.ic.4kZnT_vGt5.jpg", "dog gastric dilation"),  # mod_pagespeed's rewrite
    ("IMG_1101.jpg", ""), ("xDSC_0045-01.jpg", ""), ("screenshot-162.png", ""), ("maxresdefault.jpg", ""),
    ("c267370d-3b87-413d-96d1-65a22d8067ce.jpg", ""), ("6410688719_6f453e5065_o.jpg", ""), ("Figure1.png", ""),
    ("Screenshot 2020-01-01 at 10.00.00.png", ""),
])
def test_file_name_words(name: str, words: str) -> None:
    assert file_name_words(name) == words


# --- realistic pages through the offline backend -------------------------------------------------------------------

# (page URL, alt text of each image, expected (subject, class_noun, is_live)); None: no subject.
PAGES: list[tuple[str, list[str | None], tuple[str, str, bool] | None]] = [
    # The page: named "handmade" before.
    ("https://shop.example.com/products/wolf-plushie-8",
     ["wolf plushie photo", "Handmade wolf plushie 04.jpg", "Handmade | Example Crafts", "IMG_2231.JPG",
      "wolf-plushie-photo-3.jpg"], ("wolf plushie", "stuffed animal", False)),
    ("https://shop.example.com/collections/summer/products/pink-sunglasses?variant=4012",
     ["pink sunglasses 04.jpg", "Pink Sunglasses | Sunny Shop", "DSC_0042.JPG",
      "\U0001f525 SALE \U0001f525 pink sunglasses -30% today only", ""], ("pink sunglasses", "sunglasses", False)),
    # The texts say "glasses", the slug a kind of glasses: the class is the texts', the name the shop's.
    ("https://shop.example.com/products/pink-sunglasses", [None, "glasses", "Glasses | Example Shop", "glasses"],
     ("pink sunglasses", "glasses", False)),
    # A dog's page: alive, whatever the breed is called.
    ("https://www.happy-tails.example/adopt/dogs/bella-golden-retriever-puppy",
     ["Bella, our golden retriever puppy, 9 weeks old", "Bella-golden-retriever-03.jpg",
      "Golden retriever puppy playing in the grass", "IMG_5512.JPG"], ("golden retriever puppy", "dog", True)),
    ("https://www.cattery.example/kittens/luna",
     ["Luna, a blue Persian kitten", "Luna the Persian cat at 12 weeks", "persian-kitten-luna-2.jpg"],
     ("persian kitten", "cat", True)),
    # A thing shaped like an animal: not alive, and its class is the thing's.
    ("https://shop.example.com/products/plush-dog-large",
     ["Plush dog, large", "plush dog 03.jpg", "Soft plush dog for kids - only $19.99"], ("plush dog", "stuffed animal",
                                                                                         False)),
    # A German shop whose alt texts are partly English; a Japanese slug (percent-encoded) with English alt texts.
    ("https://www.moebel.example/de/produkte/teekanne-keramik-rot-4711",
     ["Teekanne Keramik rot", "ceramic teapot red 01.jpg", "Ceramic teapot, red | Möbel Example", "teapot"],
     ("ceramic teapot", "teapot", False)),
    ("https://shop.example.jp/products/%E3%83%86%E3%82%A3%E3%83%BC%E3%83%9D%E3%83%83%E3%83%88-2",
     ["ティーポット", "cast iron teapot", "Cast iron teapot (view 2)", ""], ("cast iron teapot", "teapot", False)),
    # Words after the noun say which one, or for whom.
    ("https://shop.example.com/products/backpack-kids-blue", ["Backpack Kids Blue", "backpack kids 02.jpg", None],
     ("backpack", "backpack", False)),
    # A slug alone names a product it spells out; a brand and an SKU do not get in the way.
    ("https://www.example-store.com/acme-stainless-steel-water-bottle-750ml-sku-88123", [None, "", "IMG_0001.JPG"],
     ("steel water bottle", "water bottle", False)),
    # No evidence in English, or none at all: no subject rather than a wrong one.
    ("https://www.moebel.example/de/produkte/kerze-rot", ["Kerze rot", "Kerze rot 02.jpg", "Duftkerze"], None),
    ("https://shop.example.com/products/8812", ["IMG_1234.JPG", "", None, "DSC_0042.jpeg"], None),
    ("https://www.example.com/blog/how-to-clean-a-cast-iron-teapot", [None, None, "IMG_7781.jpg"], None),
    ("https://blog.example.org/2024/05/my-desk-setup", ["my desk setup", "Backpack", "wall clock", "desk lamp"], None),
    ("https://shop.example.com/products/dog-collar-red", ["dog collar", "red dog collar 02.jpg", "Dog collar"], None),
]


def _page_cluster(cluster: Any, url: str, texts: list[str | None]) -> Any:
    images = tuple(image.replace(text=text, caption=None) for image, text in zip(cluster.images, texts, strict=False))
    return cluster.replace(page_url=url, images=images)


@pytest.fixture(scope="module")
def photos(sample_rows) -> Any:
    """A real cluster of six DreamBench photos to hang the pages' texts on."""
    (cluster,) = sample_clusters(sample_rows, ["/products/backpack"])
    return cluster


@pytest.mark.parametrize("url, texts, expected", PAGES, ids=[page[0][8:60] for page in PAGES])
def test_offline_backend_on_realistic_pages(photos, url: str, texts: list[str | None],
                                            expected: tuple[str, str, bool] | None) -> None:
    result = offline_result(_page_cluster(photos, url, texts), min_support=2)
    assert (result.subject, result.class_noun, result.is_live) == (expected or (None, None, None))


def test_naming_is_deterministic_and_ignores_image_order() -> None:
    url, texts, _ = PAGES[3]
    pairs = [(text,) for text in texts]
    first = name_subject(url, pairs)
    for seed in range(5):
        random.Random(seed).shuffle(pairs)
        assert name_subject(url, pairs) == first


def test_unrelated_classes_tied_name_nothing() -> None:
    name = name_subject(None, [("a teapot",), ("the teapot",), ("a vase",), ("the vase",)])
    assert name.subject is None and name.evidence == "tie: teapot, vase"
    # One more image settles it.
    assert name_subject(None, [("a teapot",), ("the teapot",), ("a vase",), ("the vase",), ("teapot",)]).subject == (
        "teapot")


def test_a_name_is_not_an_animal() -> None:
    # A car dealer's texts (MMC4, jaguarchantilly.com) write "Jaguar" as a name; the animal is out, slug or not.
    texts = [("Many other dealers have been wondering how we do it, including Jaguar of Richmond, Virginia.",),
             ("We're proud of our huge inventory of luxury Jaguar, including the Jaguar XE and Jaguar XF.",)]
    assert name_subject("https://www.example-dealer.com/new_jaguar.cfm", texts).subject is None
    assert name_subject(None, [("a jaguar resting in a tree",), ("The jaguar at the zoo",)]).is_live is True


def test_a_dogs_page_gets_the_live_only_skills(photos) -> None:
    dog = _page_cluster(photos, PAGES[3][0], PAGES[3][1])
    plush = _page_cluster(photos, PAGES[5][0], PAGES[5][1])
    with TestPipeline() as p:
        named, _ = p | beam.Create([dog, plush]) | Subject(SubjectConfig(backend="offline"), LLMConfig())
        out, _ = named | ScenePrompts(PromptsConfig(backend="templates", n=12), LLMConfig())
        assert_that(out | beam.Map(lambda c: (c.page_url, c.class_noun, c.is_live,
                                              bool({pr.skill for pr in c.prompts} & LIVE_ONLY))),
                    equal_to([(dog.page_url, "dog", True, True), (plush.page_url, "stuffed animal", False, False)]))
    assert set(allowed_skills(True)) >= LIVE_ONLY and not set(allowed_skills(False)) & LIVE_ONLY
