"""Stage *synthesize* (phase 2): render each cluster's prompts with a DreamBooth fine-tuned on its photos.

Per cluster, on a GPU worker: fine-tune the base model on the cluster's real images (LoRA by default),
render every prompt K times, write the renders as :class:`~schemas.records.Candidate` records. The work
is done by the :mod:`dreambooth_synth` library; this module is the Beam side of it:

* :class:`ReadClusters` -- ``clusters/*.parquet`` (phase 1's output) -> ``Cluster`` records.
* :class:`Synthesize` -- ``Reshuffle`` (one cluster is minutes of GPU work: spread them over workers),
  then :class:`SynthesizeFn`, one cluster per element, with the GPU resource hint from
  ``synth.accelerator`` on that step only. The model is loaded once per worker process in ``setup()``
  (shared by the process's DoFn instances through ``apache_beam.utils.shared``; clusters take turns on it).
* **Resume**: each finished cluster's candidates are also written, atomically, to
  ``<cache_dir>/<synthesis config hash>/<cluster id>-<inputs hash>.parquet``. A rerun with the same
  settings reads them back instead of training (after a crash or preemption, nothing finished is redone);
  ``synth.overwrite=true`` redoes them.
* **Failure isolation**: a cluster that fails -- undecodable photos, a diverged loss, out of memory, any
  exception -- becomes one reject row (``synthesis_failed``, ``no_usable_images``, ``non_finite_loss``,
  ``out_of_memory``) and the worker goes on with the base model restored and memory released.
* **Prompts**: the cluster's own (from the prompts stage); a cluster without prompts gets
  :func:`fallback_prompts`, and an empty class noun becomes "object".
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.utils import shared

from dreambooth_synth.errors import SynthesisError
from dreambooth_synth.prompts import DEFAULT_CLASS_NOUN, class_noun_or_default
from dreambooth_synth.synthesizer import PARTS
from schemas.ids import stable_id
from schemas.parquet import (
    CANDIDATES_SCHEMA,
    candidate_from_row,
    candidate_to_row,
    check_schema_version,
    cluster_from_row,
)
from schemas.records import Candidate, Cluster, Prompt, SampleSettings, SynthSeconds, TrainSettings
from transforms.common import REJECTS, StageOutput, count, internal_error, reject
from transforms.scene_templates import template_prompts
from transforms.settings import SynthConfig

LOG = logging.getLogger(__name__)

STAGE = "synthesize"

SYNTHESIS_FAILED = "synthesis_failed"
NO_USABLE_IMAGES = "no_usable_images"
NON_FINITE_LOSS = "non_finite_loss"
OUT_OF_MEMORY = "out_of_memory"
REASONS = (SYNTHESIS_FAILED, NO_USABLE_IMAGES, NON_FINITE_LOSS, OUT_OF_MEMORY)
"""Whole-cluster reject reasons of this stage (``dreambooth_synth`` errors carry the same codes)."""


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# Settings that change how a cluster's candidates are made run, not what they are.
_OPERATIONAL = {"model": ("device", "cpu_threads"), "train": ("log_every_steps",), "sample": ("batch_size",)}


def synthesis_hash(config: SynthConfig) -> str:
    """Hash of everything in ``synth`` that changes a cluster's candidates: the resume-cache key.

    Where the work runs (device, batch size, logging, cache location, resource hints) is left out, so a
    job resumed on other hardware still reuses what is done.
    """
    data = {}
    for section, skip in _OPERATIONAL.items():
        data[section] = {k: v for k, v in _plain(getattr(config, section)).items() if k not in skip}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# --- prompts ---------------------------------------------------------------------------------------------


def fallback_prompts(cluster: Cluster, config: SynthConfig) -> tuple[Prompt, ...]:
    """Prompts for a cluster that has none: ``synth.fallback_prompts`` of the prompts stage's template grammar.

    Objects and live subjects get the skills they can have; an empty class noun is fine (the templates only
    hold ``{subject}``, which becomes "sks object" for such a cluster).
    """
    return template_prompts(cluster.cluster_id, cluster.class_noun, bool(cluster.is_live), config.fallback_prompts)


def cluster_prompts(cluster: Cluster, config: SynthConfig) -> tuple[Prompt, ...]:
    """The prompts to render for ``cluster``: its own, or the fallback; at most ``max_prompts``."""
    prompts = tuple(p for p in cluster.prompts if p.prompt.strip()) or fallback_prompts(cluster, config)
    return prompts[:config.max_prompts] if config.max_prompts else prompts


# --- resume cache ------------------------------------------------------------------------------------------


class BeamStorage:
    """``dreambooth_synth.storage.SharedStorage`` on Beam ``FileSystems`` (local, ``gs://``, ``s3://``)."""

    def join(self, base: str, *parts: str) -> str:
        return FileSystems.join(base, *parts)

    def exists(self, path: str) -> bool:
        return FileSystems.exists(path)

    def read(self, path: str) -> bytes:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return handle.read()

    def write_atomic(self, path: str, data: bytes) -> None:
        # Write a uniquely named temporary object, then rename it into place: a local rename is atomic
        # and an object store's copy appears whole, so a reader (a resumed job) never sees half a file.
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with FileSystems.create(temporary, mime_type="application/octet-stream",
                                compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(data)
        try:
            FileSystems.rename([temporary], [path])
        except Exception:
            FileSystems.delete([temporary])
            raise


def default_cache_dir(output_dir: str) -> str:
    return FileSystems.join(output_dir, "cache", STAGE)


def inputs_hash(cluster: Cluster, prompts: Sequence[Prompt]) -> str:
    """Hash of what a cluster contributes to its candidates besides its id (images are in the id; the
    subject, class noun and prompts come from phase-1 stages that can change between runs)."""
    return stable_id("synthesize-inputs", cluster.page_url, cluster.subject, cluster.class_noun,
                     *(f"{p.skill}\x1f{p.prompt}" for p in prompts))[:16]


def cache_path(cache_dir: str, synth_hash: str, cluster: Cluster, prompts: Sequence[Prompt]) -> str:
    return FileSystems.join(cache_dir, synth_hash, f"{cluster.cluster_id}-{inputs_hash(cluster, prompts)}.parquet")


def candidates_to_parquet(candidates: Sequence[Candidate]) -> bytes:
    table = pa.Table.from_pylist([candidate_to_row(c) for c in candidates], schema=CANDIDATES_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="none")  # PNG renders: compressing again gains nothing
    return buffer.getvalue()


def candidates_from_parquet(data: bytes, path: str = "") -> list[Candidate]:
    table = pq.read_table(io.BytesIO(data))
    check_schema_version(table.schema, "candidates", path)
    return [candidate_from_row(row) for row in table.to_pylist()]


# --- reading clusters -----------------------------------------------------------------------------------


class ReadClusterFileFn(beam.DoFn):
    """A ``clusters/*.parquet`` path -> ``Cluster`` records, a few rows (row-group batches) at a time; counters
    and dead letters under ``stage``."""

    def __init__(self, batch_rows: int = 8, stage: str = STAGE) -> None:
        self._batch_rows = batch_rows
        self._stage = stage

    def process(self, path: str) -> Iterator[Any]:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            parquet = pq.ParquetFile(handle)
            check_schema_version(parquet.schema_arrow, "clusters", path)
            for batch in parquet.iter_batches(batch_size=self._batch_rows):
                for i, row in enumerate(batch.to_pylist()):
                    count(self._stage, "clusters_read")
                    try:
                        yield cluster_from_row(row)
                    except Exception as error:  # noqa: BLE001 -- one bad row must not lose the file
                        cid = row.get("cluster_id") or stable_id("unreadable-cluster", path, i)
                        yield internal_error(self._stage, error, id=cid, cluster_id=cid, page_url=row.get("page_url"),
                                             n_images=len(row.get("images") or ()), source=path)


class ReadClusters(beam.PTransform):
    """``PBegin`` -> ``Cluster``s from checked ``clusters/*.parquet`` paths."""

    def __init__(self, files: Sequence[str], stage: str = STAGE) -> None:
        super().__init__()
        self._files = list(files)
        self._stage = stage

    def expand(self, pbegin: beam.pvalue.PBegin) -> StageOutput:
        read = (
            pbegin
            | "ListClusterFiles" >> beam.Create(self._files)
            | "ReadClusterFiles" >> beam.ParDo(ReadClusterFileFn(stage=self._stage)).with_outputs(
                REJECTS, main="clusters")
        )
        return StageOutput(read.clusters, read[REJECTS])


# --- the synthesis step ----------------------------------------------------------------------------------


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


class _Worker:
    """What one worker process holds: the loaded synthesizer, the lock clusters take turns with, progress."""

    def __init__(self, synthesizer: Any, total: int, workers: int) -> None:
        self.synthesizer = synthesizer
        self.lock = threading.Lock()
        self.total = total
        self.workers = max(1, workers)
        self.trained = self.cached = self.rejected = 0
        self.trained_seconds = 0.0
        self.started = time.monotonic()

    def report(self, cluster_id: str, outcome: str) -> None:
        done = self.trained + self.cached + self.rejected
        per_cluster = self.trained_seconds / self.trained if self.trained else 0.0
        share = -(-self.total // self.workers) if self.total else 0  # this worker's expected share
        left = max(share - done, 0)
        eta = f", about {_duration(left * per_cluster)} left" if per_cluster and share else ""
        of = f"/{share}" if share else ""
        scope = "" if self.workers == 1 else f" on this worker (of {self.total} in the job)"
        LOG.info("synthesize: %d%s clusters done%s -- %d trained, %d from the cache, %d rejected; %.1f s per "
                 "trained cluster%s [%s: %s]", done, of, scope, self.trained, self.cached, self.rejected,
                 per_cluster, eta, cluster_id, outcome)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _quiet_library_progress_bars() -> None:
    # diffusers and transformers draw tqdm bars while loading; on workers they only fill the logs.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _read_cache(storage: BeamStorage, path: str) -> list[Candidate] | None:
    """A finished cluster's candidates from the resume cache, or ``None`` to synthesize it (again)."""
    if not storage.exists(path):
        return None
    try:
        return candidates_from_parquet(storage.read(path), path)
    except Exception as error:  # noqa: BLE001 -- an unreadable entry (older schema, ...) is only a cache miss
        count(STAGE, "cache_unreadable")
        LOG.warning("synthesize: resume cache %s is unreadable (%s: %s); synthesizing the cluster again",
                    path, type(error).__name__, error)
        return None


class SynthesizeFn(beam.DoFn):
    """``Cluster`` -> its ``Candidate``s (main) or one whole-cluster reject (``rejects``).

    Args:
        config: the ``synth`` section.
        cache_dir: resolved resume-cache directory.
        total: clusters in the job (for the progress line; 0 when unknown).
        workers: worker processes expected to share them (for the time-left estimate).
    """

    def __init__(self, config: SynthConfig, cache_dir: str, total: int = 0, workers: int = 1) -> None:
        self._config = config
        self._cache_dir = cache_dir
        self._total = total
        self._workers = workers
        self._synth_hash = synthesis_hash(config)
        self._shared = shared.Shared()  # pickled with its key: every copy in a process shares one model

    def setup(self) -> None:
        if self._config.needs_gpu:
            LOG.info("synthesize: GPU %s", check_gpu())
        self._worker = self._shared.acquire(self._load, tag=self._synth_hash)

    def _load(self) -> _Worker:
        from dreambooth_synth import Synthesizer, load_model

        _quiet_library_progress_bars()
        model = load_model(self._config.model)
        synthesizer = Synthesizer(model, self._config.train, self._config.sample, storage=BeamStorage(),
                                  class_image_dir=FileSystems.join(self._cache_dir, "class_images"))
        # The libraries and the model are ~0.5 M long-lived objects that every cluster's gc.collect()
        # would scan again (a quarter of a second each time); move them out of the collector's sight.
        gc.collect()
        gc.freeze()
        return _Worker(synthesizer, self._total, self._workers)

    def teardown(self) -> None:
        gc.unfreeze()  # what setup froze can be collected again once this process lets the model go

    def process(self, cluster: Cluster) -> Iterator[Any]:
        try:
            yield from self._process(cluster)
        except Exception as error:  # noqa: BLE001 -- a bug on one cluster must not end the job
            with self._worker.lock:
                self._worker.rejected += 1
            yield internal_error(STAGE, error, cluster=cluster)

    def _process(self, cluster: Cluster) -> Iterator[Any]:
        worker = self._worker
        prompts = cluster_prompts(cluster, self._config)
        if not cluster.prompts:
            count(STAGE, "clusters_fallback_prompts")
        path = cache_path(self._cache_dir, self._synth_hash, cluster, prompts)
        storage = BeamStorage()
        cached = None if self._config.overwrite else _read_cache(storage, path)
        if cached is not None:
            candidates = cached
            count(STAGE, "clusters_cached")
            count(STAGE, "candidates", len(candidates))
            with worker.lock:
                worker.cached += 1
                worker.report(cluster.cluster_id, f"from the cache, {len(candidates)} candidates")
            yield from candidates
            return
        with worker.lock:  # one cluster at a time on this process's model
            outcome = self._synthesize(cluster, prompts)
            if isinstance(outcome, beam.pvalue.TaggedOutput):
                worker.rejected += 1
                worker.report(cluster.cluster_id, f"rejected: {outcome.value.reason}")
            else:
                worker.trained += 1
                worker.trained_seconds += outcome[1]
                worker.report(cluster.cluster_id, f"{len(outcome[0])} candidates in {outcome[1]:.1f} s")
        if isinstance(outcome, beam.pvalue.TaggedOutput):
            yield outcome
            return
        candidates = outcome[0]
        try:
            storage.write_atomic(path, candidates_to_parquet(candidates))
        except Exception as error:  # noqa: BLE001 -- the candidates are good; only resuming is affected
            count(STAGE, "cache_write_failed")
            LOG.warning("synthesize: could not write the resume cache %s (%s: %s); the cluster's candidates "
                        "are written to candidates/ all the same", path, type(error).__name__, error)
        count(STAGE, "clusters_trained")
        count(STAGE, "candidates", len(candidates))
        yield from candidates

    def _synthesize(self, cluster: Cluster, prompts: Sequence[Prompt]) -> Any:
        from dreambooth_synth import Subject

        subject = Subject(key=cluster.cluster_id, class_noun=cluster.class_noun,
                          images=tuple(image.image for image in cluster.images),
                          prompts=tuple((p.prompt, p.skill) for p in prompts))
        try:
            result = self._worker.synthesizer.synthesize(subject)
        except SynthesisError as error:
            seconds = error.seconds or {}
            return reject(STAGE, error.reason, f"{error} (after {seconds.get('total', 0.0):.1f} s)", cluster=cluster)
        if result.skipped_images:
            count(STAGE, "images_undecodable", len(result.skipped_images))
        return make_candidates(cluster, result, self._worker.synthesizer, self._config, self._synth_hash), \
            result.seconds["total"]


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


class Synthesize(beam.PTransform):
    """``Cluster``s -> ``Candidate``s, one fine-tune per cluster, with resume and failure isolation."""

    def __init__(self, config: SynthConfig, cache_dir: str, total: int = 0, workers: int = 1) -> None:
        super().__init__()
        self._config = config
        self._cache_dir = cache_dir
        self._total = total
        self._workers = workers

    def expand(self, clusters: beam.PCollection) -> StageOutput:
        step = beam.ParDo(SynthesizeFn(self._config, self._cache_dir, self._total, self._workers)).with_outputs(
            REJECTS, main="candidates")
        if self._config.accelerator.strip():
            step = step.with_resource_hints(accelerator=self._config.accelerator.strip())
        result = (
            clusters
            | "SpreadClusters" >> beam.Reshuffle()
            | "SynthesizeClusters" >> step
        )
        return StageOutput(result.candidates, result[REJECTS])


__all__ = [
    "DEFAULT_CLASS_NOUN",
    "PARTS",
    "REASONS",
    "BeamStorage",
    "ReadClusters",
    "Synthesize",
    "SynthConfig",
    "cluster_prompts",
    "class_noun_or_default",
    "fallback_prompts",
    "synthesis_hash",
]
