"""dreambooth_synth: real training and sampling of a tiny Stable Diffusion on real DreamBench photos, on CPU.

The model is the tiny-random preset saved to a test directory and loaded through ``from_pretrained``;
the subjects are clusters of the bundled sample (phase 1 on ``sample/crawl.parquet``).
"""

from __future__ import annotations

import gc
import io
import os
import zipfile
from collections.abc import Iterator

import pytest
import torch
from PIL import Image

from dreambooth_synth import (
    LocalStorage,
    ModelConfig,
    NonFiniteLossError,
    NoUsableImagesError,
    SampleConfig,
    Subject,
    Synthesizer,
    TrainConfig,
    load_model,
)
from dreambooth_synth.data import decode_images, encode_latents, to_pixels
from dreambooth_synth.memory import snapshot
from dreambooth_synth.prompts import instance_prompt, sample_seed
from dreambooth_synth.sample import render
from dreambooth_synth.synthesizer import base_weights
from dreambooth_synth.tiny import write_clip_tokenizer
from dreambooth_synth.train import WeightSnapshot, evaluate_loss, fine_tuning, train
from tests.tiny_models import NOT_AN_IMAGE, one_torch_thread, read_clusters, save_tiny_model, subject_of

FAST_SAMPLE = SampleConfig(steps=3, images_per_prompt=1, batch_size=8, negative_prompt="")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    yield from one_torch_thread()


@pytest.fixture(scope="session")
def tiny_model(tiny_sd_dir: str):
    """One loaded tiny SD for the module (as a worker loads one model for all its clusters)."""
    return load_model(ModelConfig(name=tiny_sd_dir))


@pytest.fixture(scope="session")
def clusters(sample_phase1) -> list:
    return read_clusters(sample_phase1.output)


def _unet_and_text(model) -> list:
    return [model.unet, *model.text_encoders]


def _assert_bit_identical(before: dict, model) -> None:
    after = base_weights(_unet_and_text(model))
    assert after.keys() == before.keys(), "the model's modules changed (adapters left behind?)"
    different = [k for k in before if not torch.equal(before[k], after[k])]
    assert not different, f"{len(different)} base tensors changed, e.g. {different[:3]}"


# --- model loading --------------------------------------------------------------------------------------

def test_tokenizer_is_the_real_clip_bpe(tmp_path) -> None:
    import open_clip
    from transformers import CLIPTokenizer

    write_clip_tokenizer(str(tmp_path))
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    reference = open_clip.tokenizer.SimpleTokenizer()
    for text in ("a photo of sks teapot", "A red backpack, on the beach!", "wolf plushie in the style of Monet"):
        ids = tokenizer(text).input_ids
        assert ids == [49406, *reference.encode(text), 49407]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77


def test_preset_directory_loads_through_from_pretrained(tiny_sd_dir: str, tiny_model) -> None:
    with open(os.path.join(tiny_sd_dir, "model_index.json")) as handle:
        assert '"StableDiffusionPipeline"' in handle.read()
    assert tiny_model.family == "sd" and tiny_model.path == tiny_sd_dir
    assert tiny_model.native_resolution == 64 and tiny_model.vae_scale_factor == 4
    assert tiny_model.prediction_type == "epsilon"
    assert tiny_model.device.type == "cpu" and tiny_model.weight_dtype == torch.float32
    assert not any(p.requires_grad for p in tiny_model.unet.parameters())


def test_unloadable_model_has_a_clear_error(tmp_path) -> None:
    from dreambooth_synth import ModelLoadError

    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(ModelConfig(name=str(tmp_path / "missing-model")))


# --- training ----------------------------------------------------------------------------------------

def _latents(model, cluster, resolution: int = 64):
    photos, problems = decode_images([im.image for im in cluster.images])
    assert not problems
    return encode_latents(model, to_pixels(photos, resolution))


