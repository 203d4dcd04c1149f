"""What the three model stages (caption, subject, prompts) share.

Each of them is ``RunInference`` over whole clusters with a stage-specific :class:`ClusterModelHandler`,
followed by a cheap step that applies the stage's failure policy (score first, decide second):

* the handler's ``run_inference`` never raises for a cluster the model failed on: it returns a
  :class:`Outcome` with the ``error`` (after the client's retries and validation retries), so the
  decision is a plain, tested DoFn (:class:`ResolveFn`);
* the policy (``on_failure``): ``reject`` drops the whole cluster with the stage's reason code, ``fallback``
  uses the stage's offline backend and records the stage in ``provenance.fallbacks``;
* a batch whose processing raised anyway (a bug) leaves ``RunInference.with_exception_handling()`` as
  failed inferences; :class:`FailedBatchFn` turns each of its clusters into an ``internal_error``.

A handler with the ``vllm`` backend loads a :class:`~transforms.models.llm_client.ChatClient` (``load_model``,
:func:`connect`); RunInference shares it between the threads of a worker process, so ``llm.max_concurrency``
bounds the requests in flight per process.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.utils.multi_process_shared import MultiProcessShared

from schemas.records import Cluster, ClusterProvenance
from transforms.common import INTERNAL_ERROR, REJECTS, StageOutput, count, internal_error, reject
from transforms.models.llm_client import ChatClient, report_events
from transforms.models.vllm_server import server_tag, start_server
from transforms.prompt_files import PromptText, load_prompt
from transforms.settings import LLMConfig, ModelStageConfig

LOG = logging.getLogger(__name__)


def connect(model: str, endpoint: str, config: LLMConfig) -> ChatClient:
    """The client a stage uses for ``model``: at ``endpoint`` (or ``llm.endpoint``), else at a server that
    this worker machine starts once per model and shares across its processes and stages (Beam's
    ``MultiProcessShared``). The client holds that server (``client.server``): it lives as long as the model
    ``RunInference`` loaded, and stops when it is released (:mod:`transforms.models.vllm_server`)."""
    base_url = config.base_url_for(endpoint)
    if base_url:
        return ChatClient.from_config(base_url, config)
    args = dict(config.server_args.get(model, {}))
    server = MultiProcessShared(lambda: start_server(model, args, config.server_startup_timeout_s),
                                tag=server_tag(model), always_proxy=True).acquire()
    client = ChatClient.from_config(server.base_url(), config)
    client.server = server
    return client


@dataclass(frozen=True)
class Outcome:
    """What a model stage produced for one cluster: its ``value``, or why it failed (``error``)."""

    value: Any = None
    error: str | None = None


OFFLINE_BATCH_SIZE = 64
"""Clusters per batch for the offline backends (no server to keep busy; just amortizes the step)."""


class ClusterModelHandler(ModelHandler[Cluster, PredictionResult, ChatClient | None]):
    """RunInference over clusters, one :class:`Outcome` per cluster. Subclasses implement :meth:`offline` (the
    offline backend's value) and :meth:`ask` (the model's value for one cluster, asked concurrently), or
    :meth:`infer_with_model` for another unit of work than the cluster.

    ``load_model`` connects to the model (:func:`connect`) for the ``vllm``
    backend and loads nothing for the offline ones. The stage's instruction file is read here, on the
    launcher, so that a missing file fails before the job starts and its hash is known to provenance.
    """

    stage = "model"

    def __init__(self, config: ModelStageConfig, llm: LLMConfig) -> None:
        uses_model = config.backend == "vllm"
        batch_size = config.batch_size if uses_model else OFFLINE_BATCH_SIZE
        # A fixed batch size: BatchElements would otherwise start at one cluster and grow slowly, and a
        # batch of one cluster leaves most of the client's concurrency idle while a server answers.
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._config = config
        self._llm = llm
        self._prompt: PromptText | None = load_prompt(config.prompt) if uses_model else None

    @property
    def prompt_tag(self) -> str | None:
        """``name@hash`` of the instruction file sent to the model (``None`` for offline backends)."""
        return self._prompt.tag if self._prompt else None

    @property
    def uses_model(self) -> bool:
        return self._config.backend == "vllm"

    @property
    def starts_server(self) -> bool:
        return self.uses_model and not self._llm.base_url_for(self._config.endpoint)

    def load_model(self) -> ChatClient | None:
        if not self.uses_model:
            return None
        return connect(self._config.model, self._config.endpoint, self._llm)

    def offline(self, cluster: Cluster) -> Any:
        """The offline backend's value for one cluster."""
        raise NotImplementedError

    def ask(self, client: ChatClient, cluster: Cluster) -> Any:
        """The model's value for one cluster; raises when the model fails (after the client's retries)."""
        raise NotImplementedError

    def infer(self, clusters: Sequence[Cluster], client: ChatClient | None) -> list[Outcome]:
        if client is None:
            return [Outcome(self.offline(cluster)) for cluster in clusters]
        return self.infer_with_model(clusters, client)

    def infer_with_model(self, clusters: Sequence[Cluster], client: ChatClient) -> list[Outcome]:
        """One :meth:`ask` per cluster, all in flight at once (up to the client's concurrency)."""
        results = client.map_settled(lambda cluster: self.ask(client, cluster), clusters)
        return [Outcome(error=error_text(r)) if isinstance(r, BaseException) else Outcome(r) for r in results]

    def run_inference(self, batch: Sequence[Cluster], model: ChatClient | None,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        outcomes = self.infer(list(batch), model)
        if model is not None:
            report_events(model, self.stage)
        for outcome in outcomes:
            count(self.stage, "failed_clusters" if outcome.error else "clusters")
        model_id = self._config.model if self.uses_model else self._config.backend
        return [PredictionResult(cluster, outcome, model_id) for cluster, outcome in zip(batch, outcomes, strict=True)]

    def get_metrics_namespace(self) -> str:
        return self.stage

    def get_resource_hints(self) -> dict[str, Any]:
        # A GPU only where this stage runs its own vLLM server; an endpoint elsewhere needs none.
        return {"accelerator": self._llm.accelerator} if self.starts_server and self._llm.accelerator else {}

    def get_num_bytes(self, batch: Sequence[Cluster]) -> int:
        return sum(len(im.image) for cluster in batch for im in cluster.images)


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class ResolveFn(beam.DoFn):
    """``PredictionResult(cluster, Outcome)`` -> the updated cluster, a fallback, or a whole-cluster reject.

    Subclasses implement :meth:`with_value` (a value into the cluster) and :meth:`offline` (the offline
    backend's value, named :attr:`offline_backend`); this class applies ``on_failure`` and records the backend,
    model and instruction file in the cluster's ``provenance.<stage>_*`` fields.
    """

    offline_backend = "offline"

    def __init__(self, stage: str, reason: str, config: ModelStageConfig, prompt_tag: str | None) -> None:
        self._stage = stage
        self._reason = reason
        self._config = config
        self._prompt_tag = prompt_tag

    def offline(self, cluster: Cluster) -> Any:
        raise NotImplementedError

    def offline_prompt_tag(self) -> str | None:
        """What the offline backend records as its instruction (none by default)."""
        return None

    def with_value(self, cluster: Cluster, value: Any, provenance: ClusterProvenance) -> Cluster:
        raise NotImplementedError

    def provenance(self, cluster: Cluster, backend: str, fallback: bool) -> ClusterProvenance:
        vllm = backend == "vllm"
        return dataclasses.replace(cluster.provenance, **{
            f"{self._stage}_backend": backend,
            f"{self._stage}_model": self._config.model if vllm else None,
            f"{self._stage}_prompt": self._prompt_tag if vllm else self.offline_prompt_tag(),
            "fallbacks": (*cluster.provenance.fallbacks, self._stage) if fallback else cluster.provenance.fallbacks,
        })

    def apply(self, cluster: Cluster, value: Any) -> Cluster:
        return self.with_value(cluster, value, self.provenance(cluster, self._config.backend, fallback=False))

    def fallback(self, cluster: Cluster) -> Cluster:
        return self.with_value(cluster, self.offline(cluster),
                               self.provenance(cluster, self.offline_backend, fallback=True))

    def process(self, result: PredictionResult) -> Iterator[Any]:
        cluster, outcome = result.example, result.inference
        try:
            if outcome.error is None:
                yield self.apply(cluster, outcome.value)
            elif self._config.on_failure == "reject":
                count(self._stage, f"{self._reason}_clusters")
                yield reject(self._stage, self._reason, outcome.error, cluster=cluster)
            else:
                count(self._stage, "fallback_clusters")
                yield self.fallback(cluster)
        except Exception as error:  # noqa: BLE001 -- a bug must not lose the cluster's records
            yield internal_error(self._stage, error, cluster=cluster)


class FailedBatchFn(beam.DoFn):
    """A batch RunInference gave up on (``(clusters, (type, repr, traceback))``) -> ``internal_error`` per cluster."""

    def __init__(self, stage: str) -> None:
        self._stage = stage

    def process(self, element: tuple[Sequence[Cluster], tuple[type, str, list[str]]]) -> Iterator[Any]:
        batch, (_kind, text, trace) = element
        LOG.warning("%s: a batch of %d clusters raised; sent to rejects as %s:\n%s", self._stage, len(batch),
                    INTERNAL_ERROR, "".join(trace[-6:]))
        for cluster in batch:
            yield reject(self._stage, INTERNAL_ERROR, text, cluster=cluster).value


class ModelStage(beam.PTransform):
    """``Cluster``s -> ``RunInference(handler)`` -> ``resolve`` -> ``StageOutput(clusters, rejects)``."""

    def __init__(self, stage: str, handler: ClusterModelHandler, resolve: ResolveFn) -> None:
        super().__init__()
        self._stage = stage
        self._handler = handler
        self._resolve = resolve

    def expand(self, clusters: beam.PCollection) -> StageOutput:
        inference = RunInference(self._handler, metrics_namespace=self._stage).with_exception_handling()
        results, failed = clusters | "Infer" >> inference
        resolved = results | "ApplyPolicy" >> beam.ParDo(self._resolve).with_outputs(REJECTS, main="clusters")
        crashed = failed.failed_inferences | "FailedBatches" >> beam.ParDo(FailedBatchFn(self._stage))
        rejects = (resolved[REJECTS], crashed) | "StageRejects" >> beam.Flatten()
        return StageOutput(resolved.clusters, rejects)
