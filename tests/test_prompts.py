"""Stage *prompts*: the template grammar, prompt validation, and the stage with both backends."""

from __future__ import annotations

import collections
import json
import random
import re
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.records import Prompt
from tests.clusters import beam_counters, sample_clusters
from tests.llm_server import TEXT_MODEL, FakeOpenAIServer
from transforms.models.llm_client import ChatResponse, OutputInvalid
from transforms.prompt_files import load_prompt
from transforms.prompts import ScenePrompts, cluster_counts, prompts_messages, prompts_schema, validate_prompts
from transforms.scene_templates import (
    LIVE_ONLY,
    check_prompts,
    load_grammar,
    similarity,
    skill_counts,
    template_prompts,
)
from transforms.settings import DEFAULT_MIX, PLACEHOLDER, SKILLS, LLMConfig, PromptsConfig

IDS = [f"{i:032x}" for i in range(1, 1501)]  # content-hash-like cluster ids
LIMITS = {"min_chars": 12, "max_chars": 160, "max_similarity": 0.6}


# --- the template grammar --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live_prompts() -> list[tuple[Prompt, ...]]:
    return [template_prompts(cid, "dog", True, 8) for cid in IDS]


@pytest.fixture(scope="module")
def object_prompts() -> list[tuple[Prompt, ...]]:
    return [template_prompts(cid, "teapot", False, 8) for cid in IDS]


@pytest.mark.slow
def test_every_skill_is_reachable(live_prompts, object_prompts) -> None:
    assert {p.skill for ps in live_prompts for p in ps} == set(SKILLS)
    assert {p.skill for ps in object_prompts for p in ps} == set(SKILLS) - LIVE_ONLY


def test_every_template_of_the_grammar_is_reachable(live_prompts, object_prompts) -> None:
    grammar, _ = load_grammar()
    made = [p.prompt for ps in live_prompts + object_prompts for p in ps]
    for skill, spec in grammar["skills"].items():
        for audience in ("any", "live") if skill != "accessorization" else ("live",):
            for template in spec.get(audience, []):
                pattern = re.escape(template).replace(re.escape(PLACEHOLDER), "SUBJECT")
                pattern = re.sub(r"\\\{\w+(?:\\#\d)?\\\}", ".+", pattern).replace("SUBJECT", re.escape(PLACEHOLDER))
                pattern = pattern.replace(r"a\ ", r"an?\ ")
                assert any(re.fullmatch(pattern, m) for m in made), (skill, template)


@pytest.mark.parametrize("is_live, mix", [(True, DEFAULT_MIX), (False, DEFAULT_MIX),
                                          (True, {"stylization": 0.5, "novel_view": 0.3, "emotion_action": 0.2})])
def test_mix_is_respected_over_many_clusters(is_live: bool, mix: dict[str, float]) -> None:
    n = 8
    counts = collections.Counter(p.skill for cid in IDS for p in template_prompts(cid, None, is_live, n, mix))
    allowed = {s: w for s, w in mix.items() if is_live or s not in LIVE_ONLY}
    total = sum(allowed.values())
    for skill in SKILLS:
        share = counts[skill] / (n * len(IDS))
        assert share == pytest.approx(allowed.get(skill, 0) / total, abs=0.012), skill


def test_counts_per_cluster_are_the_mix_rounded() -> None:
    for cid in IDS[:200]:
        counts = collections.Counter(p.skill for p in template_prompts(cid, "dog", True, 8))
        for skill, weight in DEFAULT_MIX.items():
            assert abs(counts[skill] - 8 * weight) < 1, (cid, counts)


def test_deterministic_from_the_cluster_id() -> None:
    assert template_prompts(IDS[0], "teapot", False, 8) == template_prompts(IDS[0], "teapot", False, 8)
    assert template_prompts(IDS[0], "teapot", False, 8) != template_prompts(IDS[1], "teapot", False, 8)
    # Independent of anything else a process did before (no hidden global random state).
    random.seed(12345)
    assert template_prompts(IDS[0], "teapot", False, 8) == template_prompts(IDS[0], "teapot", False, 8)


