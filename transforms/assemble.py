"""Stage *assemble* (phase 3): kept targets + real demos of their subject -> ICL training examples.

One example per kept target (:class:`~schemas.records.Example`, written as ``examples/*.parquet``,
``schemas.parquet.EXAMPLES_SCHEMA``):

* **Demos**: ``assemble.demos`` (3) real images of the target's cluster with their captions, chosen by
  :func:`choose_demos`: never the target's *source* (the real image the target is nearest to, see
  :class:`~schemas.records.ScoredCandidate` -- showing it as a demo would teach copy-paste, the failure the
  synthetic targets exist to avoid), all distinct, in an order drawn from hashes of (candidate id, image id):
  deterministic, independent of input order, and different for the different targets of one cluster, so a
  cluster's examples do not all repeat the same three photos. A cluster with fewer than ``assemble.min_demos``
  images besides the source cannot make an example: the target is rejected as ``too_few_demos`` (with the
  defaults, clusters need 4 images; phase 1 keeps clusters of ``group.min_images`` = 3 and up -- raise it to 4
  to spend no GPU time on such clusters).
* **Target**: the rendered image, the trainer's prompt (subject phrase, no identifier), the template, the
  rendered prompt, skill, seed, k, and the source image id; **scores**; **provenance** (models, prompt files,
  settings hashes, the pipeline version).

**Shards sized for streaming**: ``examples/`` is written by :class:`transforms.outputs.WriteShards`, like every
phase output: files of about ``assemble.shard_bytes``, rows in example-id order, row groups of about
``assemble.row_group_bytes`` (what a reader holds in memory at a time); see :func:`examples_output`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam

from schemas.ids import stable_id
from schemas.records import Cluster, Demo, Example, ExampleProvenance, ImageRecord, ScoredCandidate, ScoringUnit
from transforms.common import REJECTS, Reason, StageOutput, count, internal_error, reject
from transforms.settings import AssembleConfig

STAGE = "assemble"

TOO_FEW_DEMOS = "too_few_demos"

REASONS = (Reason(TOO_FEW_DEMOS),)


@dataclass(frozen=True)
class RunProvenance:
    """What every example of a run shares in its provenance."""

    pipeline_version: str | None
    config_hash: str
    clip_model: str


# --- plain functions -------------------------------------------------------------------------------------


def choose_demos(cluster: Cluster, source_image_id: str, candidate_id: str, n: int,
                 min_n: int | None = None) -> tuple[ImageRecord, ...] | None:
    """Up to ``n`` distinct real images of ``cluster`` other than ``source_image_id``, ordered by
    ``stable_id("demo", candidate_id, image_id)``; ``None`` when fewer than ``min_n`` (default ``n``) exist."""
    pool = {image.image_id: image for image in cluster.images if image.image_id != source_image_id}
    if len(pool) < (n if min_n is None else min_n):
        return None
    ranked = sorted(pool.values(), key=lambda image: stable_id("demo", candidate_id, image.image_id))
    return tuple(ranked[:n])


def example_id(candidate_id: str, demo_ids: Iterable[str]) -> str:
    return stable_id("example", candidate_id, *demo_ids)


def make_example(cluster: Cluster, scored: ScoredCandidate, demos: Sequence[ImageRecord],
                 run: RunProvenance) -> Example:
    candidate = scored.candidate
    p = cluster.provenance
    provenance = ExampleProvenance(
        pipeline_version=run.pipeline_version, config_hash=run.config_hash, clip_model=run.clip_model,
        synth_model=candidate.train.model, synth_config_hash=candidate.synth_config_hash,
        caption_backend=p.caption_backend, caption_model=p.caption_model, caption_prompt=p.caption_prompt,
        subject_backend=p.subject_backend, subject_model=p.subject_model, subject_prompt=p.subject_prompt,
        prompts_backend=p.prompts_backend, prompts_model=p.prompts_model, prompts_prompt=p.prompts_prompt,
        fallbacks=tuple(p.fallbacks))
    return Example(
        example_id=example_id(candidate.candidate_id, (d.image_id for d in demos)),
        cluster_id=cluster.cluster_id, page_url=cluster.page_url, subject=cluster.subject,
        class_noun=cluster.class_noun,
        demos=tuple(Demo(d.image_id, d.image, d.caption, d.width, d.height) for d in demos),
        target=scored, provenance=provenance)


class AssembleFn(beam.DoFn):
    """``ScoringUnit`` of kept targets -> an ``Example`` per target, or a ``too_few_demos`` reject."""

    def __init__(self, config: AssembleConfig, run: RunProvenance) -> None:
        self._config = config
        self._run = run

    def process(self, unit: ScoringUnit) -> Iterator[Any]:
        cluster = unit.cluster
        for scored in unit.candidates:
            c = scored.candidate
            try:
                demos = choose_demos(cluster, scored.source_image_id, c.candidate_id, self._config.demos,
                                     self._config.min_demos)
                if demos is None:
                    others = sum(1 for image in cluster.images if image.image_id != scored.source_image_id)
                    yield reject(STAGE, TOO_FEW_DEMOS, f"cluster {cluster.cluster_id} has {others} image(s) besides "
                                 f"the target's source {scored.source_image_id} < min_demos {self._config.min_demos}",
                                 id=c.candidate_id, cluster_id=c.cluster_id, page_url=c.page_url)
                    continue
                if any(d.caption is None for d in demos):
                    count(STAGE, "demos_without_caption")
                count(STAGE, "examples")
                yield make_example(cluster, scored, demos, self._run)
            except Exception as error:  # noqa: BLE001
                yield internal_error(STAGE, error, id=c.candidate_id, cluster_id=c.cluster_id, page_url=c.page_url)


class Assemble(beam.PTransform):
    """Units of kept targets -> ``Example``s."""

    def __init__(self, config: AssembleConfig, run: RunProvenance) -> None:
        super().__init__()
        self._config = config
        self._run = run

    def expand(self, units: beam.PCollection) -> StageOutput:
        out = units | "AssembleExamples" >> beam.ParDo(AssembleFn(self._config, self._run)).with_outputs(
            REJECTS, main="examples")
        return StageOutput(out.examples, out[REJECTS])