def test_training_lowers_the_loss_on_real_photos(tiny_model, clusters) -> None:
    config = TrainConfig(steps=40, learning_rate=1e-2, log_every_steps=20)
    latents = _latents(tiny_model, clusters[0])
    prompt = instance_prompt(config, "backpack")
    with fine_tuning(tiny_model, config) as params:
        before = evaluate_loss(tiny_model, latents, prompt, seed=7, resolution=64)
        result = train(tiny_model, config, params, latents, prompt, seed=0, resolution=64)
        after = evaluate_loss(tiny_model, latents, prompt, seed=7, resolution=64)
    assert result.steps == 40 and len(result.losses) == 40
    # The same fixed draws of noise and timesteps, before and after: the model learnt to denoise these photos.
    assert after < 0.9 * before, (before, after)
    quarter = len(result.losses) // 4
    assert sum(result.losses[-quarter:]) < sum(result.losses[:quarter])
    assert result.final_loss < result.initial_loss


def test_lora_trains_adapters_and_leaves_every_base_weight_bit_identical(tiny_model, clusters) -> None:
    before = base_weights(_unet_and_text(tiny_model))
    config = TrainConfig(steps=5, learning_rate=1e-2, train_text_encoder=True, lora_rank=2)
    latents = _latents(tiny_model, clusters[1])
    with fine_tuning(tiny_model, config) as params:
        trainable = {i: [n for n, p in m.named_parameters() if p.requires_grad]
                     for i, m in enumerate(_unet_and_text(tiny_model))}
        assert all(names and all("lora_" in n for n in names) for names in trainable.values())  # text encoder too
        initial = [p.detach().clone() for p in params]
        train(tiny_model, config, params, latents, "a photo of sks backpack", seed=0, resolution=64)
        changed = sum(not torch.equal(a, p) for a, p in zip(initial, params, strict=True))
        assert changed > len(params) // 2  # lora_B starts at zero and moves; lora_A moves too
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for module in _unet_and_text(tiny_model) for m in module.modules())
    assert not any(hasattr(module, "peft_config") for module in _unet_and_text(tiny_model))
    _assert_bit_identical(before, tiny_model)


def test_full_mode_restores_the_base_weights_exactly_between_subjects(tiny_sd_dir: str, clusters) -> None:
    model = load_model(ModelConfig(name=tiny_sd_dir))  # its own copy: full mode owns the model
    before = base_weights(_unet_and_text(model))
    config = TrainConfig(mode="full", steps=4, learning_rate=1e-3)
    snapshot_ = WeightSnapshot([model.unet], pin=False)
    with fine_tuning(model, config, snapshot_) as params:
        assert len(params) == len(list(model.unet.parameters()))
        train(model, config, params, _latents(model, clusters[0]), "a photo of sks object", seed=0, resolution=64)
        trained = base_weights(_unet_and_text(model))
        assert sum(not torch.equal(before[k], trained[k]) for k in before) > 10
    _assert_bit_identical(before, model)

    synthesizer = Synthesizer(model, config, FAST_SAMPLE)
    for cluster in clusters[:2]:
        synthesizer.synthesize(subject_of(cluster))
        _assert_bit_identical(before, model)


def test_non_finite_loss_stops_the_subject_and_the_next_one_goes_on(tiny_model, clusters) -> None:
    before = base_weights(_unet_and_text(tiny_model))
    diverging = Synthesizer(tiny_model, TrainConfig(steps=50, learning_rate=1e30), FAST_SAMPLE)
    with pytest.raises(NonFiniteLossError) as caught:
        diverging.synthesize(subject_of(clusters[0]))
    assert caught.value.reason == "non_finite_loss"
    assert 1 < caught.value.step < 50 and caught.value.seconds["train"] > 0
    assert caught.value.__traceback__ is not None and caught.value.__context__ is None
    _assert_bit_identical(before, tiny_model)
    ok = Synthesizer(tiny_model, TrainConfig(steps=3, learning_rate=1e-3), FAST_SAMPLE).synthesize(
        subject_of(clusters[1]))
    assert len(ok.renders) == 1


def test_undecodable_photos_are_skipped_and_a_subject_without_any_fails(tiny_model, clusters) -> None:
    synthesizer = Synthesizer(tiny_model, TrainConfig(steps=2), FAST_SAMPLE)
    subject = subject_of(clusters[0])
    mixed = Subject(subject.key, "backpack", (NOT_AN_IMAGE, *subject.images), subject.prompts)
    result = synthesizer.synthesize(mixed)
    assert result.n_images == len(subject.images) and len(result.skipped_images) == 1
    with pytest.raises(NoUsableImagesError, match="none of the 2 images decodes"):
        synthesizer.synthesize(Subject("x", "backpack", (NOT_AN_IMAGE, b""), subject.prompts))


