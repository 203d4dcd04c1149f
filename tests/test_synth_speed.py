"""The speed switches of dreambooth_synth (``synth.speed``, bf16, batched sampling): each gives what the plain
path gives, within a tolerance that follows from what the switch changes, on CPU with the tiny model.

The plain path is the diffusers scripts' way: eager attention, the VAE and the text encoder at every step,
AdamW one parameter at a time, one image per pipeline call, float32, no compilation, one subject at a time
(peft adapters). Each test turns one switch on and compares the per-step training losses and the renders
of real DreamBench subjects with those of the plain path. Three kinds of tolerance:

* **exact** -- adapter slots with one slot, and a compiled UNet (the ``eager`` backend: the captured graph
  runs the same kernels): the same operations on the same numbers, so the same losses and the same pixels.
* **float32 reassociation** -- SDPA against eager attention, encodings cached against recomputed (a batch of
  photos through the VAE against one photo), the foreach and fused AdamW against the for-loop one, several
  subjects in one batch, several images per pipeline call: the same math with sums taken in another order.
  Each op then differs in the last bits (float32: about 1e-7 relative); over a few training steps this stays
  below 1e-4 relative in the losses, and a rendered pixel moves by at most 2 of 255 levels (the existing
  sampling test's bound for batched kernels).
* **bfloat16** -- an 8-bit mantissa rounds each op to about 2e-3 relative: the losses may differ by 1% and a
  render by a few levels on average (some pixels more: the sampler amplifies small differences), 3 of 255
  on average here.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator, Sequence

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from dreambooth_synth import (
    ModelConfig,
    NoUsableImagesError,
    SampleConfig,
    SpeedConfig,
    Subject,
    SynthesisResult,
    Synthesizer,
    TrainConfig,
    load_model,
)
from dreambooth_synth.data import LatentDistribution, decode_images, encode_latents, to_pixels
from dreambooth_synth.errors import NonFiniteLossError
from dreambooth_synth.slots import LoRASlots, SlotLoRALinear
from dreambooth_synth.synthesizer import base_weights
from dreambooth_synth.train import (
    UNET_LORA_TARGETS,
    TrainJob,
    evaluate_loss,
    fine_tuning,
    slot_fine_tuning,
    train_many,
)
from pipeline.config import build_config
from pipeline.phases import build_synthesize_pipeline
from tests.clusters import sample_clusters
from tests.tiny_models import NOT_AN_IMAGE, broken_copy, one_torch_thread, subject_of, with_prompts, write_clusters_file

PROMPTS = (("a photo of {subject} on a beach", "recontextualization"),
           ("a painting of {subject} in the style of Monet", "stylization"))
TRAIN = TrainConfig(steps=6, learning_rate=1e-2)
PLAIN_SPEED = SpeedConfig(attention="eager", cache_encodings=False, optimizer="for-loop")
PLAIN_SAMPLE = SampleConfig(steps=3, images_per_prompt=2, batch_size=1, negative_prompt="")
PAGES = ["/products/teapot", "/products/backpack", "/products/clock"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def model(tiny_sd_dir: str):
    return load_model(ModelConfig(name=tiny_sd_dir))


@pytest.fixture(scope="module")
def clusters(sample_rows) -> list:
    nouns = ("teapot", "backpack", "clock")
    return [c.replace(class_noun=noun) for c, noun in zip(sample_clusters(sample_rows, PAGES), nouns, strict=True)]


@pytest.fixture(scope="module")
def subjects(clusters) -> list[Subject]:
    return [subject_of(c, PROMPTS) for c in clusters]


def _synthesize(model, subjects: Sequence[Subject], speed: SpeedConfig = PLAIN_SPEED,
                sample: SampleConfig = PLAIN_SAMPLE, train: TrainConfig = TRAIN) -> list:
    synthesizer = Synthesizer(model, train, sample, speed=speed)
    try:
        return synthesizer.synthesize_many(subjects)
    finally:
        synthesizer.close()


@pytest.fixture(scope="module")
def plain(model, subjects) -> list[SynthesisResult]:
    """The plain path's results for the first two subjects."""
    results = _synthesize(model, subjects[:2])
    assert all(isinstance(r, SynthesisResult) for r in results)
    return results


def _pixels(render) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(render.image)), dtype=np.int16)


