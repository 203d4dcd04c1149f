"""Stage *synthesize* (phase 2): render each cluster's prompts with a DreamBooth fine-tuned on its photos.

Per cluster, on a GPU worker: fine-tune the base model on the cluster's real images (LoRA by default),
render every prompt K times, write the renders as :class:`~schemas.records.Candidate` records. The work
is done by the :mod:`dreambooth_synth` library; this module is the Beam side of it:

* :class:`ReadClusters` -- ``clusters/*.parquet`` (phase 1's output) -> ``Cluster`` records.
* :class:`Synthesize` -- ``Reshuffle`` (one cluster is minutes of GPU work: spread them over workers),
  then :class:`SynthesizeFn`, one cluster per element (or ``synth.speed.clusters_per_batch`` of them,
  trained together in adapter slots of one UNet), with the GPU resource hint from
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
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.utils import shared

from dreambooth_synth.errors import SynthesisError
from schemas.ids import stable_id
from schemas.records import Candidate, Cluster, Prompt
from transforms.common import REJECTS, Reason, StageOutput, count, internal_error, reject
from transforms.models import diffusion
from transforms.outputs import candidates_from_parquet, candidates_to_parquet
from transforms.scene_templates import template_prompts
from transforms.settings import SynthConfig

LOG = logging.getLogger(__name__)

STAGE = "synthesize"

SYNTHESIS_FAILED = "synthesis_failed"
NO_USABLE_IMAGES = "no_usable_images"
NON_FINITE_LOSS = "non_finite_loss"
OUT_OF_MEMORY = "out_of_memory"
REASONS = tuple(Reason(code, whole_cluster=True)
                for code in (SYNTHESIS_FAILED, NO_USABLE_IMAGES, NON_FINITE_LOSS, OUT_OF_MEMORY))
"""Whole-cluster reject reasons of this stage (``dreambooth_synth`` errors carry the same codes)."""


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# Settings that change how a cluster's candidates are made run, not what they are (the whole ``speed``
# section too: it is not hashed at all).
_OPERATIONAL = {"model": ("device", "cpu_threads"), "train": ("log_every_steps",), "sample": ("batch_size",)}

RENDER_VERSION = 2
"""Bumped when the code renders different candidates from the same settings (2: LoRA weights drawn from a seeded
stream shared by every adapter path), so that the resume cache never mixes renders of two versions."""


def synthesis_hash(config: SynthConfig) -> str:
    """Hash of everything in ``synth`` that changes a cluster's candidates: the resume-cache key.

    Where and how fast the work runs (device, batch size, logging, the ``speed`` switches, cache location,
    resource hints) is left out, so a job resumed on other hardware or settings still reuses what is done.
    """
    data: dict[str, Any] = {"render_version": RENDER_VERSION}
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


# --- the synthesis step ----------------------------------------------------------------------------------


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
        self._last_report = 0.0

    def report(self, cluster_id: str, outcome: str, interval: float = 10.0) -> None:
        """Log progress: the first cluster, then at most every ``interval`` seconds, and the last one."""
        done = self.trained + self.cached + self.rejected
        now = time.monotonic()
        share = -(-self.total // self.workers) if self.total else 0  # this worker's expected share
        if done > 1 and now - self._last_report < interval and done != share:
            return
        self._last_report = now
        per_cluster = self.trained_seconds / self.trained if self.trained else 0.0
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
            LOG.info("synthesize: GPU %s", diffusion.check_gpu())
        self._worker = self._shared.acquire(self._load, tag=self._synth_hash)

    def _load(self) -> _Worker:
        synthesizer = diffusion.load_synthesizer(self._config, BeamStorage(),
                                                 FileSystems.join(self._cache_dir, "class_images"))
        return _Worker(synthesizer, self._total, self._workers)

    def teardown(self) -> None:
        diffusion.release_model()

    def process(self, element: Cluster | Sequence[Cluster]) -> Iterator[Any]:
        """One cluster, or a batch of them (``synth.speed.clusters_per_batch`` > 1: trained together)."""
        clusters = [element] if isinstance(element, Cluster) else list(element)
        todo: list[tuple[Cluster, tuple[Prompt, ...], str]] = []
        for cluster in clusters:
            try:
                pending = yield from self._cached(cluster)
                if pending is not None:
                    todo.append(pending)
            except Exception as error:  # noqa: BLE001 -- a bug on one cluster must not end the job
                yield from self._internal_error(error, cluster)
        if not todo:
            return
        try:
            with self._worker.lock:  # one batch at a time on this process's model
                outcomes = self._synthesize([(cluster, prompts) for cluster, prompts, _ in todo])
        except Exception as error:  # noqa: BLE001
            for cluster, _, _ in todo:
                yield from self._internal_error(error, cluster)
            return
        for (cluster, _, path), outcome in zip(todo, outcomes, strict=True):
            try:
                yield from self._emit(cluster, path, outcome)
            except Exception as error:  # noqa: BLE001
                yield from self._internal_error(error, cluster)

    def _internal_error(self, error: Exception, cluster: Cluster) -> Iterator[Any]:
        with self._worker.lock:
            self._worker.rejected += 1
        yield internal_error(STAGE, error, cluster=cluster)

    def _cached(self, cluster: Cluster) -> Generator[Any, None, tuple[Cluster, tuple[Prompt, ...], str] | None]:
        """Yields the cluster's candidates from the resume cache and returns ``None``; or returns what
        synthesizing it needs."""
        worker = self._worker
        prompts = cluster_prompts(cluster, self._config)
        if not cluster.prompts:
            count(STAGE, "clusters_fallback_prompts")
        path = cache_path(self._cache_dir, self._synth_hash, cluster, prompts)
        cached = None if self._config.overwrite else _read_cache(BeamStorage(), path)
        if cached is None:
            return cluster, prompts, path
        count(STAGE, "clusters_cached")
        count(STAGE, "candidates", len(cached))
        with worker.lock:
            worker.cached += 1
            worker.report(cluster.cluster_id, f"from the cache, {len(cached)} candidates")
        yield from cached
        return None

    def _emit(self, cluster: Cluster, path: str, outcome: Any) -> Iterator[Any]:
        worker = self._worker
        if isinstance(outcome, beam.pvalue.TaggedOutput):
            with worker.lock:
                worker.rejected += 1
                worker.report(cluster.cluster_id, f"rejected: {outcome.value.reason}")
            yield outcome
            return
        if outcome.skipped_images:
            count(STAGE, "images_undecodable", len(outcome.skipped_images))
        candidates = diffusion.make_candidates(cluster, outcome, worker.synthesizer, self._config, self._synth_hash)
        seconds = outcome.seconds["total"]
        with worker.lock:
            worker.trained += 1
            worker.trained_seconds += seconds
            worker.report(cluster.cluster_id, f"{len(candidates)} candidates in {seconds:.1f} s")
        try:
            BeamStorage().write_atomic(path, candidates_to_parquet(candidates))
        except Exception as error:  # noqa: BLE001 -- the candidates are good; only resuming is affected
            count(STAGE, "cache_write_failed")
            LOG.warning("synthesize: could not write the resume cache %s (%s: %s); the cluster's candidates "
                        "are written to candidates/ all the same", path, type(error).__name__, error)
        count(STAGE, "clusters_trained")
        count(STAGE, "candidates", len(candidates))
        yield from candidates

    def _synthesize(self, batch: Sequence[tuple[Cluster, Sequence[Prompt]]]) -> list[Any]:
        """Per cluster: its :class:`dreambooth_synth.SynthesisResult`, or its reject."""
        out = []
        for (cluster, _), result in zip(batch, diffusion.synthesize_many(self._worker.synthesizer, batch),
                                        strict=True):
            if isinstance(result, SynthesisError):
                seconds = result.seconds or {}
                out.append(reject(STAGE, result.reason, f"{result} (after {seconds.get('total', 0.0):.1f} s)",
                                  cluster=cluster))
                continue
            out.append(result)
        return out


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
        spread = clusters | "SpreadClusters" >> beam.Reshuffle()
        per_batch = self._config.speed.clusters_per_batch
        if per_batch > 1:
            # Several clusters' adapters train in one UNet batch: hand the DoFn that many at a time.
            spread = spread | "BatchClusters" >> beam.BatchElements(min_batch_size=per_batch,
                                                                    max_batch_size=per_batch)
        result = spread | "SynthesizeClusters" >> step
        return StageOutput(result.candidates, result[REJECTS])
