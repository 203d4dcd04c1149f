"""Stage *embed*: the open_clip ModelHandler through RunInference, with the tiny-random model on real photos."""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import ConfigError, build_config
from tests.clip_helpers import TINY, image_record, make_cluster, photo_cluster
from tests.clusters import beam_counters
from tests.conftest import SAMPLE, run_pipeline
from transforms.embed import Embed, inference_failure_rejects
from transforms.models.clip import (
    ImagePixels,
    ModelWeightsUnavailable,
    PixelTransform,
    check_model_config,
    decode_image,
    embed_inference,
    image_transform,
    load_image_encoder,
    open_clip_transform,
    preprocess_config,
)
from transforms.settings import EmbedConfig

# --- the model ------------------------------------------------------------------------------------------


def test_tiny_random_weights_are_seeded_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1).item()
    torch.manual_seed(123)
    first = load_image_encoder(TINY)
    assert torch.rand(1).item() == before  # loading did not consume the caller's random numbers
    second = load_image_encoder(TINY)
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = load_image_encoder(dataclasses.replace(TINY, seed=1))
    assert not torch.equal(first.model.visual.conv1.weight, other.model.visual.conv1.weight)
    # The same classes as the real architectures, shrunk.
    assert type(first.model).__name__ == "CLIP" and type(first.model.visual).__name__ == "VisionTransformer"
    assert first.model.visual.output_dim == 64


def test_preprocessing_follows_the_pretrained_tag() -> None:
    assert preprocess_config(TINY)["size"] == 224
    vit_l = preprocess_config(EmbedConfig(model="ViT-L-14", pretrained="datacomp_xl_s13b_b90k"))
    assert vit_l["size"] == 224 and vit_l["interpolation"] == "bicubic"
    siglip = preprocess_config(EmbedConfig(model="ViT-B-16-SigLIP", pretrained="webli"))
    assert siglip["mean"] == (0.5, 0.5, 0.5) and siglip["size"] == 224


@pytest.mark.parametrize("config", [TINY, EmbedConfig(model="ViT-B-16-SigLIP", pretrained="webli")],
                         ids=["tiny-random", "siglip"])
def test_pixel_transform_is_open_clips_transform(config: EmbedConfig, product_photos: list[bytes]) -> None:
    fast, reference = image_transform(config), open_clip_transform(config)
    assert isinstance(fast, PixelTransform)
    for photo in product_photos[:6]:
        image = decode_image(image_record(photo, "https://x.example/p").image)
        assert torch.equal(fast(image), reference(image))


def test_checkpoint_file_loads_the_same_weights(tmp_path) -> None:
    source = load_image_encoder(dataclasses.replace(TINY, seed=7))
    path = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), path)
    loaded = load_image_encoder(dataclasses.replace(TINY, seed=0, checkpoint=str(path)))
    pixels = torch.rand(2, 3, 224, 224)
    np.testing.assert_array_equal(loaded.embed(pixels), source.embed(pixels))


def test_offline_real_model_fails_with_a_clear_message(monkeypatch, tmp_path) -> None:
    # The real hub client in offline mode, with an empty cache: what a worker without network sees.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    config = EmbedConfig(model="ViT-L-14", pretrained="datacomp_xl_s13b_b90k")
    with pytest.raises(ModelWeightsUnavailable) as caught:
        load_image_encoder(config)
    message = str(caught.value)
    assert "could not fetch the pretrained weights of ViT-L-14 / datacomp_xl_s13b_b90k" in message
    assert "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K" in message
    assert "--set embed.checkpoint=" in message


def test_offline_worker_load_fails_with_that_message(monkeypatch, tmp_path) -> None:
    """Where the launcher cannot tell (remote workers), a worker without the weights says which key to set.
    (A local run fails before it starts: tests/test_runners.py.)"""
    from pipeline.config import build_config
    from transforms.models.clip import ModelWeightsUnavailable, load_image_encoder

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelWeightsUnavailable, match="could not fetch the pretrained weights") as caught:
        load_image_encoder(build_config("local").embed)
    assert "embed.checkpoint" in str(caught.value)


