"""Scene prompts without a model: the skill taxonomy and the template grammar.

What the prompts stage's ``templates`` backend writes (and checks a model's prompts against), and what phase 2
falls back to for a cluster that reached it without prompts (``synth.fallback_prompts``) -- plain functions, no
Beam and no model client, so the synthesis phase imports them without the model stages.

* :func:`template_prompts`: a grammar of templates and broad vocabularies per skill
  (``transforms/llm_prompts/scene_templates_v1.json``: artists and art forms, places and light, views and shots,
  colours, materials and textures, outfits and accessories, emotions and actions), chosen deterministically from
  the cluster id. It knows living subjects from objects: no "sleepy teapot", and no "teapot wearing a chef
  outfit" -- objects get accessorization (decorations, wrappings, never clothes) only with
  ``accessorize_objects``.
* :func:`check_prompts`: every prompt holds the ``{subject}`` placeholder exactly once (a noun phrase without its
  article: "a {subject} on a beach"), no other braces, a length within bounds, a known skill that suits the
  subject, the requested number per skill, and no near-duplicates within the cluster (content-word Jaccard
  similarity at most ``max_similarity``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from schemas.records import Prompt
from transforms.naming import STOPWORDS
from transforms.prompt_files import load_prompt
from transforms.settings import DEFAULT_MIX, PLACEHOLDER, SKILLS, check_mix

LIVE_ONLY = frozenset({"emotion_action", "accessorization"})
"""Skills a lifeless subject never gets (accessorization: unless ``accessorize_objects``)."""

SKILL_DESCRIPTIONS = {
    "stylization": "the subject as an artwork: a painting, drawing, print or sculpture, an art style or an artist's "
                   "style",
    "recontextualization": "the subject in a new place or setting: a landscape, a room, a city, a landmark, "
                           "another time of day or weather",
    "novel_view": "the subject from a new viewpoint or framing: from above, below, behind, a close-up, a wide shot",
    "property_change": "the subject with another colour, material, texture, pattern or shape",
    "accessorization": "living subjects: the subject wearing clothes, an outfit, a costume or accessories; objects "
                       "(only when requested): the subject decorated or wrapped, never dressed",
    "emotion_action": "living subjects only: the subject showing an emotion or doing something",
}


GRAMMAR = "scene_templates_v1.json"


def allowed_skills(is_live: bool, accessorize_objects: bool = False) -> tuple[str, ...]:
    return tuple(s for s in SKILLS if is_live or s not in LIVE_ONLY or (s == "accessorization" and accessorize_objects))


# --- counts per skill ------------------------------------------------------------------------------------

def skill_counts(n: int, mix: Mapping[str, float], is_live: bool, rng: random.Random,
                 accessorize_objects: bool = False) -> dict[str, int]:
    """How many prompts of each skill: ``n`` times the mix over the subject's skills, rounded so that the
    expected count of every skill is exactly its share (systematic sampling of the fractional parts)."""
    allowed = allowed_skills(is_live, accessorize_objects)
    weights = {s: float(mix.get(s, 0.0)) for s in allowed if mix.get(s, 0.0) > 0}
    if not weights:  # a mix of live-only skills for an object: fall back to every skill the subject can have
        weights = {s: 1.0 for s in allowed}
    total = sum(weights.values())
    exact = {s: n * w / total for s, w in weights.items()}
    counts = {s: int(x) for s, x in exact.items()}
    remainder = n - sum(counts.values())
    if remainder:
        start, cumulative = rng.random(), 0.0
        points = [start + k for k in range(remainder)]
        for s in weights:
            low, cumulative = cumulative, cumulative + exact[s] - int(exact[s])
            counts[s] += sum(1 for p in points if low <= p < cumulative)
        # Floating-point slack at the very end of the interval: give any missed point to the largest fraction.
        missing = n - sum(counts.values())
        for s in sorted(weights, key=lambda s: -(exact[s] - int(exact[s])))[:missing]:
            counts[s] += 1
    return {s: c for s, c in counts.items() if c}


# --- validation -----------------------------------------------------------------------------------------------

def content_words(prompt: str) -> frozenset[str]:
    text = prompt.replace(PLACEHOLDER, " ").lower()
    return frozenset(w for w in re.findall(r"[^\W_]+", text) if w not in STOPWORDS and w not in ("photo",))


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of two prompts' content words (the placeholder and stop words left out)."""
    wa, wb = content_words(a), content_words(b)
    if not wa and not wb:
        return 1.0
    return len(wa & wb) / len(wa | wb)


def prompt_text_problem(text: str, min_chars: int, max_chars: int) -> str | None:
    """What is wrong with one prompt's text, or ``None``."""
    if text.count(PLACEHOLDER) != 1:
        return f"must contain {PLACEHOLDER} exactly once"
    if text.replace(PLACEHOLDER, "").count("{") or text.replace(PLACEHOLDER, "").count("}"):
        return "must not contain braces other than the placeholder"
    if "\n" in text:
        return "must be one line"
    if not min_chars <= len(text) <= max_chars:
        return f"has {len(text)} characters, must have {min_chars}-{max_chars}"
    return None