# --- sampling --------------------------------------------------------------------------------------------

def test_k_images_per_prompt_of_the_configured_size(tiny_model, clusters) -> None:
    sample = SampleConfig(steps=3, images_per_prompt=3, batch_size=4, width=64, height=48, scheduler="ddim")
    synthesizer = Synthesizer(tiny_model, TrainConfig(steps=2), sample)
    prompts = (("a photo of {subject} on a beach", "recontextualization"),
               ("a painting of {subject} in the style of Monet", "stylization"))
    result = synthesizer.synthesize(subject_of(clusters[0].replace(class_noun=None), prompts))
    assert [(r.prompt_index, r.k) for r in result.renders] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for r in result.renders:
        image = Image.open(io.BytesIO(r.image))
        assert image.format == "PNG" and image.size == (64, 48) == (r.width, r.height)
        assert r.seed == sample_seed(clusters[0].cluster_id, r.template, r.k)
    assert result.renders[0].prompt == "a photo of sks object on a beach"  # no class noun: "object"
    assert len({r.seed for r in result.renders}) == 6
    assert len({r.image for r in result.renders}) == 6


def test_same_seed_same_image_different_seeds_different_images(tiny_model) -> None:
    from dreambooth_synth.sample import sampling_scheduler

    tiny_model.pipe.scheduler = sampling_scheduler("dpm++", tiny_model.scheduler_config)
    import numpy as np

    prompts = ["a photo of sks teapot"] * 3
    first = render(tiny_model, prompts, [11, 12, 11], FAST_SAMPLE, 64, 64)
    again = render(tiny_model, prompts, [11, 12, 11], FAST_SAMPLE, 64, 64)
    alone = render(tiny_model, prompts[:1], [11], FAST_SAMPLE, 64, 64)  # the same seed, alone in its batch

    def pixels(r) -> np.ndarray:
        return np.asarray(r.image, dtype=np.int16)

    # The same call again: bit for bit the same images.
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(first, again, strict=True))
    # Another seed, another image.
    assert np.abs(pixels(first[0]) - pixels(first[1])).mean() > 5
    # The same seed elsewhere in the batch, or alone in a batch, starts from the same noise; batched CPU
    # kernels round differently by position, so a pixel may differ in its last bit.
    assert np.abs(pixels(first[0]) - pixels(first[2])).max() <= 2
    assert np.abs(pixels(first[0]) - pixels(alone[0])).max() <= 2


# --- prior preservation ----------------------------------------------------------------------------------

def test_class_images_are_rendered_once_per_class_and_reused(tiny_sd_dir: str, tiny_model, clusters, tmp_path) -> None:
    storage = LocalStorage()
    config = TrainConfig(steps=3, prior_preservation=True, num_class_images=2)
    cache_dir = str(tmp_path / "class_images")
    synthesizer = Synthesizer(tiny_model, config, FAST_SAMPLE, storage=storage, class_image_dir=cache_dir)
    teapot_a = synthesizer.synthesize(subject_of(clusters[0].replace(class_noun="teapot")))
    (teapot_file,) = os.listdir(cache_dir)
    stamp = os.stat(os.path.join(cache_dir, teapot_file)).st_mtime_ns
    teapot_b = synthesizer.synthesize(subject_of(clusters[1].replace(class_noun="teapot")))
    assert os.stat(os.path.join(cache_dir, teapot_file)).st_mtime_ns == stamp  # read, not rendered again
    vase = synthesizer.synthesize(subject_of(clusters[2].replace(class_noun="vase")))
    assert (teapot_a.prior_rendered, teapot_b.prior_rendered, vase.prior_rendered) == (True, False, True)
    files = sorted(os.listdir(cache_dir))
    assert len(files) == 2 and files[0].startswith("teapot-") and files[1].startswith("vase-")
    with zipfile.ZipFile(os.path.join(cache_dir, files[0])) as archive:
        assert sorted(n for n in archive.namelist() if n.endswith(".png")) == ["00000.png", "00001.png"]
    # Another worker (a new process, its own model) finds them in the shared storage.
    other = Synthesizer(load_model(ModelConfig(name=tiny_sd_dir)), config, FAST_SAMPLE, storage=storage,
                        class_image_dir=cache_dir)
    assert other.synthesize(subject_of(clusters[3].replace(class_noun="teapot"))).prior_rendered is False