def test_no_live_only_skills_for_objects(object_prompts) -> None:
    for prompts in object_prompts:
        assert not {p.skill for p in prompts} & LIVE_ONLY
    vocabulary = load_grammar()[0]["slots"]
    live_words = {*vocabulary["emotion"], *vocabulary["outfit"], *vocabulary["wearable"], *vocabulary["action"]}
    for prompts in object_prompts:
        for p in prompts:
            assert "wearing" not in p.prompt and not any(w in p.prompt for w in live_words if len(w) > 6), p


def test_objects_get_accessorization_only_when_asked() -> None:
    mix = {"accessorization": 1.0}
    plain = template_prompts(IDS[0], "vase", False, 4, mix)
    assert {p.skill for p in plain} <= set(SKILLS) - LIVE_ONLY  # nothing the vase can have: every allowed skill
    asked = template_prompts(IDS[0], "vase", False, 4, mix, accessorize_objects=True)
    assert [p.skill for p in asked] == ["accessorization"] * 4
    outfits = load_grammar()[0]["slots"]["outfit"] + load_grammar()[0]["slots"]["wearable"]
    assert not any(o in p.prompt for p in asked for o in outfits)  # decorated or wrapped, never dressed


def test_placeholder_exactly_once_and_lengths(live_prompts, object_prompts) -> None:
    for prompts in live_prompts + object_prompts:
        assert len(prompts) == 8
        for p in prompts:
            assert p.prompt.count(PLACEHOLDER) == 1 and "{" not in p.prompt.replace(PLACEHOLDER, "")
            assert 12 <= len(p.prompt) <= 160 and not re.search(r"\ba [aeiou]", p.prompt)


def test_no_near_duplicates_in_a_cluster(live_prompts) -> None:
    for prompts in live_prompts:
        texts = [p.prompt for p in prompts]
        assert len(set(texts)) == len(texts)
        assert max(similarity(a, b) for i, a in enumerate(texts) for b in texts[i + 1:]) < 0.6


def test_every_generated_set_passes_the_shared_validation(live_prompts, object_prompts) -> None:
    for prompts, live in [(ps, True) for ps in live_prompts[:300]] + [(ps, False) for ps in object_prompts[:300]]:
        counts = collections.Counter(p.skill for p in prompts)
        assert check_prompts(prompts, counts, live, **LIMITS) == []


def test_vocabulary_naming_the_class_noun_is_skipped() -> None:
    """No "a scarf wearing a rainbow scarf": fillers that name the class noun are left out."""
    for cid in IDS[:300]:
        for p in template_prompts(cid, "scarf", True, 12, {"accessorization": 1.0}):
            assert "scarf" not in p.prompt
    assert any("scarf" in p.prompt for cid in IDS[:300]
               for p in template_prompts(cid, "dog", True, 12, {"accessorization": 1.0}))


def test_many_prompts_stay_distinct() -> None:
    prompts = template_prompts(IDS[0], "dog", True, 40)
    assert len(prompts) == 40 and check_prompts(prompts, collections.Counter(p.skill for p in prompts), True,
                                                **LIMITS) == []


def test_skill_counts_expectation_is_exact() -> None:
    mix = {"stylization": 0.3, "recontextualization": 0.45, "novel_view": 0.25}
    totals = collections.Counter()
    rng = random.Random(7)
    for _ in range(20000):
        counts = skill_counts(3, mix, False, rng)
        assert sum(counts.values()) == 3
        totals.update(counts)
    for skill, weight in mix.items():
        assert totals[skill] / 60000 == pytest.approx(weight, abs=0.006)


