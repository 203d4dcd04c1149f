"""The diffusers boundary of phase 2: the base model and the ``dreambooth_synth`` synthesizer around it.

:func:`load_synthesizer` loads the configured base model (diffusers ``from_pretrained``, or a tiny preset) once,
on the worker, and wraps it in a :class:`dreambooth_synth.Synthesizer` whose class-image cache lives on the
storage the caller gives (the synthesis stage passes one on Beam ``FileSystems``); :func:`synthesize` hands it
one cluster, and :func:`make_candidates` turns what the library rendered into our ``Candidate`` records.
``dreambooth_synth`` knows nothing of Beam or of our records; the stage knows nothing of diffusers.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

from schemas.ids import stable_id
from schemas.records import Candidate, Cluster, Prompt, SampleSettings, SynthSeconds, TrainSettings
from transforms.settings import SynthConfig


def check_gpu() -> str:
    """The visible CUDA device's name; raises ``RuntimeError`` when there is none (fail fast)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            "synthesis needs a GPU on this worker (synth.accelerator or synth.require_gpu is set) but torch "
            f"{torch.__version__} sees no CUDA device. Check the accelerator resource hint (type, count, "
            "install-nvidia-driver), that the worker image is the project's CUDA image (Dockerfile), and "
            "nvidia-smi on the worker.")
    return torch.cuda.get_device_name(0)


def _quiet_library_progress_bars() -> None:
    # diffusers and transformers draw tqdm bars while loading; on workers they only fill the logs.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_synthesizer(config: SynthConfig, storage: Any, class_image_dir: str) -> Any:
    """The base model of ``config.model``, loaded, in a :class:`dreambooth_synth.Synthesizer` with ``config``'s
    training and sampling settings; class images of prior preservation are cached under ``class_image_dir`` on
    ``storage`` (a ``dreambooth_synth.storage.SharedStorage``).

    The libraries and the model are then frozen out of the garbage collector's sight (:func:`release_model`
    undoes it).
    """
    from dreambooth_synth import Synthesizer, load_model

    _quiet_library_progress_bars()
    model = load_model(config.model)
    synthesizer = Synthesizer(model, config.train, config.sample, speed=config.speed, storage=storage,
                              class_image_dir=class_image_dir)
    # The libraries and the model are ~0.5 M long-lived objects that every cluster's gc.collect()
    # would scan again (a quarter of a second each time); move them out of the collector's sight.
    gc.collect()
    gc.freeze()
    return synthesizer


def release_model() -> None:
    """Let the collector see again what :func:`load_synthesizer` froze (once this process lets the model go)."""
    gc.unfreeze()


def synthesize_many(synthesizer: Any, batch: Sequence[tuple[Cluster, Sequence[Prompt]]]) -> list[Any]:
    """Fine-tune on each cluster's photos and render its prompts (several clusters in one UNet batch when the
    synthesizer's ``speed.clusters_per_batch`` allows): per cluster a ``dreambooth_synth.SynthesisResult``, or
    the ``dreambooth_synth.errors.SynthesisError`` (with its reject reason) that cluster failed with."""
    from dreambooth_synth import Subject

    subjects = [Subject(key=cluster.cluster_id, class_noun=cluster.class_noun,
                        images=tuple(image.image for image in cluster.images),
                        prompts=tuple((p.prompt, p.skill) for p in prompts)) for cluster, prompts in batch]
    return synthesizer.synthesize_many(subjects)


def make_candidates(cluster: Cluster, result: Any, synthesizer: Any, config: SynthConfig,
                    synth_hash: str) -> list[Candidate]:
    """Candidate records of a :class:`dreambooth_synth.SynthesisResult`."""
    from dreambooth_synth.prompts import training_seed

    train_config, sample_config = config.train, config.sample
    model = synthesizer.model
    train = TrainSettings(
        model=config.model.name, mode=train_config.mode, steps=result.train.steps,
        learning_rate=result.train.learning_rate,
        lora_rank=train_config.lora_rank if train_config.mode == "lora" else None,
        train_text_encoder=train_config.train_text_encoder, batch_size=train_config.batch_size,
        resolution=synthesizer.resolution, prior_preservation=train_config.prior_preservation,
        prior_loss_weight=train_config.prior_loss_weight if train_config.prior_preservation else None,
        precision=str(model.weight_dtype).replace("torch.", ""),
        seed=training_seed(train_config.seed, cluster.cluster_id), instance_prompt=result.instance_prompt)
    sample = SampleSettings(scheduler=sample_config.scheduler, steps=sample_config.steps,
                            guidance_scale=sample_config.guidance_scale,
                            negative_prompt=sample_config.negative_prompt,
                            images_per_prompt=sample_config.images_per_prompt)
    seconds = SynthSeconds(**{k: float(result.seconds[k]) for k in
                              ("load", "latents", "prior", "train", "sample", "cleanup", "total")})
    final_loss = result.train.final_loss
    return [
        Candidate(
            candidate_id=stable_id("candidate", cluster.cluster_id, render.template, render.skill, render.k,
                                   render.seed, synth_hash),
            cluster_id=cluster.cluster_id, page_url=cluster.page_url, prompt=render.prompt,
            prompt_template=render.template, skill=render.skill, subject=cluster.subject,
            class_noun=result.class_noun, identifier=train_config.identifier.strip(), k=render.k,
            seed=render.seed, image=render.image, width=render.width, height=render.height, nsfw=render.nsfw,
            train=train, sample=sample, final_loss=final_loss, n_train_images=result.n_images, seconds=seconds,
            synth_config_hash=synth_hash)
        for render in result.renders
    ]