def check_prompts(prompts: Sequence[Prompt], counts: Mapping[str, int], is_live: bool, *, min_chars: int,
                  max_chars: int, max_similarity: float, accessorize_objects: bool = False) -> list[str]:
    """Every problem of a cluster's prompts (empty: valid)."""
    problems: list[str] = []
    expected = sum(counts.values())
    if len(prompts) != expected:
        problems.append(f"expected {expected} prompts, got {len(prompts)}")
    allowed = allowed_skills(is_live, accessorize_objects)
    for i, prompt in enumerate(prompts, 1):
        if prompt.skill not in SKILLS:
            problems.append(f"prompt {i}: unknown skill {prompt.skill!r}")
        elif prompt.skill not in allowed:
            problems.append(f"prompt {i}: skill {prompt.skill} is not for a {'living' if is_live else 'lifeless'} "
                            f"subject")
        problem = prompt_text_problem(prompt.prompt, min_chars, max_chars)
        if problem:
            problems.append(f"prompt {i} {problem}")
    got = {s: sum(1 for p in prompts if p.skill == s) for s in SKILLS}
    wrong = [f"{s}: {got[s]} instead of {counts.get(s, 0)}" for s in SKILLS if got[s] != counts.get(s, 0)]
    if wrong and len(prompts) == expected:
        problems.append("skill counts differ: " + ", ".join(wrong))
    for i in range(len(prompts)):
        for j in range(i + 1, len(prompts)):
            if similarity(prompts[i].prompt, prompts[j].prompt) >= max_similarity:
                problems.append(f"prompts {i + 1} and {j + 1} are near-duplicates")
    return problems


# --- the templates backend --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def load_grammar(name: str = GRAMMAR) -> tuple[dict[str, Any], str]:
    """The template grammar (read-only, cached per process) and its provenance tag ``name@sha256[:12]``."""
    prompt = load_prompt(name)
    grammar = json.loads(prompt.text)
    return grammar, prompt.tag


_SLOT = re.compile(r"\{(\w+)(?:#(\d))?\}")
# "a oil painting" -> "an oil painting"; the placeholder keeps its "a" (the subject phrase is filled later).
_ARTICLE_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _fill(template: str, slots: Mapping[str, Sequence[str]], rng: random.Random, exclude: frozenset[str],
          used: Mapping[str, set[str]]) -> tuple[str, list[tuple[str, str]]]:
    """A template with its slots filled: values not used yet in the cluster, not naming the class noun, and
    distinct within the prompt (``{colour}`` and ``{colour#2}``)."""
    chosen: list[tuple[str, str]] = []

    def pick(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "subject":
            return PLACEHOLDER
        taken = {value for slot, value in chosen if slot == name}
        options = [v for v in slots[name] if v not in taken and v not in used.get(name, ())
                   and not (exclude & set(re.findall(r"[a-z]+", v.lower())))]
        if not options:  # every value already used in this cluster: repeats across prompts are allowed
            options = [v for v in slots[name] if v not in taken]
        value = rng.choice(options)
        chosen.append((name, value))
        return value

    return _ARTICLE_BEFORE_VOWEL.sub(r"\1n ", _SLOT.sub(pick, template)), chosen


def template_prompts(cluster_id: str, class_noun: str | None, is_live: bool, n: int,
                     mix: Mapping[str, float] | None = None, *, accessorize_objects: bool = False,
                     max_similarity: float = 0.6, min_chars: int = 12, max_chars: int = 160) -> tuple[Prompt, ...]:
    """``n`` scene prompts for a cluster from the template grammar, deterministic from ``cluster_id``.

    Skills follow ``mix`` (default :data:`DEFAULT_MIX`) over the skills the subject can have (emotion/action
    and accessorization only when ``is_live``; accessorization of objects with ``accessorize_objects``).
    Vocabulary that names the ``class_noun`` is skipped ("a backpack" is no accessory for a backpack), and
    no two prompts of the cluster are near-duplicates. Each ``Prompt.prompt`` holds ``{subject}`` once.
    """
    check_mix(mix or DEFAULT_MIX)
    grammar, tag = load_grammar()
    counts = skill_counts(n, mix or DEFAULT_MIX, is_live, random.Random(cluster_seed(cluster_id)),
                          accessorize_objects)
    rng = random.Random(hashlib.sha256(f"{tag}|{cluster_id}".encode()).digest())
    exclude = frozenset(re.findall(r"[a-z]+", (class_noun or "").lower()))
    audience = "live" if is_live else "object"
    used: dict[str, set[str]] = {}
    prompts: list[Prompt] = []
    for skill in SKILLS:
        spec = grammar["skills"][skill]
        templates = [*spec.get("any", []), *spec.get(audience, [])]
        for _ in range(counts.get(skill, 0)):
            for _attempt in range(500):
                text, chosen = _fill(rng.choice(templates), grammar["slots"], rng, exclude, used)
                if prompt_text_problem(text, min_chars, max_chars):
                    continue
                if any(similarity(text, p.prompt) >= max_similarity for p in prompts):
                    continue
                for name, value in chosen:
                    used.setdefault(name, set()).add(value)
                prompts.append(Prompt(text, skill))
                break
            else:  # pragma: no cover -- the vocabularies are far larger than any sensible n
                raise RuntimeError(f"template grammar cannot make {n} distinct {skill} prompts for {cluster_id}")
    return tuple(prompts)


def cluster_seed(cluster_id: str) -> int:
    return int(hashlib.sha256(cluster_id.encode()).hexdigest()[:8], 16)
