"""Phase 1 end to end with the caption, subject and prompt stages: offline backends, and vLLM over loopback."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.config import build_config, describe
from tests.clusters import sample_clusters
from tests.conftest import SAMPLE, PhaseOutput, run_pipeline
from tests.fake_openai_server import caption_for, subject_for
from tests.llm_server import TEXT_MODEL, VL_MODEL, FakeOpenAIServer
from transforms.caption import clean_alt_text
from transforms.prompt_files import load_prompt
from transforms.scene_templates import LIVE_ONLY, load_grammar, template_prompts
from transforms.settings import PLACEHOLDER

N_CLUSTERS = 33
KEPT = 199

# These tests are about the caption, subject and prompt stages: the CLIP stages (which drop clusters at
# random with the demo's tiny model) are off, so every cluster of the sample reaches them; so is the face and NSFW
# detector, which keeps every photo of the sample (tests/test_responsible_graph.py).
CLIP_OFF = ("--set", "embed.enabled=false", "--set", "cluster_filter.enabled=false",
            "--set", "cross_page.enabled=false", "--set", "semantic_dedup.enabled=false",
            "--set", "detector.enabled=false")


@pytest.fixture(scope="module")
def sample_phase1(tmp_path_factory: pytest.TempPathFactory) -> PhaseOutput:
    """The demo profile on the bundled sample, CLIP stages off."""
    return run_pipeline([SAMPLE], tmp_path_factory.mktemp("offline_models"), "--profile", "demo", *CLIP_OFF)


def _by_page(output: PhaseOutput) -> dict[str, dict[str, Any]]:
    return {c["page_url"]: c for c in output.clusters()}


# --- offline backends (the demo profile) -------------------------------------------------------------------------

def test_demo_profile_fills_captions_subjects_and_prompts(sample_phase1: PhaseOutput) -> None:
    clusters = _by_page(sample_phase1)
    assert len(clusters) == N_CLUSTERS
    grammar_tag = load_grammar()[1]
    for page, cluster in clusters.items():
        assert cluster["provenance"] == {
            "caption_backend": "alt_text", "subject_backend": "offline", "prompts_backend": "templates",
            "fallbacks": [], "caption_model": None, "caption_prompt": None, "subject_model": None,
            "subject_prompt": None, "prompts_model": None, "prompts_prompt": grammar_tag,
            "embed_model": None}, page  # CLIP is off in these runs
        subject = cluster["subject"]
        for image in cluster["images"]:
            cleaned = clean_alt_text(image["text"])
            assert image["caption"] == (cleaned or (f"a {subject}" if subject else None)), image["text"]
        prompts = cluster["prompts"]
        assert len(prompts) == 8 and all(p["prompt"].count(PLACEHOLDER) == 1 for p in prompts)
        assert [(p["prompt"], p["skill"]) for p in prompts] == [
            (p.prompt, p.skill) for p in template_prompts(cluster["cluster_id"], cluster["class_noun"],
                                                          bool(cluster["is_live"]), 8)]
        if not cluster["is_live"]:
            assert not {p["skill"] for p in prompts} & LIVE_ONLY, page
    assert (clusters["https://shop.example.com/products/teapot"]["subject"],
            clusters["https://shop.example.com/products/teapot"]["class_noun"]) == ("teapot", "teapot")
    assert clusters["https://shop.example.com/products/cat"]["is_live"] is True
    assert clusters["https://shop.example.com/products/bear-plushie"]["class_noun"] == "stuffed animal"
    # A blog post about two products, and the gallery, have no single subject: left empty, prompts all the same.
    assert sum(1 for c in clusters.values() if c["subject"] is None) == 2
    assert sum(1 for c in clusters.values() for im in c["images"] if im["caption"]) > 0.75 * KEPT


def test_demo_manifest_still_reconciles(sample_phase1: PhaseOutput) -> None:
    manifest = sample_phase1.manifest
    assert manifest["records"]["reconciled"] and manifest["records"]["kept"] == KEPT
    assert manifest["clusters"] == {"written": N_CLUSTERS, "rejected": {"cluster_too_small": 2}}
    counters = manifest["phases"]["clusters"]["counters"]
    for stage in ("caption", "subject", "prompts"):
        assert counters[stage]["clusters"] == N_CLUSTERS, stage
    assert counters["subject"]["no_subject_clusters"] == 2
    assert manifest["config"]["caption"]["backend"] == "alt_text"


def test_model_stages_can_be_switched_off(tmp_path) -> None:
    out = run_pipeline([SAMPLE], tmp_path, "--set", "caption.enabled=false", "--set", "subject.enabled=false",
                       "--set", "prompts.enabled=false", *CLIP_OFF)
    clusters = out.clusters()
    assert len(clusters) == N_CLUSTERS and out.manifest["records"]["reconciled"]
    assert all(c["subject"] is None and c["prompts"] == [] and c["provenance"]["caption_backend"] is None
               and all(im["caption"] is None for im in c["images"]) for c in clusters)
    assert not {"caption", "subject", "prompts"} & set(out.manifest["phases"]["clusters"]["counters"])


# --- vLLM backends against the loopback server, with faults ------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory: pytest.TempPathFactory, sample_rows: list[dict]) -> tuple[PhaseOutput, Any]:
    """Phase 1 with every stage on vLLM (a real HTTP server process on loopback), on the multi-process runner.

    Faults: every caption request for one image of the can page fails (-> that cluster falls back to alt
    text); the subject of the shop's teapot page never comes back valid (-> rejected, subject.on_failure is
    reject); the vase's scene prompts never validate (-> template fallback); one dog photo gets a 429 first
    and another answers too slowly once (-> retried, no trace in the output).
    """
    server = FakeOpenAIServer(VL_MODEL, TEXT_MODEL)
    can, dog, vase = sample_clusters(sample_rows, ["/products/can", "/products/dog", "/produkt/vase"])
    vase_subject = subject_for([caption_for(im.image) for im in vase.images])
    server.faults(
        {"match": can.images[1].image_id, "fault": "status:500", "times": None},
        {"match": 'products/teapot"', "fault": "content_invalid_json", "times": None},
        {"match": f'"subject": "{vase_subject}"', "fault": "content_wrong", "times": None},
        {"match": dog.images[0].image_id, "fault": "status:429:0", "times": 1},
        {"match": dog.images[1].image_id, "fault": "slow:20", "times": 1},
    )
    settings = {"caption.backend": "vllm", "subject.backend": "vllm", "prompts.backend": "vllm",
                "llm.endpoint": server.url, "caption.model": VL_MODEL, "subject.model": TEXT_MODEL,
                "prompts.model": TEXT_MODEL, "subject.on_failure": "reject", "llm.max_retries": 3,
                "llm.backoff_s": 0.01, "llm.backoff_max_s": 0.1, "llm.validation_retries": 1,
                "llm.request_timeout_s": 2}
    args = [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]
    try:
        out = run_pipeline([SAMPLE], tmp_path_factory.mktemp("vllm_run"), "--profile", "demo", *args, *CLIP_OFF,
                           "--direct_running_mode", "multi_processing", "--direct_num_workers", "2")
        yield out, server
    finally:
        server.stop()


@pytest.mark.slow
def test_vllm_backends_fill_every_field_through_beam(vllm_run) -> None:
    out, server = vllm_run
    clusters = _by_page(out)
    assert len(clusters) == N_CLUSTERS - 1
    tags = {name: load_prompt(f"{name}_v1.txt").tag for name in ("caption", "subject", "prompts")}
    normal = {page: c for page, c in clusters.items() if not c["provenance"]["fallbacks"]}
    assert len(normal) == N_CLUSTERS - 3
    for page, cluster in normal.items():
        captions = [caption_for(im["image"]["bytes"]) for im in cluster["images"]]
        assert cluster["provenance"] == {
            "caption_backend": "vllm", "subject_backend": "vllm", "prompts_backend": "vllm", "fallbacks": [],
            "caption_model": VL_MODEL, "caption_prompt": tags["caption"], "subject_model": TEXT_MODEL,
            "subject_prompt": tags["subject"], "prompts_model": TEXT_MODEL, "prompts_prompt": tags["prompts"],
            "embed_model": None}, page
        assert cluster["subject"] == subject_for(captions) and cluster["class_noun"] == "object"
        assert [im["caption"] for im in cluster["images"]] == [f"A photo of the sample object: {c}" for c in captions]
        assert len(cluster["prompts"]) == 8 and all("beside a" in p["prompt"] for p in cluster["prompts"])
    log = server.log()
    assert log and all(e["shape_error"] is None for e in log)
    assert {e["model"] for e in log if e["task"] == "caption"} == {VL_MODEL}
    assert {e["model"] for e in log if e["task"] != "caption"} == {TEXT_MODEL}


@pytest.mark.slow
def test_caption_failure_falls_back_for_that_cluster(vllm_run) -> None:
    out, _ = vllm_run
    can = _by_page(out)["https://shop.example.com/products/can"]
    assert can["provenance"]["caption_backend"] == "alt_text" and can["provenance"]["fallbacks"] == ["caption"]
    assert can["provenance"]["caption_model"] is None and can["provenance"]["subject_backend"] == "vllm"
    # The subject stage read the cleaned alt texts and rewrote them.
    assert [im["caption"] for im in can["images"]] == [
        f"A photo of the sample object: {clean_alt_text(im['text']) or 'no caption'}" for im in can["images"]]


@pytest.mark.slow
def test_prompt_failure_falls_back_to_templates(vllm_run) -> None:
    out, _ = vllm_run
    vase = _by_page(out)["https://xn--mbel-5qa.example/produkt/vase"]
    assert vase["provenance"]["prompts_backend"] == "templates" and vase["provenance"]["fallbacks"] == ["prompts"]
    assert [(p["prompt"], p["skill"]) for p in vase["prompts"]] == [
        (p.prompt, p.skill) for p in template_prompts(vase["cluster_id"], "object", False, 8)]


@pytest.mark.slow
def test_subject_failure_rejects_the_cluster_and_counts_reconcile(vllm_run) -> None:
    out, server = vllm_run
    (reject,) = [r for r in out.rejects() if r["reason"] == "subject_failed"]
    assert reject["stage"] == "subject" and reject["n_images"] == 5
    assert reject["page_url"] == "https://shop.example.com/products/teapot"
    assert "OutputInvalid" in reject["detail"] and "not valid JSON" in reject["detail"]
    manifest = out.manifest
    assert manifest["records"]["reconciled"] and manifest["records"]["kept"] == KEPT - 5
    assert manifest["records"]["rejected"]["subject_failed"] == 5
    assert manifest["clusters"]["rejected"] == {"cluster_too_small": 2, "subject_failed": 1}
    counters = manifest["phases"]["clusters"]["counters"]
    assert counters["subject"]["subject_failed"] == 5 and counters["caption"]["fallback_clusters"] == 1
    assert counters["prompts"]["fallback_clusters"] == 1
    # The injected 429 and slow answer were retried (a loaded machine may add timeouts of its own).
    assert counters["caption"]["llm_http_429"] == 1 and counters["caption"]["llm_timeouts"] >= 1
    teapot = [e for e in server.log() if e["task"] == "subject" and e["fault"] == "content_invalid_json"]
    assert [e["n_messages"] for e in teapot] == [2, 4]  # asked again once, with the error fed back


# --- configuration ------------------------------------------------------------------------------------------------

def test_profiles_choose_the_backends() -> None:
    demo, local, dataflow = (build_config(p) for p in ("demo", "local", "dataflow"))
    assert (demo.caption.backend, demo.subject.backend, demo.prompts.backend) == ("alt_text", "offline", "templates")
    for config in (local, dataflow):
        assert (config.caption.backend, config.subject.backend, config.prompts.backend) == ("vllm",) * 3
        assert config.caption.model == VL_MODEL and config.subject.model == config.prompts.model == TEXT_MODEL
        assert set(config.llm.server_args) == {VL_MODEL, TEXT_MODEL} and not config.llm.endpoint
    assert dataflow.llm.accelerator.startswith("type:") and not local.llm.accelerator


def test_new_keys_are_documented() -> None:
    keys = {doc.key: doc for doc in describe()}
    for key in ("llm.endpoint", "llm.request_timeout_s", "llm.max_retries", "llm.max_concurrency", "llm.server_args",
                "caption.backend", "caption.on_failure", "caption.model", "subject.structured_output",
                "subject.min_support", "prompts.n", "prompts.mix", "prompts.accessorize_objects"):
        assert keys[key].help, key
    assert json.dumps(keys["prompts.mix"].default)


@pytest.mark.parametrize("override", ["caption.backend=blip", "subject.on_failure=ignore", "prompts.mix={x: 1}",
                                      "llm.endpoint=localhost:8000", "prompts.n=0"])
def test_bad_settings_are_refused_before_running(override: str) -> None:
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError):
        build_config("demo", None, [override])
