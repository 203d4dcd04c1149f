"""Pieces every stage shares: dead-letter output, reason counters, progress logging.

Conventions (see ARCHITECTURE.md):

* a stage is a composite ``PTransform`` returning a :class:`StageOutput` (its main output, its dead letters,
  and any side products the phase writes), and declares the reasons it rejects for in ``REASONS``
  (:class:`Reason`);
* a DoFn that can fail on a record yields :func:`reject` for it on the :data:`REJECTS` tag, which
  also counts the reason with a Beam counter in the stage's namespace;
* nothing is dropped silently: an unexpected exception on one record becomes an ``internal_error``
  dead letter instead of a crashed job (see :func:`internal_error`).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas.records import Cluster, ImageRecord, InputRecord, Reject
from transforms.settings import option  # noqa: F401 -- where stages not yet in settings.py make their fields

LOG = logging.getLogger(__name__)

REJECTS = "rejects"
"""Tag of every stage's dead-letter output."""

INTERNAL_ERROR = "internal_error"
"""Reason code of a record whose processing raised an exception no stage anticipated (a bug)."""


class _StageOutputs(NamedTuple):
    output: beam.PCollection
    rejects: beam.PCollection


class StageOutput(_StageOutputs):
    """What a stage returns: its main output and its dead letters (``Reject`` records) -- ``kept, rejects =
    stage_output`` -- and, in ``extra``, named side products that the phase builder hands to the writers of
    :mod:`transforms.outputs` (``"stats"``: dicts for ``OUT/stats/``, ``"scores"``: the target filter's decisions),
    so that no stage writes files of its own.
    """

    extra: Mapping[str, beam.PCollection]

    def __new__(cls, output: beam.PCollection, rejects: beam.PCollection,
                extra: Mapping[str, beam.PCollection] | None = None) -> StageOutput:
        self = super().__new__(cls, output, rejects)
        self.extra = dict(extra or {})
        # Beam knows a composite's outputs from what expand() returns, which unpacks as the two above; the extras
        # are declared to the composite being expanded, so that the job graph shows them leaving it.
        for name, pcoll in self.extra.items():
            current = pcoll.pipeline._current_transform()
            if current.transform is not None and name not in current.outputs:
                current.add_output(pcoll, name)
        return self


class Reason(NamedTuple):
    """A reject reason a stage declares (its module's ``REASONS``; each is documented in docs/reasons.md)."""

    code: str
    whole_cluster: bool = False
    """Its reject row stands for a whole cluster (one row, ``n_images`` images), not for one record or candidate."""


class InputFormatError(ValueError):
    """An input file is not in the format its extension promises, or lacks required fields."""


def count(stage: str, name: str, n: int = 1) -> None:
    """Increment the Beam counter ``stage/name`` (what the Dataflow UI and the manifest show)."""
    if n:
        Metrics.counter(stage, name).inc(n)


def reject(stage: str, reason: str, detail: str, *, record: InputRecord | ImageRecord | None = None,
           cluster: Cluster | None = None, id: str | None = None, page_url: str | None = None,
           image_url: str | None = None, n_images: int | None = None, source: str | None = None,
           cluster_id: str | None = None, members: Iterable[ImageRecord] | None = None) -> beam.pvalue.TaggedOutput:
    """A dead letter on the :data:`REJECTS` tag, counted under ``stage/reason`` (in images).

    Pass the ``record`` (one input record or image) or the ``cluster`` (a whole-cluster drop) to
    take the ids and URLs from it; explicit keyword arguments win. A whole-cluster row lists its ``members``
    (the cluster's images by default) by image id and record id.
    """
    if record is not None:
        id = id or record.record_id
        page_url = page_url or record.page_url
        image_url = image_url or record.image_url
        source = source or record.source
    if cluster is not None:
        id = id or cluster.cluster_id
        cluster_id = cluster_id or cluster.cluster_id
        page_url = page_url or cluster.page_url
        n_images = len(cluster.images) if n_images is None else n_images
        members = cluster.images if members is None else members
    members = tuple(members or ())
    if id is None:
        raise ValueError("a reject needs an id, a record or a cluster")
    n = 1 if n_images is None else n_images
    count(stage, reason, n)
    return beam.pvalue.TaggedOutput(REJECTS, Reject(
        id=id, stage=stage, reason=reason, detail=detail[:2000], page_url=page_url, image_url=image_url,
        n_images=n, source=source, cluster_id=cluster_id, image_ids=tuple(m.image_id for m in members),
        record_ids=tuple(m.record_id for m in members)))


def internal_error(stage: str, error: BaseException, **kwargs: Any) -> beam.pvalue.TaggedOutput:
    """Dead-letter a record whose processing raised ``error`` unexpectedly; logs the traceback."""
    LOG.warning("%s: unexpected %s, record sent to rejects as %s:\n%s", stage, type(error).__name__,
                INTERNAL_ERROR, "".join(traceback.format_exception(error)[-6:]))
    return reject(stage, INTERNAL_ERROR, f"{type(error).__name__}: {error}", **kwargs)


class Progress:
    """Logs on a worker how many elements a step has handled, at most once per ``interval`` seconds.

    Create it in ``DoFn.setup`` (it holds a clock, so it is not built in ``__init__``). On a local run
    these lines are how the console shows that the job is alive; on Dataflow they go to worker logs.
    """

    def __init__(self, stage: str, unit: str = "records", interval: float = 10.0) -> None:
        self.stage = stage
        self.unit = unit
        self.interval = interval
        self.n = 0
        self._start = time.monotonic()
        self._last = self._start

    def add(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            rate = self.n / max(now - self._start, 1e-9)
            LOG.info("%s: %s %s so far on this worker (%.1f/s)", self.stage, f"{self.n:,}", self.unit, rate)