def test_bad_mix_is_refused() -> None:
    for mix in ({"dancing": 1.0}, {"stylization": -1.0}, {"stylization": 0.0}):
        with pytest.raises(ValueError):
            template_prompts(IDS[0], "dog", True, 4, mix)
        with pytest.raises(ValueError):
            PromptsConfig(mix=mix)


# --- validation of model prompts -----------------------------------------------------------------------------------

COUNTS = {"stylization": 1, "recontextualization": 1, "emotion_action": 1}


def _answer(prompts: list[tuple[str, str]]) -> ChatResponse:
    return ChatResponse(json.dumps({"prompts": [{"prompt": p, "skill": s} for p, s in prompts]}), "stop", None, {})


GOOD = [("a watercolor painting of a {subject}", "stylization"),
        ("a {subject} on a frozen lake", "recontextualization"),
        ("a sleepy {subject} curled up in a blanket", "emotion_action")]


def test_valid_model_prompts() -> None:
    assert validate_prompts(_answer(GOOD), COUNTS, True, PromptsConfig()) == tuple(Prompt(p, s) for p, s in GOOD)


@pytest.mark.parametrize("prompts, live, error", [
    (GOOD[:2], True, "expected 3 prompts, got 2"),
    ([("a watercolor painting of a teapot", "stylization"), *GOOD[1:]], True, "must contain {subject} exactly once"),
    ([("a {subject} and a {subject}", "stylization"), *GOOD[1:]], True, "exactly once"),
    ([("a {subject} in {place}", "stylization"), *GOOD[1:]], True, "braces"),
    ([("{subject}", "stylization"), *GOOD[1:]], True, "characters"),
    ([("a watercolor painting of a {subject}", "cubism"), *GOOD[1:]], True, "unknown skill 'cubism'"),
    (GOOD, False, "skill emotion_action is not for a lifeless subject"),
    ([GOOD[0], GOOD[1], ("a {subject} on a lake", "recontextualization")], True, "skill counts differ"),
    ([GOOD[0], ("a {subject} on a frozen lake at dawn", "recontextualization"),
      ("a {subject} on the frozen lake", "emotion_action")], True, "near-duplicates"),
])
def test_invalid_model_prompts(prompts: list, live: bool, error: str) -> None:
    with pytest.raises(OutputInvalid, match=re.escape(error)):
        validate_prompts(_answer(prompts), COUNTS, live, PromptsConfig())


def test_schema_and_messages(sample_rows) -> None:
    (cluster,) = sample_clusters(sample_rows, ["/products/dog"])
    cluster = cluster.replace(subject="dog", class_noun="dog", is_live=True)
    config = PromptsConfig()
    counts = cluster_counts(cluster, config)
    assert sum(counts.values()) == 8 and counts == collections.Counter(
        p.skill for p in template_prompts(cluster.cluster_id, "dog", True, 8))  # same counts as the fallback
    schema = prompts_schema(counts, config)
    assert schema["properties"]["prompts"]["minItems"] == 8
    assert schema["properties"]["prompts"]["items"]["properties"]["skill"]["enum"] == sorted(counts)
    system, user = prompts_messages(load_prompt("prompts_v1.txt"), cluster, counts, config)
    assert "exactly 8 prompts" in system["content"] and "between 12 and 160 characters" in system["content"]
    assert json.loads(user["content"])["counts"] == counts


# --- the stage ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server() -> Any:
    fake = FakeOpenAIServer(TEXT_MODEL)
    yield fake
    fake.stop()


FAST_LLM = LLMConfig(max_retries=1, backoff_s=0.01, backoff_max_s=0.1, request_timeout_s=5, validation_retries=1)


def _with_subjects(sample_rows) -> list:
    dog, teapot = sample_clusters(sample_rows, ["/products/dog", "/products/teapot"])
    return [dog.replace(subject="dog", class_noun="dog", is_live=True),
            teapot.replace(subject="teapot", class_noun="teapot", is_live=False)]