# --- memory ---------------------------------------------------------------------------------------------

def test_memory_does_not_grow_across_subjects_even_failed_ones(tiny_model, clusters) -> None:
    before = base_weights(_unet_and_text(tiny_model))
    sample = SampleConfig(steps=2, images_per_prompt=2, negative_prompt="")
    synthesizer = Synthesizer(tiny_model, TrainConfig(steps=8, learning_rate=1e-2, train_text_encoder=True), sample)
    diverging = Synthesizer(tiny_model, TrainConfig(steps=30, learning_rate=1e30, train_text_encoder=True), sample)
    n_parameters = sum(p.numel() for p in tiny_model.unet.parameters())

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    rss, tensors = [], []
    for i, cluster in enumerate(clusters[:7]):
        if i % 3 == 2:  # every third subject diverges mid-training, with adapters and optimizer state alive
            with pytest.raises(NonFiniteLossError):
                diverging.synthesize(subject_of(cluster))
        else:
            synthesizer.synthesize(subject_of(cluster))
        rss.append(snapshot().rss)
        tensors.append(live_tensors())
        assert sum(p.numel() for p in tiny_model.unet.parameters()) == n_parameters
    _assert_bit_identical(before, tiny_model)
    # No tensor outlives its subject; the first subjects warm up allocator pools and lazy caches.
    assert len(set(tensors[2:])) == 1, tensors
    growth = max(rss[2:]) - min(rss[2:])
    assert growth < 24 * 2**20, [f"{r / 2**20:.0f} MiB" for r in rss]


# --- SDXL -----------------------------------------------------------------------------------------------

def test_sdxl_pipeline_trains_and_samples(tmp_path_factory, clusters) -> None:
    model = load_model(ModelConfig(name=save_tiny_model(tmp_path_factory.mktemp("xl"), "tiny-random-xl")))
    assert model.family == "sdxl" and len(model.text_encoders) == 2
    before = base_weights(_unet_and_text(model))
    synthesizer = Synthesizer(model, TrainConfig(steps=3, learning_rate=1e-3, train_text_encoder=True,
                                                 gradient_checkpointing=True),
                              SampleConfig(steps=2, images_per_prompt=1, scheduler="euler"))
    result = synthesizer.synthesize(subject_of(clusters[0].replace(class_noun="backpack")))
    assert result.train.steps == 3 and len(result.renders) == 1
    assert not model.unet.is_gradient_checkpointing  # switched off again with the adapters
    assert Image.open(io.BytesIO(result.renders[0].image)).size == (64, 64)
    _assert_bit_identical(before, model)


# --- configuration -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"steps": 0}, {"learning_rate": 0.0}, {"resolution": 100}, {"identifier": "two words"},
    {"instance_prompt": "a photo of {class_noun}"}, {"class_prompt": "a photo"},
])
def test_train_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"scheduler": "magic"}, {"images_per_prompt": 0}, {"width": 30},
                                    {"jpeg_quality": 0}])
def test_sample_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SampleConfig(**kwargs)


def test_learning_rate_defaults_follow_the_mode() -> None:
    assert TrainConfig().effective_learning_rate == 1e-4
    assert TrainConfig(mode="full").effective_learning_rate == 5e-6
    assert TrainConfig(lora_rank=8).effective_lora_alpha == 8.0


# --- GPU (skipped without CUDA) ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gpu_bf16_training_and_memory_release(tiny_sd_dir: str, clusters, mode: str) -> None:
    model = load_model(ModelConfig(name=tiny_sd_dir, device="cuda", mixed_precision="bf16"))
    assert model.device.type == "cuda" and model.weight_dtype == torch.bfloat16
    synthesizer = Synthesizer(model, TrainConfig(mode=mode, steps=5, learning_rate=1e-3), FAST_SAMPLE)
    before = base_weights(_unet_and_text(model))
    allocated = []
    for cluster in clusters[:4]:
        result = synthesizer.synthesize(subject_of(cluster))
        assert result.peak.cuda_peak_allocated >= result.after.cuda_allocated
        allocated.append(result.after.cuda_allocated)
    assert len(set(allocated[1:])) == 1, allocated  # every byte of a cluster is given back
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < 64 * 2**20  # empty_cache ran
    _assert_bit_identical(before, model)