@pytest.mark.parametrize("override, message", [
    ("embed.model=ViT-Q-99", "unknown open_clip architecture 'ViT-Q-99'"),
    ("embed.pretrained=no_such_tag", "not an open_clip pretrained tag of ViT-L-14"),
])
def test_unknown_model_or_tag_is_refused_before_running(tmp_path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_pipeline([SAMPLE], tmp_path, "--profile", "local", "--set", override)


@pytest.mark.parametrize("kwargs", [{"device": "tpu"}, {"precision": "int8"}, {"batch_size": 0},
                                    {"batch_size": 4, "min_batch_size": 8},
                                    {"model": "tiny-random", "pretrained": "openai"}])
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        EmbedConfig(**kwargs)


def test_profiles_name_models() -> None:
    assert build_config("demo").embed.model == "tiny-random"
    for profile in ("local", "dataflow"):
        config = build_config(profile)
        assert (config.embed.model, config.embed.pretrained) == ("ViT-L-14", "datacomp_xl_s13b_b90k")
        assert config.embed.share_model_across_processes
        check_model_config(config.embed)
    assert build_config("dataflow").embed.accelerator.startswith("type:nvidia")


# --- the handler through RunInference ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def clusters(product_photos: list[bytes]) -> list:
    """Four clusters of 3, 4, 5 and 6 real photos (18 images)."""
    sizes, out, start = (3, 4, 5, 6), [], 0
    for i, n in enumerate(sizes):
        out.append(photo_cluster(f"https://shop{i}.example.com/p", product_photos[start:start + n]))
        start += n
    return out


def _direct_embeddings(cluster) -> np.ndarray:
    encoder = load_image_encoder(TINY)
    transform = image_transform(TINY)
    return encoder.embed(torch.stack([transform(decode_image(image.image)) for image in cluster.images]))


def _matches(cluster, expected: dict) -> bool:
    return bool(np.allclose(np.stack([im.embedding for im in cluster.images]), expected[cluster.cluster_id], atol=1e-5))


def test_embed_stage_attaches_unit_embeddings_in_batches(clusters) -> None:
    config = dataclasses.replace(TINY, batch_size=8)
    with TestPipeline() as p:
        embedded, rejects = p | beam.Create(clusters) | Embed(config, min_images=3)
        assert_that(rejects, equal_to([]), label="NoRejects")
        shapes = embedded | "Shapes" >> beam.Map(lambda c: (c.cluster_id, tuple(im.embedding.shape for im in c.images)))
        assert_that(shapes, equal_to([(c.cluster_id, ((64,),) * len(c.images)) for c in clusters]), label="Shapes")
        assert_that(embedded | "Norms" >> beam.FlatMap(lambda c: [round(float(np.linalg.norm(im.embedding)), 5)
                                                                    for im in c.images]),
                    equal_to([1.0] * 18), label="UnitNorm")
        expected = {c.cluster_id: _direct_embeddings(c) for c in clusters}
        assert_that(embedded | "MatchDirect" >> beam.Map(_matches, expected), equal_to([True] * 4),
                    label="SameAsPlainCall")
    result = p.result
    # num_inferences is RunInference's own counter, in the handler's namespace: one per cluster.
    assert beam_counters(result, "embed") == {"clusters": 4, "images": 18, "num_inferences": 4}
    batches = {d.key.metric.name: d.committed for d in result.metrics().query()["distributions"]
               if d.key.metric.namespace == "embed"}
    # RunInference's own metrics, in the handler's namespace: clusters are batched together, never split,
    # and no batch holds more than batch_size images' worth of clusters beyond the first.
    sizes = batches["inference_request_batch_size"]
    assert sizes.sum == 4 and sizes.max >= 2
    pixel_bytes = batches["inference_request_batch_byte_size"]
    assert pixel_bytes.sum == 18 * 3 * 224 * 224 * 4  # get_num_bytes counts pixels, it does not pickle
    assert pixel_bytes.max <= (8 + 5) * 3 * 224 * 224 * 4


def test_undecodable_images_are_dead_letters(product_photos: list[bytes]) -> None:
    page = "https://shop.example.com/p/broken"
    good = [image_record(photo, page, i) for i, photo in enumerate(product_photos[:4])]
    broken = good[0].replace(image_id="f" * 32, image=good[0].image[: len(good[0].image) // 3], record_id="cut")
    garbage = good[1].replace(image_id="e" * 32, image=b"<html>gone</html>", record_id="html")
    survives = make_cluster(page, [*good, broken])  # 4 good images left >= 3
    too_small = make_cluster("https://shop.example.com/p/small", [good[2], good[3], garbage])  # 2 left < 3
    with TestPipeline() as p:
        embedded, rejects = p | beam.Create([survives, too_small]) | Embed(TINY, min_images=3)
        assert_that(embedded | "Kept" >> beam.Map(lambda c: (c.page_url, len(c.images), c.stats.n_images)),
                    equal_to([(page, 4, 4)]), label="Kept")
        assert_that(rejects | "Reasons" >> beam.Map(lambda r: (r.id, r.reason, r.n_images, r.stage)),
                    equal_to([("cut", "embedding_decode_error", 1, "embed"),
                              ("html", "embedding_decode_error", 1, "embed"),
                              (make_cluster("https://shop.example.com/p/small", [good[2], good[3]]).cluster_id,
                               "cluster_too_small", 2, "embed")]), label="Rejects")
    assert beam_counters(p.result, "embed") == {"embedding_decode_error": 2, "cluster_too_small": 2,
                                           "clusters": 1, "images": 4, "num_inferences": 1}


@pytest.mark.slow
def test_failed_inference_batches_reach_the_dead_letter_output() -> None:
    # A tensor of the wrong shape makes the model raise: RunInference's dead-letter output holds the batch,
    # and the stage turns it into one embedding_failed reject per image. (Each element here outweighs
    # batch_size, so BatchElements also emits empty batches, which the handler must take without failing.)
    good = ImagePixels("good", tuple(torch.zeros(2, 3, 224, 224)))  # zeros: pixels Beam pickles quickly
    bad = ImagePixels("bad", (torch.zeros(1, 224, 224),))
    config = dataclasses.replace(TINY, batch_size=1)  # one element per batch: the good one survives
    with TestPipeline() as p:
        results, failed = p | beam.Create([good, bad]) | embed_inference(config).with_exception_handling()
        assert_that(results | "Ok" >> beam.Map(lambda r: (r.example.key, r.inference.shape)),
                    equal_to([("good", (2, 64))]), label="Results")
        dead = failed.failed_inferences | "Failed" >> beam.Map(lambda f: ([e.key for e in f[0]], f[1][0].__name__))
        assert_that(dead, equal_to([(["bad"], "RuntimeError")]), label="DeadLetters")


def test_inference_failures_become_one_reject_per_image(product_photos: list[bytes]) -> None:
    cluster = photo_cluster("https://shop.example.com/p/x", product_photos[:3])
    example = ImagePixels(cluster, tuple(torch.zeros(3, 3, 224, 224)))
    failure = ([example], (RuntimeError, "RuntimeError('CUDA OOM')", []))
    rejects = [tagged.value for tagged in inference_failure_rejects(failure)]
    assert [(r.reason, r.id, r.cluster_id) for r in rejects] == [
        ("embedding_failed", im.record_id, cluster.cluster_id) for im in cluster.images]
    assert "CUDA OOM" in rejects[0].detail


@pytest.mark.slow
def test_one_model_copy_shared_across_processes(clusters) -> None:
    # Beam's large_model path: the model lives in one server process and the handler calls it by proxy.
    config = dataclasses.replace(TINY, share_model_across_processes=True)
    expected = {c.cluster_id: _direct_embeddings(c) for c in clusters[:2]}
    with TestPipeline() as p:
        embedded, _ = p | beam.Create(clusters[:2]) | Embed(config, min_images=3)
        assert_that(embedded | beam.Map(_matches, expected), equal_to([True, True]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_matches_cpu(clusters) -> None:
    cluster = clusters[0]
    on_cpu = _direct_embeddings(cluster)
    gpu = load_image_encoder(dataclasses.replace(TINY, device="cuda", precision="auto"))
    assert gpu.device == "cuda" and gpu.autocast_dtype in (torch.bfloat16, torch.float16)
    transform = image_transform(TINY)
    on_gpu = gpu.embed(torch.stack([transform(decode_image(image.image)) for image in cluster.images]))
    assert on_gpu.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(on_gpu, axis=1), 1.0, atol=1e-5)
    assert (np.sum(on_cpu * on_gpu, axis=1) > 0.99).all()  # bf16 moves cosines by about 1e-3
