"""Stage *caption*: the alt-text cleaner on real alt texts, and the stage with both backends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.clusters import beam_counters, sample_clusters
from tests.fake_openai_server import caption_for
from tests.llm_server import VL_MODEL, FakeOpenAIServer
from transforms.caption import (
    Caption,
    CaptionConfig,
    CaptionHandler,
    caption_messages,
    clean_alt_text,
    validate_caption,
)
from transforms.models.llm_client import ChatResponse, OutputInvalid
from transforms.models.model_stage import FailedBatchFn, Outcome
from transforms.prompt_files import load_prompt
from transforms.settings import LLMConfig

ALT_TEXTS = json.loads((Path(__file__).parent / "data" / "alt_texts.json").read_text(encoding="utf-8"))

FAST_LLM = LLMConfig(max_retries=1, backoff_s=0.01, backoff_max_s=0.1, request_timeout_s=5, validation_retries=1)


# --- the cleaner ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ALT_TEXTS["cases"], ids=lambda c: c["text"][:40])
def test_cleaner_on_real_alt_texts(case: dict[str, Any]) -> None:
    assert clean_alt_text(case["text"]) == case["expected"], case["source"]


def test_fixture_covers_every_kind_of_noise() -> None:
    texts = [c["text"] for c in ALT_TEXTS["cases"]]
    kinds = {
        "html": any("<b>" in t or "&amp;" in t for t in texts),
        "file name": any(t.lower().endswith((".jpg", ".jpeg", ".png")) for t in texts),
        "shop boilerplate": any("buy now" in t.lower() or "coupon" in t.lower() for t in texts),
        "price": any("$" in t or "£" in t for t in texts),
        "percentage": any("%" in t for t in texts),
        "emoji": any(any(ord(ch) > 0x2600 and not ch.isalnum() for ch in t) for t in texts),
        "site name": any(" | " in t for t in texts),
        "clean sentence": any(c["text"] == c["expected"] for c in ALT_TEXTS["cases"]),
        "nothing left": any(c["expected"] is None for c in ALT_TEXTS["cases"]),
    }
    assert all(kinds.values()), kinds
    assert {c["source"].split(",")[0].split(" ")[0] for c in ALT_TEXTS["cases"]} >= {"MMC4", "OBELICS", "bundled"}


@pytest.mark.parametrize("text, expected", [
    ("&lt;p&gt;Red &amp;amp; white mug&lt;/p&gt;", "Red & white mug"),  # double-escaped markup
    ("Teapot\u200b\ufe0f \U0001F600\U0001F44D\U0001F3FD | Shop", "Teapot"),  # emoji, skin tone, invisible chars
    ("Ceramic vase was $30 now $20", "Ceramic vase"),
    ("Vase 49,99 \u20ac", "Vase"),
    ("Rs. 499 cotton kurta", "cotton kurta"),
    ("100% cotton t-shirt", "100% cotton t-shirt"),
    ("Blue mug (image 2 of 5)", "Blue mug"),
    ("IMG_20190101_123456", None),
    ("pink sunglasses 04.jpg", "pink sunglasses"),  # a file name's words stay
    ("wolf-plushie-photo-3.jpg", "wolf plushie"),
    ("Handmade wolf plushie IMG_2231.JPG", "Handmade wolf plushie"),
    ("The wolf plushie on a shelf, wolf-plushie-8.jpg", "The wolf plushie on a shelf, wolf plushie"),
    ("P1010023", None),
    ("Screenshot 2020-01-01 at 10.00.00.png", None),
    ("https://example.com/x.jpg", None),
    ("image", None),
    ("   ", None),
    (None, None),
    ("Handmade oak bowl https://shop.example/bowl?id=3", "Handmade oak bowl"),
    ("360° view of a leather armchair", "360° view of a leather armchair"),
])
def test_cleaner_edge_cases(text: str | None, expected: str | None) -> None:
    assert clean_alt_text(text) == expected


def test_cleaner_cuts_long_text_at_a_word() -> None:
    text = "A handmade ceramic teapot with a bamboo handle " * 20
    cleaned = clean_alt_text(text, max_chars=60)
    assert cleaned is not None and len(cleaned) <= 60 and text.startswith(cleaned) and not cleaned.endswith(" ")


# --- validation of model captions ---------------------------------------------------------------------------------

def _response(content: str, finish: str = "stop") -> ChatResponse:
    return ChatResponse(content, finish, VL_MODEL, {})


def test_validate_caption() -> None:
    assert validate_caption(_response(' "A red teapot\n on a table." '), 10, 400) == "A red teapot on a table."
    for content, finish, error in [("", "stop", "empty"), ("A red", "stop", "shorter"),
                                   ("A red teapot on a table with", "length", "cut off"),
                                   ("x " * 300, "stop", "at most 400"),
                                   ("I'm sorry, I can't help with that image.", "stop", "refusal")]:
        with pytest.raises(OutputInvalid, match=error):
            validate_caption(_response(content, finish), 10, 400)


def test_caption_prompt_is_versioned_and_hashed() -> None:
    prompt = load_prompt("caption_v1.txt")
    assert prompt.tag.startswith("caption_v1.txt@") and len(prompt.tag.split("@")[1]) == 12
    messages = caption_messages(prompt.text, b"\xff\xd8\xff\xe0fake")
    assert messages[0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert messages[0]["content"][1]["text"] == prompt.text


@pytest.mark.parametrize("kwargs", [{"backend": "blip"}, {"on_failure": "ignore"}, {"backend": "vllm", "model": ""},
                                    {"min_chars": 0}, {"endpoint": "ftp://x"}, {"batch_size": 0}])
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CaptionConfig(**kwargs)


# --- the stage ---------------------------------------------------------------------------------------------------

def test_alt_text_backend_in_a_pipeline(sample_rows) -> None:
    clusters = sample_clusters(sample_rows, ["/products/backpack", "/products/teapot"])
    expected = [(c.cluster_id, tuple(clean_alt_text(im.text) for im in c.images)) for c in clusters]
    with TestPipeline() as p:
        out, rejects = p | beam.Create(clusters) | Caption(CaptionConfig(backend="alt_text"), LLMConfig())
        assert_that(out | beam.Map(lambda c: (c.cluster_id, tuple(im.caption for im in c.images))),
                    equal_to(expected), label="Captions")
        assert_that(out | "Prov" >> beam.Map(lambda c: (c.provenance.caption_backend, c.provenance.caption_model,
                                                         c.provenance.fallbacks)),
                    equal_to([("alt_text", None, ())] * 2), label="Provenance")
        assert_that(rejects, equal_to([]), label="NoRejects")
    assert any(caption == "backpack" for _, caps in expected for caption in caps)


@pytest.fixture(scope="module")
def server() -> Any:
    fake = FakeOpenAIServer(VL_MODEL)
    yield fake
    fake.stop()


def _vllm(server: FakeOpenAIServer, **kwargs: Any) -> CaptionConfig:
    return CaptionConfig(backend="vllm", endpoint=server.url, model=VL_MODEL, **kwargs)


@pytest.mark.slow
def test_vllm_backend_captions_every_image(server, sample_rows) -> None:
    server.reset()
    clusters = sample_clusters(sample_rows, ["/products/backpack", "/products/cat", "/produkt/vase"])
    expected = [(c.cluster_id, tuple(caption_for(im.image) for im in c.images)) for c in clusters]
    tag = load_prompt("caption_v1.txt").tag
    with TestPipeline() as p:
        out, rejects = p | beam.Create(clusters) | Caption(_vllm(server), FAST_LLM)
        assert_that(out | beam.Map(lambda c: (c.cluster_id, tuple(im.caption for im in c.images))),
                    equal_to(expected), label="Captions")
        assert_that(out | "Prov" >> beam.Map(lambda c: (c.provenance.caption_backend, c.provenance.caption_model,
                                                         c.provenance.caption_prompt, c.provenance.fallbacks)),
                    equal_to([("vllm", VL_MODEL, tag, ())] * 3), label="Provenance")
        assert_that(rejects, equal_to([]), label="NoRejects")
    log = server.log()
    assert len(log) == sum(len(c.images) for c in clusters)
    assert all(e["task"] == "caption" and e["shape_error"] is None and e["max_tokens"] == 120 for e in log)
    assert sorted(i for e in log for i in e["image_ids"]) == sorted(im.image_id for c in clusters for im in c.images)


def _faulty_image_clusters(sample_rows) -> tuple[list, str]:
    clusters = sample_clusters(sample_rows, ["/products/backpack", "/products/cat"])
    return clusters, clusters[1].images[2].image_id  # one image of the cat page


def test_vllm_failure_falls_back_to_alt_text_for_the_whole_cluster(server, sample_rows) -> None:
    server.reset()
    clusters, bad_image = _faulty_image_clusters(sample_rows)
    server.faults({"match": bad_image, "fault": "status:500", "times": None})
    backpack, cat = clusters
    with TestPipeline() as p:
        out, rejects = p | beam.Create(clusters) | Caption(_vllm(server), FAST_LLM)
        assert_that(out | beam.Map(lambda c: (c.cluster_id, c.provenance.caption_backend, c.provenance.fallbacks,
                                              c.provenance.caption_prompt, tuple(im.caption for im in c.images))),
                    equal_to([(backpack.cluster_id, "vllm", (), load_prompt("caption_v1.txt").tag,
                               tuple(caption_for(im.image) for im in backpack.images)),
                              (cat.cluster_id, "alt_text", ("caption",), None,
                               tuple(clean_alt_text(im.text) for im in cat.images))]))
        assert_that(rejects, equal_to([]), label="NoRejects")
    counters = beam_counters(p.result, "caption")
    assert counters["fallback_clusters"] == 1 and counters["failed_clusters"] == 1
    assert counters["llm_http_500"] == 2 and counters["llm_retries"] >= 1  # max_retries=1: two attempts


def test_vllm_failure_rejects_the_cluster_when_configured(server, sample_rows) -> None:
    server.reset()
    clusters, bad_image = _faulty_image_clusters(sample_rows)
    server.faults({"match": bad_image, "fault": "content_empty", "times": None})  # invalid every time
    backpack, cat = clusters
    with TestPipeline() as p:
        out, rejects = p | beam.Create(clusters) | Caption(_vllm(server, on_failure="reject"), FAST_LLM)
        assert_that(out | beam.Map(lambda c: c.cluster_id), equal_to([backpack.cluster_id]), label="Kept")
        assert_that(rejects | beam.Map(lambda r: (r.id, r.stage, r.reason, r.n_images, r.cluster_id, r.page_url)),
                    equal_to([(cat.cluster_id, "caption", "caption_failed", len(cat.images), cat.cluster_id,
                               cat.page_url)]), label="Rejects")
        assert_that(rejects | "Detail" >> beam.Map(lambda r: bad_image in r.detail and "OutputInvalid" in r.detail),
                    equal_to([True]), label="Detail")
    counters = beam_counters(p.result, "caption")
    assert counters["caption_failed"] == len(cat.images) and counters["caption_failed_clusters"] == 1
    # validation_retries=1: the empty answer was asked for again once, with the error fed back.
    asked = [e for e in server.log() if bad_image in e["image_ids"]]
    assert [e["n_messages"] for e in asked] == [1, 3]


def test_slow_image_recovers_within_the_deadline_budget(server, sample_rows) -> None:
    server.reset()
    clusters, bad_image = _faulty_image_clusters(sample_rows)
    server.faults({"match": bad_image, "fault": "slow:30", "times": 1})
    llm = LLMConfig(max_retries=2, backoff_s=0.01, backoff_max_s=0.1, request_timeout_s=1.5)
    with TestPipeline() as p:
        out, _ = p | beam.Create(clusters) | Caption(_vllm(server), llm)
        assert_that(out | beam.Map(lambda c: c.provenance.fallbacks), equal_to([(), ()]))
    assert beam_counters(p.result, "caption")["llm_timeouts"] >= 1


def test_a_batch_that_raises_becomes_internal_errors(sample_rows) -> None:
    clusters = sample_clusters(sample_rows, ["/products/backpack"])
    element = (clusters, (ValueError, "ValueError('boom')", ["Traceback ...\n", "ValueError: boom\n"]))
    (reject,) = list(FailedBatchFn("caption").process(element))
    assert (reject.reason, reject.stage, reject.n_images, reject.cluster_id) == (
        "internal_error", "caption", len(clusters[0].images), clusters[0].cluster_id)


def test_handler_without_a_model_loads_nothing(sample_rows) -> None:
    handler = CaptionHandler(CaptionConfig(backend="alt_text"), LLMConfig())
    assert handler.load_model() is None and not handler.starts_server and handler.get_resource_hints() == {}
    clusters = sample_clusters(sample_rows, ["/products/teapot"])
    (result,) = handler.run_inference(clusters, None)
    assert isinstance(result, PredictionResult) and isinstance(result.inference, Outcome)
    assert result.inference.value == tuple(clean_alt_text(im.text) for im in clusters[0].images)


def test_gpu_hint_only_where_a_server_is_started() -> None:
    llm = LLMConfig(accelerator="type:nvidia-l4;count:1;install-nvidia-driver")
    assert CaptionHandler(CaptionConfig(), llm).get_resource_hints() == {"accelerator": llm.accelerator}
    assert CaptionHandler(CaptionConfig(endpoint="http://h:8000/v1"), llm).get_resource_hints() == {}
    assert CaptionHandler(CaptionConfig(backend="alt_text"), llm).get_resource_hints() == {}


def test_a_server_that_never_starts_fails_the_job_with_its_error(monkeypatch, sample_rows) -> None:
    """No endpoint: the worker starts vLLM itself; when it dies at startup the job stops with its output."""
    import sys
    import uuid

    from transforms.models import vllm_server

    real = vllm_server.start_process
    crash = [sys.executable, "-c", "import sys; print('torch.OutOfMemoryError: CUDA out of memory', flush=True); "
                                   "sys.exit(1)"]
    commands: list[list[str]] = []
    monkeypatch.setattr(vllm_server, "start_process", lambda cmd: commands.append(cmd) or real(crash))
    model = f"test/vlm-{uuid.uuid4().hex[:8]}"
    config = CaptionConfig(backend="vllm", model=model)
    clusters = sample_clusters(sample_rows, ["/products/backpack"])
    with pytest.raises(Exception, match="exited with code 1") as caught:
        with TestPipeline() as p:
            p | beam.Create(clusters) | Caption(config, LLMConfig(server_startup_timeout_s=30))
    assert "CUDA out of memory" in str(caught.value)
    assert commands and commands[0][1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", model]