def _compare(expected: Sequence[SynthesisResult], actual: Sequence, *, loss_rtol: float, max_pixel: int | None,
             mean_pixel: float) -> None:
    for a, b in zip(expected, actual, strict=True):
        assert isinstance(b, SynthesisResult), b
        assert a.key == b.key and len(a.train.losses) == len(b.train.losses) == TRAIN.steps
        np.testing.assert_allclose(b.train.losses, a.train.losses, rtol=loss_rtol, atol=0)
        assert [(r.prompt, r.k, r.seed) for r in a.renders] == [(r.prompt, r.k, r.seed) for r in b.renders]
        differences = [np.abs(_pixels(x) - _pixels(y)) for x, y in zip(a.renders, b.renders, strict=True)]
        if max_pixel is not None:
            assert max(d.max() for d in differences) <= max_pixel
        assert np.mean([d.mean() for d in differences]) <= mean_pixel


# --- configuration ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"attention": "flash"}, {"optimizer": "sgd"}, {"clusters_per_batch": 0},
                                    {"compile_backend": " "}, {"loss_check_every": 0}])
def test_speed_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SpeedConfig(**kwargs)


def test_several_subjects_per_batch_need_unet_lora_only() -> None:
    with pytest.raises(ValueError, match="clusters_per_batch"):
        SpeedConfig(clusters_per_batch=2).check(TrainConfig(train_text_encoder=True))
    with pytest.raises(ValueError, match="clusters_per_batch"):
        SpeedConfig(clusters_per_batch=2).check(TrainConfig(mode="full"))
    with pytest.raises(ValueError):
        SampleConfig(batch_size=-1)
    assert SampleConfig(batch_size=0).batch_size == 0  # all of a cluster's renders in one call


def test_speed_section_is_in_the_pipeline_config_and_out_of_the_resume_key(tiny_sd_dir: str) -> None:
    from transforms.synthesize import synthesis_hash

    base = build_config("demo").synth
    fast = build_config("demo", overrides=["synth.speed.clusters_per_batch=4", "synth.speed.optimizer=fused",
                                           "synth.speed.compile_unet=true"]).synth
    assert fast.speed == SpeedConfig(clusters_per_batch=4, optimizer="fused", compile_unet=True)
    assert synthesis_hash(fast) == synthesis_hash(base)  # a resumed job may change how fast, not what
    with pytest.raises(Exception, match="clusters_per_batch"):
        build_config("demo", overrides=["synth.speed.clusters_per_batch=2", "synth.train.mode=full"])


# --- each switch against the plain path -------------------------------------------------------------------

@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_adapter_slots_compute_exactly_what_peft_adapters_compute(model, subjects, train_text_encoder: bool) -> None:
    # With the text encoder trained too, its peft adapters start from the same draws on both paths.
    config = dataclasses.replace(TRAIN, train_text_encoder=train_text_encoder)
    photos, _ = decode_images(subjects[0].images)
    latents = encode_latents(model, to_pixels(photos, 64))
    job = TrainJob(latents, "a photo of sks teapot", seed=3)
    before = base_weights([model.unet, *model.text_encoders])
    base = evaluate_loss(model, latents, job.instance_prompt, seed=7, resolution=64)
    with fine_tuning(model, config, seed=3) as params:
        (peft,) = train_many(model, config, params, [job], resolution=64)
        peft_after = evaluate_loss(model, latents, job.instance_prompt, seed=7, resolution=64)
    slots = LoRASlots(model.unet, UNET_LORA_TARGETS, 1, TRAIN.lora_rank, TRAIN.effective_lora_alpha)
    try:
        with slot_fine_tuning(model, config, slots, {0: 3}) as params:
            (slotted,) = train_many(model, config, params, [job], resolution=64)
            slotted_after = evaluate_loss(model, latents, job.instance_prompt, seed=7, resolution=64)
        # Between subjects every slot is zero: the UNet computes the base model, bit for bit.
        assert all(not layer.lora_B.any() and not layer.lora_B.requires_grad for _, layer in slots.layers)
        assert evaluate_loss(model, latents, job.instance_prompt, seed=7, resolution=64) == base
    finally:
        slots.remove()
    assert slotted.losses == peft.losses and slotted_after == peft_after
    assert not any(isinstance(m, SlotLoRALinear) for m in model.unet.modules())
    after = base_weights([model.unet, *model.text_encoders])
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_sdpa_attention_matches_eager(model, subjects, plain) -> None:
    _compare(plain, _synthesize(model, subjects[:2], dataclasses.replace(PLAIN_SPEED, attention="sdpa")),
             loss_rtol=1e-4, max_pixel=2, mean_pixel=0.1)