def _summary(c) -> tuple:
    return (c.cluster_id, c.provenance.prompts_backend, c.provenance.prompts_model, c.provenance.prompts_prompt,
            c.provenance.fallbacks, c.prompts)


def test_templates_backend_in_a_pipeline(sample_rows) -> None:
    clusters = _with_subjects(sample_rows)
    tag = load_grammar()[1]
    expected = [(c.cluster_id, "templates", None, tag, (), template_prompts(c.cluster_id, c.class_noun, c.is_live, 8))
                for c in clusters]
    with TestPipeline() as p:
        out, rejects = p | beam.Create(clusters) | ScenePrompts(PromptsConfig(backend="templates"), LLMConfig())
        assert_that(out | beam.Map(_summary), equal_to(expected))
        assert_that(rejects, equal_to([]), label="NoRejects")


def _vllm(server: FakeOpenAIServer, **kwargs: Any) -> PromptsConfig:
    return PromptsConfig(backend="vllm", endpoint=server.url, model=TEXT_MODEL, **kwargs)


def test_vllm_backend_writes_prompts_in_the_requested_counts(server, sample_rows) -> None:
    server.reset()
    clusters = _with_subjects(sample_rows)
    config = _vllm(server)
    tag = load_prompt("prompts_v1.txt").tag
    with TestPipeline() as p:
        out, rejects = p | beam.Create(clusters) | ScenePrompts(config, FAST_LLM)
        assert_that(out | beam.Map(lambda c: (c.cluster_id, c.provenance.prompts_backend, c.provenance.prompts_model,
                                              c.provenance.prompts_prompt, dict(collections.Counter(
                                                  pr.skill for pr in c.prompts)))),
                    equal_to([(c.cluster_id, "vllm", TEXT_MODEL, tag, cluster_counts(c, config)) for c in clusters]))
        assert_that(out | "Texts" >> beam.Map(lambda c: all("beside a" in pr.prompt for pr in c.prompts)),
                    equal_to([True, True]), label="FromTheModel")
        assert_that(rejects, equal_to([]), label="NoRejects")
    assert [e["task"] for e in server.log()] == ["prompts", "prompts"]
    assert not any(s in cluster_counts(clusters[1], config) for s in LIVE_ONLY)  # the teapot was asked no live skills


def test_invalid_model_prompts_fall_back_to_templates(server, sample_rows) -> None:
    server.reset()
    server.faults({"match": '"subject": "teapot"', "fault": "content_invalid_json", "times": None})
    dog, teapot = _with_subjects(sample_rows)
    with TestPipeline() as p:
        out, rejects = p | beam.Create([dog, teapot]) | ScenePrompts(_vllm(server), FAST_LLM)
        assert_that(out | beam.Map(lambda c: (c.class_noun, c.provenance.prompts_backend, c.provenance.fallbacks,
                                              c.prompts if c.class_noun == "teapot" else None)),
                    equal_to([("dog", "vllm", (), None),
                              ("teapot", "templates", ("prompts",),
                               template_prompts(teapot.cluster_id, "teapot", False, 8))]))
        assert_that(rejects, equal_to([]), label="NoRejects")
    assert beam_counters(p.result, "prompts")["fallback_clusters"] == 1


def test_invalid_model_prompts_reject_when_configured(server, sample_rows) -> None:
    server.reset()
    server.faults({"match": '"subject": "teapot"', "fault": "status:500", "times": None})
    dog, teapot = _with_subjects(sample_rows)
    with TestPipeline() as p:
        out, rejects = p | beam.Create([dog, teapot]) | ScenePrompts(_vllm(server, on_failure="reject"), FAST_LLM)
        assert_that(out | beam.Map(lambda c: c.class_noun), equal_to(["dog"]), label="Kept")
        assert_that(rejects | beam.Map(lambda r: (r.id, r.reason, r.n_images, "HTTP 500" in r.detail)),
                    equal_to([(teapot.cluster_id, "prompts_failed", len(teapot.images), True)]), label="Rejects")
