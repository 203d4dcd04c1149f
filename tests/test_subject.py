"""Stage *subject*: the offline backend on the bundled sample and real web pages, validation of the model's
answer, and the stage with both backends. The naming rule itself is tested in tests/test_naming.py."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.clusters import beam_counters, sample_clusters
from tests.fake_openai_server import subject_for
from tests.llm_server import TEXT_MODEL, FakeOpenAIServer
from transforms.caption import clean_alt_text
from transforms.models.llm_client import ChatResponse, OutputInvalid
from transforms.naming import name_subject
from transforms.prompt_files import load_prompt
from transforms.settings import LLMConfig
from transforms.subject import (
    Subject,
    SubjectConfig,
    SubjectResult,
    offline_result,
    subject_messages,
    subject_schema,
    validate_subject,
)

DATA = Path(__file__).parent / "data"
WEB_PAGES = json.loads((DATA / "web_pages.json").read_text(encoding="utf-8"))

# DreamBench's own class names and live/object split (copied from google/dreambooth, see data/ATTRIBUTION.md):
# the sample shows each subject on its own page, so the offline backend must find exactly these.
with (DATA / "dreambench_subjects.csv").open(newline="", encoding="utf-8") as _f:
    DREAMBENCH = {row["subject"]: (row["class_name"], row["prompt_set"] == "live") for row in csv.DictReader(_f)}

FAST_LLM = LLMConfig(max_retries=1, backoff_s=0.01, backoff_max_s=0.1, request_timeout_s=5, validation_retries=1)


# --- the offline backend -------------------------------------------------------------------------------------

def test_offline_backend_names_every_dreambench_subject_of_the_sample(sample_rows) -> None:
    named = {}
    for cluster in sample_clusters(sample_rows):
        notes = {row["note"] for row in sample_rows if row["expected_page"] == cluster.page_url
                 and row["expected"] == "kept"}
        dreambench = {m.group(1) for note in notes if (m := re.search(r"DreamBench (\w+)/\d+", note))}
        result = offline_result(cluster, min_support=2)
        if len(dreambench) != 1:  # the blog post mixing a backpack, a clock, a bowl and a dog has no single subject
            assert (result.subject, result.class_noun, result.is_live) == (None, None, None)
            continue
        (name,) = dreambench
        named[name] = (result.class_noun, result.is_live)
        assert result.subject and all(caption for caption in result.captions), name
    assert named == DREAMBENCH


@pytest.mark.parametrize("page", WEB_PAGES["pages"], ids=lambda p: p["page_url"][:50])
def test_offline_backend_on_real_web_pages(page: dict[str, Any]) -> None:
    texts = [(clean_alt_text(caption),) for caption in page["captions"]]
    name = name_subject(page["page_url"], texts)
    assert {"subject": name.subject, "class_noun": name.class_noun, "is_live": name.is_live} == page["expected"]


def test_offline_fills_only_empty_captions(sample_rows) -> None:
    (cluster,) = sample_clusters(sample_rows, ["/products/teapot"])
    cluster = cluster.replace(images=tuple(im.replace(caption=clean_alt_text(im.text)) for im in cluster.images))
    result = offline_result(cluster, 2)
    assert result.subject == "teapot"
    for image, caption in zip(cluster.images, result.captions, strict=True):
        assert caption == (image.caption or "a teapot")


# --- the LLM answer ------------------------------------------------------------------------------------------

CONFIG = SubjectConfig()


def _answer(**changes: Any) -> ChatResponse:
    data = {"subject": "A red ceramic teapot with bamboo handle", "class_noun": "Teapot", "is_live": False,
            "captions": ["A red teapot on a table.", "Close-up of the teapot's bamboo handle."]}
    data.update(changes)
    return ChatResponse(json.dumps(data), "stop", TEXT_MODEL, {})


def test_valid_answer_is_normalized() -> None:
    assert validate_subject(_answer(), 2, CONFIG) == SubjectResult(
        "red ceramic teapot with bamboo handle", "teapot", False,
        ("A red teapot on a table.", "Close-up of the teapot's bamboo handle."))


@pytest.mark.parametrize("changes, error", [
    ({"captions": ["A red teapot on a table."]}, "expected 2 captions"),
    ({"captions": ["A red teapot.", "A bamboo handle."]}, "caption 2 does not name the class noun 'Teapot'"),
    ({"captions": ["A red teapot.", ""]}, "caption 2 is empty"),
    ({"is_live": "no"}, "is_live must be true or false"),
    ({"subject": ""}, "subject must be a non-empty string"),
    ({"subject": "a " + "very " * 12 + "red teapot"}, "at most 12 allowed"),
    ({"class_noun": "big red ceramic teapot"}, "class_noun has 4 words"),
    ({"class_noun": 7}, "class_noun must be one to a few words"),
])
def test_invalid_answers_say_what_is_wrong(changes: dict, error: str) -> None:
    with pytest.raises(OutputInvalid, match=re.escape(error)):
        validate_subject(_answer(**changes), 2, CONFIG)


def test_missing_keys_and_non_json() -> None:
    with pytest.raises(OutputInvalid, match="missing key"):
        validate_subject(ChatResponse('{"subject": "teapot"}', "stop", None, {}), 1, CONFIG)
    with pytest.raises(OutputInvalid, match="not valid JSON"):
        validate_subject(ChatResponse("The subject is a teapot.", "stop", None, {}), 1, CONFIG)


def test_schema_and_messages_match_the_cluster(sample_rows) -> None:
    (cluster,) = sample_clusters(sample_rows, ["/products/cat"])
    schema = subject_schema(len(cluster.images), CONFIG)
    assert schema["properties"]["captions"]["minItems"] == schema["properties"]["captions"]["maxItems"] == 5
    system, user = subject_messages(load_prompt("subject_v1.txt"), cluster, CONFIG)
    assert "$" not in system["content"] and "at most 12 words" in system["content"] and "(5)" in system["content"]
    data = json.loads(user["content"])
    assert data["page_url"] == cluster.page_url and len(data["captions"]) == len(data["alt_texts"]) == 5


# --- the stage ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server() -> Any:
    fake = FakeOpenAIServer(TEXT_MODEL)
    yield fake
    fake.stop()


def _captioned(sample_rows, pages: list[str]) -> list:
    return [c.replace(images=tuple(im.replace(caption=clean_alt_text(im.text)) for im in c.images))
            for c in sample_clusters(sample_rows, pages)]


def _vllm(server: FakeOpenAIServer, **kwargs: Any) -> SubjectConfig:
    return SubjectConfig(backend="vllm", endpoint=server.url, model=TEXT_MODEL, **kwargs)


def _summary(c) -> tuple:
    return (c.cluster_id, c.subject, c.class_noun, c.is_live, c.provenance.subject_backend,
            c.provenance.subject_model, c.provenance.fallbacks, tuple(im.caption for im in c.images))


def test_offline_backend_in_a_pipeline(sample_rows) -> None:
    clusters = _captioned(sample_rows, ["/products/dog", "/produkt/candle"])
    with TestPipeline() as p:
        out, rejects = p | beam.Create(clusters) | Subject(SubjectConfig(backend="offline"), LLMConfig())
        assert_that(out | beam.Map(lambda c: (c.page_url.rsplit("/", 1)[1], c.subject, c.class_noun, c.is_live,
                                              c.provenance.subject_backend)),
                    equal_to([("dog", "dog", "dog", True, "offline"),
                              ("candle", "candle", "candle", False, "offline")]))
        assert_that(rejects, equal_to([]), label="NoRejects")


def test_vllm_backend_names_subject_and_rewrites_captions(server, sample_rows) -> None:
    server.reset()
    clusters = _captioned(sample_rows, ["/products/dog", "/produkt/candle"])
    expected = []
    for c in clusters:
        captions = [im.caption for im in c.images]
        expected.append((c.cluster_id, subject_for(captions), "object", False, "vllm", TEXT_MODEL, (),
                         tuple(f"A photo of the sample object: {cap or 'no caption'}" for cap in captions)))
    with TestPipeline() as p:
        out, rejects = p | beam.Create(clusters) | Subject(_vllm(server), FAST_LLM)
        assert_that(out | beam.Map(_summary), equal_to(expected))
        assert_that(out | "Prompt" >> beam.Map(lambda c: c.provenance.subject_prompt),
                    equal_to([load_prompt("subject_v1.txt").tag] * 2), label="PromptTag")
        assert_that(rejects, equal_to([]), label="NoRejects")
    log = server.log()
    assert [e["task"] for e in log] == ["subject", "subject"] and all(e["shape_error"] is None for e in log)


@pytest.mark.parametrize("mode", ["response_format", "guided_json", "structured_outputs"])
def test_every_structured_output_mode_reaches_the_server(server, sample_rows, mode: str) -> None:
    server.reset()
    clusters = _captioned(sample_rows, ["/produkt/candle"])
    with TestPipeline() as p:
        out, _ = p | beam.Create(clusters) | Subject(_vllm(server, structured_output=mode), FAST_LLM)
        assert_that(out | beam.Map(lambda c: c.class_noun), equal_to(["object"]))
    assert server.log()[0]["task"] == "subject"


def test_invalid_answers_fall_back_to_the_offline_backend(server, sample_rows) -> None:
    server.reset()
    server.faults({"match": "/products/dog", "fault": "content_truncated", "times": None})
    clusters = _captioned(sample_rows, ["/products/dog", "/produkt/candle"])
    with TestPipeline() as p:
        out, rejects = p | beam.Create(clusters) | Subject(_vllm(server), FAST_LLM)
        assert_that(out | beam.Map(lambda c: (c.page_url.rsplit("/", 1)[1], c.subject, c.class_noun, c.is_live,
                                              c.provenance.subject_backend, c.provenance.fallbacks)),
                    equal_to([("dog", "dog", "dog", True, "offline", ("subject",)),
                              ("candle", subject_for([im.caption for im in clusters[1].images]), "object", False,
                               "vllm", ())]))
        assert_that(rejects, equal_to([]), label="NoRejects")
    dog_requests = [e for e in server.log() if e["fault"]]
    assert [e["n_messages"] for e in dog_requests] == [2, 4]  # asked again with the error fed back
    assert beam_counters(p.result, "subject")["fallback_clusters"] == 1


def test_invalid_answers_reject_the_cluster_when_configured(server, sample_rows) -> None:
    server.reset()
    server.faults({"match": "/products/dog", "fault": "content_wrong", "times": None})
    clusters = _captioned(sample_rows, ["/products/dog", "/produkt/candle"])
    dog = clusters[0]
    with TestPipeline() as p:
        out, rejects = p | beam.Create(clusters) | Subject(_vllm(server, on_failure="reject"), FAST_LLM)
        assert_that(out | beam.Map(lambda c: c.page_url), equal_to([clusters[1].page_url]), label="Kept")
        assert_that(rejects | beam.Map(lambda r: (r.id, r.stage, r.reason, r.n_images, "missing key" in r.detail)),
                    equal_to([(dog.cluster_id, "subject", "subject_failed", len(dog.images), True)]), label="Rejects")
    assert beam_counters(p.result, "subject")["subject_failed"] == len(dog.images)