def test_encodings_cached_once_per_subject_match_encoding_every_step(model, subjects, plain) -> None:
    cached = _synthesize(model, subjects[:2], dataclasses.replace(PLAIN_SPEED, cache_encodings=True))
    _compare(plain, cached, loss_rtol=1e-4, max_pixel=2, mean_pixel=0.1)
    # The VAE's time moves out of training into the latents part, once per subject.
    assert all(c.seconds["latents"] > p.seconds["latents"] for c, p in zip(cached, plain, strict=True))


@pytest.mark.parametrize("optimizer", ["foreach", "fused"])
def test_optimizer_implementations_match_the_for_loop(model, subjects, plain, optimizer: str) -> None:
    _compare(plain, _synthesize(model, subjects[:2], dataclasses.replace(PLAIN_SPEED, optimizer=optimizer)),
             loss_rtol=1e-4, max_pixel=2, mean_pixel=0.1)


def test_all_renders_of_a_subject_in_one_call_match_one_by_one(model, subjects, plain) -> None:
    _compare(plain, _synthesize(model, subjects[:2], sample=dataclasses.replace(PLAIN_SAMPLE, batch_size=0)),
             loss_rtol=1e-6, max_pixel=2, mean_pixel=0.1)


def test_reading_the_loss_every_few_steps_changes_only_when_it_is_read(model, subjects, plain) -> None:
    _compare(plain, _synthesize(model, subjects[:2], dataclasses.replace(PLAIN_SPEED, loss_check_every=4)),
             loss_rtol=0, max_pixel=0, mean_pixel=0)
    diverging = TrainConfig(steps=30, learning_rate=1e30)
    (every_step,) = _synthesize(model, subjects[:1], train=diverging)
    (every_8,) = _synthesize(model, subjects[:1], dataclasses.replace(PLAIN_SPEED, loss_check_every=8),
                             train=diverging)
    assert isinstance(every_step, NonFiniteLossError) and isinstance(every_8, NonFiniteLossError)
    assert every_8.step == every_step.step and 1 < every_step.step < 30  # the step it happened, not when read


@pytest.mark.slow
def test_bf16_matches_float32(tiny_sd_dir: str, subjects, plain) -> None:
    bf16 = load_model(ModelConfig(name=tiny_sd_dir, mixed_precision="bf16"))
    assert bf16.weight_dtype == torch.bfloat16 and bf16.autocast_dtype == torch.bfloat16
    _compare(plain, _synthesize(bf16, subjects[:2]), loss_rtol=1e-2, max_pixel=None, mean_pixel=3.0)


def test_subjects_trained_together_match_subjects_trained_alone(model, subjects, plain) -> None:
    together = _synthesize(model, subjects[:2], dataclasses.replace(PLAIN_SPEED, clusters_per_batch=2))
    _compare(plain, together, loss_rtol=1e-4, max_pixel=2, mean_pixel=0.1)
    # The batch's training and sampling time is shared out evenly: the two subjects' parts are equal.
    assert together[0].seconds["train"] == together[1].seconds["train"] > 0


def test_a_failing_subject_does_not_touch_the_others_in_its_batch(model, subjects, plain) -> None:
    undecodable = Subject("broken", "teapot", (NOT_AN_IMAGE,), PROMPTS)
    out = _synthesize(model, [subjects[0], undecodable, subjects[1]],
                      dataclasses.replace(PLAIN_SPEED, clusters_per_batch=3))
    assert isinstance(out[1], NoUsableImagesError) and out[1].seconds["total"] >= 0
    _compare(plain, [out[0], out[2]], loss_rtol=1e-4, max_pixel=2, mean_pixel=0.1)


def test_a_diverging_subject_stops_alone_and_the_others_train_on(model, subjects) -> None:
    photos, _ = decode_images(subjects[0].images)
    latents = encode_latents(model, to_pixels(photos, 64))
    diverging = LatentDistribution(mean=torch.full_like(latents.mean, float("nan")), std=latents.std)
    slots = LoRASlots(model.unet, UNET_LORA_TARGETS, 2, TRAIN.lora_rank, TRAIN.effective_lora_alpha)
    try:
        jobs = [TrainJob(latents, "a photo of sks teapot", seed=5, slot=0),
                TrainJob(diverging, "a photo of sks teapot", seed=6, slot=1)]
        with slot_fine_tuning(model, TRAIN, slots, {0: 5, 1: 6}) as params:
            together = train_many(model, TRAIN, params, jobs, resolution=64, slots=slots)
        with slot_fine_tuning(model, TRAIN, slots, {0: 5}) as params:
            (alone,) = train_many(model, TRAIN, params, jobs[:1], resolution=64, slots=slots)
    finally:
        slots.remove()
    assert isinstance(together[1], NonFiniteLossError) and together[1].step == 1
    np.testing.assert_allclose(together[0].losses, alone.losses, rtol=1e-4)


@pytest.mark.slow
def test_compiled_unet_is_compiled_once_and_reused_for_every_subject(model, subjects, plain) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    speed = dataclasses.replace(PLAIN_SPEED, compile_unet=True, compile_backend="eager")
    synthesizer = Synthesizer(model, TRAIN, PLAIN_SAMPLE, speed=speed)
    try:
        first = synthesizer.synthesize(subjects[0])
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 2  # training (train mode) and sampling (eval mode)
        second = synthesizer.synthesize(subjects[1])
        assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled again for the next subject
    finally:
        synthesizer.close()
    assert model.unet._compiled_call_impl is None
    _compare(plain, [first, second], loss_rtol=1e-6, max_pixel=0, mean_pixel=0)


# --- the Beam stage with several clusters per batch -------------------------------------------------------

@pytest.mark.slow
def test_stage_trains_clusters_in_batches_and_rejects_the_broken_one(tiny_sd_dir, clusters, tmp_path) -> None:
    good = [with_prompts(c, c.class_noun, PROMPTS[:1]) for c in clusters[:2]]
    broken = broken_copy(clusters[2])
    files = [write_clusters_file([*good, broken], tmp_path / "clusters.parquet")]
    settings = {"synth.model.name": tiny_sd_dir, "synth.train.steps": 3, "synth.sample.steps": 2,
                "synth.sample.images_per_prompt": 1, "synth.speed.clusters_per_batch": 3}
    config = build_config("demo", overrides=[f"{k}={v}" for k, v in settings.items()])
    p = TestPipeline()
    out = build_synthesize_pipeline(p, config, files, str(tmp_path / "out"))
    keys = out["candidates"] | "Keys" >> beam.Map(lambda c: (c.cluster_id, c.prompt, c.train.steps))
    assert_that(keys, equal_to([(c.cluster_id, f"a photo of sks {c.class_noun} on a beach", 3) for c in good]),
                label="Candidates")
    reasons = out["rejects"] | "Reasons" >> beam.Map(lambda r: (r.id, r.reason, r.n_images))
    assert_that(reasons, equal_to([(broken.cluster_id, "no_usable_images", len(broken.images))]), label="Rejects")
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]
                if c.key.metric.namespace == "synthesize"}
    assert counters["clusters_trained"] == 2 and counters["candidates"] == 2


# --- on a GPU (skipped without CUDA) ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fast_switches_match_the_plain_path_in_bf16(tiny_sd_dir: str, subjects) -> None:
    """On CUDA, in bf16: flash/memory-efficient SDPA kernels, fused AdamW, two subjects per batch and all renders
    in one call against the plain path. Both sides round every op to bfloat16 (about 2e-3 relative), in other
    orders: the CPU's bf16-against-fp32 bounds, with room for other kernels (losses 2%, 4 levels on average)."""
    model = load_model(ModelConfig(name=tiny_sd_dir, device="cuda", mixed_precision="bf16"))
    plain = _synthesize(model, subjects[:2])
    fast = _synthesize(model, subjects[:3], SpeedConfig(optimizer="fused", clusters_per_batch=2),
                       sample=dataclasses.replace(PLAIN_SAMPLE, batch_size=0))
    _compare(plain, fast[:2], loss_rtol=2e-2, max_pixel=None, mean_pixel=4.0)
    # Two batches (two subjects, then one): every byte of the first is given back before the second.
    assert fast[0].after.cuda_allocated == fast[2].after.cuda_allocated
