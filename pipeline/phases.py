"""The three phases as ordered lists of stages, and the Beam graph of each, built from its list.

A phase reads its input (its ``source``), runs its stages in order -- each the composite ``PTransform`` of a
module of ``transforms/``, applied when its config section enables it, its main output feeding the next --
writes the last output (its ``sink``), each stage's extra outputs (``stats/``, ``scores/``) and every dead letter
(``rejects/<phase>-*.parquet``). The stage modules declare their reject reasons (``REASONS``); the accounting
reads them from a phase's entry (:meth:`Phase.reasons`).

Why this order (phase 1): the source reads pairs (read) and WARC pages (extract); the fetch stage, present when some
input carries no image bytes, comes right after it, so that normalize and everything after see the records they see
for a byte-carrying crawl, and no byte is fetched for a record read had already refused. The model stages come after
dedupe (no detector or GPU time on duplicates). The safety stage (faces, NSFW) comes before the CLIP embedding, so
that photos that leave cost no GPU time and the embeddings are those of the images as stored (incidental faces
blurred). Cross-page duplicates are decided after the coherence filter, on the cleaned clusters, so that the copy
kept is one that is written (and the most coherent of equal size), and only the ~10% of clusters the filter keeps
are held for that global decision; semantic duplicates (by CLIP embeddings) are decided next, on what the cheap hash
comparison left, ranked by the same rule; decontamination comes last among them, where its CLIP check can use the
embeddings and its count is the number of clusters it took out of the output. Captioning and prompt writing, the
costliest model calls per cluster, run only on the clusters that survive all of that: captions, then the subject
(read from the captions), then scene prompts (for the subject).

Phase 3: the NSFW check of the renders (``FlagNsfwTargets``) runs on the scored units, before the target filter,
which rejects a flagged render as ``nsfw`` before any other criterion.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import apache_beam as beam

from pipeline.config import PipelineConfig, config_hash
from pipeline.manifest import package_versions
from transforms import (
    assemble,
    caption,
    cluster_filter,
    cross_page,
    decontaminate,
    dedupe,
    embed,
    extract,
    fetch,
    group,
    normalize,
    nsfw_targets,
    prompts,
    read,
    safety,
    score,
    semantic_dedup,
    subject,
    synthesize,
    target_filter,
)
from transforms.common import Reason, StageOutput
from transforms.models.clip import check_model_config, model_id
from transforms.models.detectors import check_detector
from transforms.outputs import (
    ReadCandidates,
    ReadClusters,
    count_parquet_rows,
    examples_output,
    write_candidates,
    write_clusters,
    write_examples,
    write_rejects,
    write_stage_extras,
)
from transforms.payloads import RestoreImages, SetAsideImages, store_folder
from transforms.read import InputFile
from transforms.settings import ExtractConfig, ReadConfig

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhaseInputs:
    """What a phase's graph is built from besides the configuration."""

    output_dir: str
    files: tuple[InputFile, ...] = ()
    """Phase clusters: the crawl's input files."""
    cluster_files: tuple[str, ...] = ()
    """Phases synthesize and assemble: ``clusters/*.parquet`` files."""
    candidate_files: tuple[str, ...] = ()
    """Phase assemble: ``candidates/*.parquet`` files."""
    n_input: int = 0
    """Phases synthesize and assemble: clusters, or candidates, in those files (from their footers)."""
    workers: int = 1
    """Worker processes expected to share the synthesis (its progress line's time-left estimate)."""


def _always(config: PipelineConfig) -> bool:
    return True


def _whatever_the_inputs(config: PipelineConfig, inputs: PhaseInputs) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One step of a phase: a stage module's composite, applied under ``label`` when ``enabled``."""

    label: str
    module: ModuleType
    """Declares ``STAGE`` (the name of its counters and rejects) and ``REASONS``."""
    make: Callable[[PipelineConfig, PhaseInputs], beam.PTransform]
    enabled: Callable[[PipelineConfig], bool] = _always
    check: Callable[[PipelineConfig], Any] | None = None
    """A cheap check of what the stage will need (a model name, reference files), before anything runs."""
    needed: Callable[[PipelineConfig, PhaseInputs], bool] = _whatever_the_inputs
    """Whether an enabled stage applies to these inputs (Fetch: only when some input carries no image bytes)."""
    also: tuple[ModuleType, ...] = ()
    """Other stage modules whose steps the composite runs: their dead letters (and ``REASONS``) leave with it."""
    light: bool | Callable[[PipelineConfig], bool] = False
    """The stage never reads its records' image bytes (with this configuration, when a function): the builder sets
    the bytes aside before a run of such stages and reads them back before the next stage that reads them, or as
    the sink writes them (``transforms/payloads.py``), so that photos are never shuffled."""

    @property
    def name(self) -> str:
        return self.module.STAGE

    @property
    def reasons(self) -> tuple[Reason, ...]:
        return tuple(reason for module in (self.module, *self.also) for reason in module.REASONS)

    def applies(self, config: PipelineConfig, inputs: PhaseInputs) -> bool:
        return self.enabled(config) and self.needed(config, inputs)

    def is_light(self, config: PipelineConfig) -> bool:
        return self.light(config) if callable(self.light) else self.light


@dataclass(frozen=True)
class Phase:
    """A phase: read its input, run its stages in order, write the result and the dead letters."""

    name: str
    source: Stage
    """Reads the phase's input; applied to the pipeline itself."""
    stages: tuple[Stage, ...]
    sink: Callable[[beam.PCollection, PipelineConfig, PhaseInputs, bool], dict[str, beam.PCollection]]
    """Writes the last stage's output (its records light when the last argument says so: their image bytes set
    aside, which the sink reads back as it writes them); returns what it wrote, by name."""
    outputs: tuple[str, ...]
    """What the phase writes under OUT (relative globs)."""
    folders: tuple[str, ...]
    """The folders whose temporary sub-folders the phase's writers may leave."""

    def reasons(self) -> tuple[Reason, ...]:
        return tuple(reason for stage in (self.source, *self.stages) for reason in stage.reasons)


# --- phase 1: crawled pairs -> clusters -----------------------------------------------------------------------


class ReadCrawl(beam.PTransform):
    """``PBegin`` -> the ``InputRecord`` s of phase 1's input files: WARC files through the extract stage (their
    pages' images, with the bytes the WARC captured), the others through the read stage; one stream of records
    and one of dead letters."""

    def __init__(self, files: Sequence[InputFile], read_config: ReadConfig, extract_config: ExtractConfig) -> None:
        super().__init__()
        self._warc = [f.path for f in files if f.format == read.WARC]
        self._others = [f for f in files if f.format != read.WARC]
        self._read_config = read_config
        self._extract_config = extract_config

    def expand(self, pbegin: beam.pvalue.PBegin) -> StageOutput:
        parts = []
        if self._others or not self._warc:
            parts.append(pbegin | "ReadPairs" >> read.ReadPairs(self._others, self._read_config))
        if self._warc:
            parts.append(pbegin | "ExtractPages" >> extract.ExtractPages(self._warc, self._extract_config))
        if len(parts) == 1:
            return parts[0]
        records = tuple(part.output for part in parts) | "MergeRecords" >> beam.Flatten()
        rejects = tuple(part.rejects for part in parts) | "MergeRejects" >> beam.Flatten()
        return StageOutput(records, rejects)


def _fetch_needed(config: PipelineConfig, inputs: PhaseInputs) -> bool:
    return fetch.fetch_needed(config.fetch, read.byteless_inputs(inputs.files, config.read))


def safety_enabled(config: PipelineConfig) -> bool:
    """The safety stage runs when the detector is on and it has something to decide: the NSFW check, or a people
    policy that drops person clusters or blurs faces."""
    return config.detector.enabled and (config.nsfw.enabled or config.people.acts)


def _clusters_output(clusters: beam.PCollection, config: PipelineConfig, inputs: PhaseInputs,
                     light: bool) -> dict[str, beam.PCollection]:
    if config.embed.enabled and not config.embed.store_embeddings:
        clusters = clusters | "DropEmbeddings" >> beam.Map(embed.drop_embeddings)
    _ = clusters | "WriteClusters" >> write_clusters(inputs.output_dir, config.output, restore=light)
    return {"clusters": clusters}


CLUSTERS = Phase(
    name="clusters",
    source=Stage("Read", read, lambda c, i: ReadCrawl(i.files, c.read, c.extract), also=(extract,)),
    stages=(
        Stage("Fetch", fetch, lambda c, i: fetch.Fetch(c.fetch), enabled=lambda c: c.fetch.enabled != "never",
              needed=_fetch_needed),
        Stage("Normalize", normalize, lambda c, i: normalize.Normalize(c.normalize)),
        Stage("GroupByPage", group, lambda c, i: group.GroupByPage(c.group, c.dedupe), light=True),
        Stage("Dedupe", dedupe, lambda c, i: dedupe.Dedupe(c.dedupe, c.group.min_images), light=True),
        Stage("Safety", safety,
              lambda c, i: safety.Safety(c.detector, c.people, c.nsfw, c.normalize, c.group.min_images),
              enabled=safety_enabled, check=lambda c: check_detector(c.detector)),
        Stage("Embed", embed, lambda c, i: embed.Embed(c.embed, c.group.min_images),
              enabled=lambda c: c.embed.enabled, check=lambda c: check_model_config(c.embed)),
        Stage("ClusterFilter", cluster_filter,
              lambda c, i: cluster_filter.ClusterFilter(c.cluster_filter, c.group.min_images),
              enabled=lambda c: c.cluster_filter.enabled, light=True),
        Stage("CrossPageDedupe", cross_page, lambda c, i: cross_page.CrossPageDedupe(c.cross_page),
              enabled=lambda c: c.cross_page.enabled, light=True),
        Stage("SemanticDedup", semantic_dedup,
              lambda c, i: semantic_dedup.SemanticDedup(c.semantic_dedup, c.group.min_images),
              enabled=lambda c: c.semantic_dedup.enabled, light=True),
        Stage("Decontaminate", decontaminate,
              lambda c, i: decontaminate.Decontaminate(c.decontaminate, c.normalize,
                                                       c.embed if c.embed.enabled else None),
              enabled=lambda c: bool(c.decontaminate.against),
              check=lambda c: decontaminate.check_references(c.decontaminate), light=True),
        Stage("Caption", caption, lambda c, i: caption.Caption(c.caption, c.llm), enabled=lambda c: c.caption.enabled,
              light=lambda c: c.caption.backend != "vllm"),  # the VLM reads the photos; alt text does not
        Stage("Subject", subject, lambda c, i: subject.Subject(c.subject, c.llm), enabled=lambda c: c.subject.enabled,
              light=True),
        Stage("ScenePrompts", prompts, lambda c, i: prompts.ScenePrompts(c.prompts, c.llm),
              enabled=lambda c: c.prompts.enabled, light=True),
    ),
    sink=_clusters_output,
    outputs=("clusters/*.parquet", "rejects/clusters-*.parquet", "stats/clusters.*.json"),
    folders=("clusters", "rejects"),
)


# --- phase 2: clusters -> candidates --------------------------------------------------------------------------


def _candidates_output(candidates: beam.PCollection, config: PipelineConfig, inputs: PhaseInputs,
                       light: bool) -> dict[str, beam.PCollection]:
    _ = candidates | "WriteCandidates" >> write_candidates(inputs.output_dir, config.output)
    return {"candidates": candidates}


SYNTHESIZE = Phase(
    name="synthesize",
    source=Stage("ReadClusters", synthesize,
                 lambda c, i: ReadClusters(list(i.cluster_files), synthesize.STAGE)),
    stages=(
        Stage("Synthesize", synthesize,
              lambda c, i: synthesize.Synthesize(c.synth, c.synth.cache_dir or synthesize.default_cache_dir(
                  i.output_dir), i.n_input, i.workers)),
    ),
    sink=_candidates_output,
    # cache/synthesize/ is not listed: it is keyed by the synthesis settings and each cluster's inputs, so it
    # never describes another run's data wrongly.
    outputs=("candidates/*.parquet", "rejects/synthesize-*.parquet"),
    folders=("candidates", "rejects"),
)


# --- phase 3: candidates + clusters -> examples -----------------------------------------------------------------


class ReadCandidatesAndClusters(beam.PTransform):
    """``PBegin`` -> ``(candidates, clusters)``, the input of the score stage.

    A cluster row that cannot be read is only counted (``read_clusters/internal_error``, in images) and logged:
    its candidates are accounted for as ``cluster_missing`` rejects, so the phase's counts stay in candidates.
    """

    def __init__(self, candidate_files: Sequence[str], cluster_files: Sequence[str]) -> None:
        super().__init__()
        self._candidate_files = list(candidate_files)
        self._cluster_files = list(cluster_files)

    def expand(self, pbegin: beam.pvalue.PBegin) -> StageOutput:
        candidates, rejects = pbegin | "ReadCandidates" >> ReadCandidates(self._candidate_files, score.STAGE)
        clusters, unreadable = pbegin | "ReadClusters" >> ReadClusters(self._cluster_files, "read_clusters")
        _ = unreadable | "LogUnreadableClusters" >> beam.Map(_log_unreadable_cluster)
        return StageOutput((candidates, clusters), rejects)


def _log_unreadable_cluster(reject: Any) -> None:
    LOG.warning("assemble: cluster %s of the clusters input is unreadable (%s); its candidates are rejected as "
                "cluster_missing", reject.id, reject.detail)


def run_provenance(config: PipelineConfig) -> assemble.RunProvenance:
    """What every example of the run records in its provenance."""
    return assemble.RunProvenance(package_versions().get("icl-cluster-pipeline"), config_hash(config),
                                  model_id(config.embed))


def _examples_output(examples: beam.PCollection, config: PipelineConfig, inputs: PhaseInputs,
                     light: bool) -> dict[str, beam.PCollection]:
    shards = examples | "WriteExamples" >> write_examples(inputs.output_dir,
                                                           examples_output(config.assemble, config.output.codec))
    return {"examples": examples, "shards": shards}


ASSEMBLE = Phase(
    name="assemble",
    source=Stage("ReadInputs", score,
                 lambda c, i: ReadCandidatesAndClusters(i.candidate_files, i.cluster_files)),
    stages=(
        Stage("Score", score, lambda c, i: score.Score(c.score, c.embed)),
        Stage("FlagNsfwTargets", nsfw_targets, lambda c, i: nsfw_targets.FlagNsfwTargets(c.detector, c.nsfw),
              enabled=lambda c: c.detector.enabled and c.nsfw.enabled, check=lambda c: check_detector(c.detector)),
        Stage("TargetFilter", target_filter, lambda c, i: target_filter.TargetFilter(c.target_filter)),
        Stage("Assemble", assemble, lambda c, i: assemble.Assemble(c.assemble, run_provenance(c))),
    ),
    sink=_examples_output,
    outputs=("examples/*.parquet", "scores/*.parquet", "rejects/assemble-*.parquet", "stats/assemble.*.json",
             "README.md", "report/index.html"),
    folders=("examples", "scores", "rejects"),
)


PHASES: dict[str, Phase] = {phase.name: phase for phase in (CLUSTERS, SYNTHESIZE, ASSEMBLE)}
"""The phases in the order they run. Each persists its output and can start from the previous one's."""

ORDER: tuple[str, ...] = tuple(PHASES)

PHASE_OUTPUTS: dict[str, tuple[str, ...]] = {name: phase.outputs for name, phase in PHASES.items()}


def check_resources(config: PipelineConfig) -> None:
    """Run every enabled stage's cheap check (no weights are read); raises ``ValueError`` naming the key."""
    for phase in PHASES.values():
        for stage in phase.stages:
            if stage.check is not None and stage.enabled(config):
                stage.check(config)


# --- building ---------------------------------------------------------------------------------------------------


def build_phase(p: beam.Pipeline, phase: Phase, config: PipelineConfig,
                inputs: PhaseInputs) -> dict[str, beam.PCollection]:
    """Wire ``phase`` onto ``p``: its source, its enabled stages in order, its sink, the writers of the stages'
    extra outputs and of all dead letters. Returns the sink's collections and ``rejects``."""
    output, rejects = p | phase.source.label >> phase.source.make(config, inputs)
    stage_rejects = [rejects]
    store = store_folder(inputs.output_dir, phase.folders[0])
    light = False  # the records' image bytes are set aside
    for stage in phase.stages:
        if not stage.applies(config, inputs):
            continue
        if stage.is_light(config) != light:
            if light:
                output, rejects = output | f"RestoreImagesFor{stage.label}" >> RestoreImages()
                stage_rejects.append(rejects)
            else:
                output = output | f"SetAsideImagesFor{stage.label}" >> SetAsideImages(store)
            light = not light
        result = output | stage.label >> stage.make(config, inputs)
        write_stage_extras(result, stage.label, inputs.output_dir, phase.name, stage.name, config.output)
        output, rejects = result
        stage_rejects.append(rejects)
    written = phase.sink(output, config, inputs, light)
    all_rejects = tuple(stage_rejects) | "CollectRejects" >> beam.Flatten()
    _ = all_rejects | "WriteRejects" >> write_rejects(inputs.output_dir, phase.name, config.output)
    return {**written, "rejects": all_rejects}


def build_clusters_pipeline(p: beam.Pipeline, config: PipelineConfig, files: Sequence[InputFile],
                            output_dir: str) -> dict[str, beam.PCollection]:
    """Phase 1 graph: crawled pairs -> ``clusters/`` and ``rejects/clusters-*``."""
    return build_phase(p, CLUSTERS, config, PhaseInputs(output_dir, files=tuple(files)))


def build_synthesize_pipeline(p: beam.Pipeline, config: PipelineConfig, cluster_files: Sequence[str],
                              output_dir: str, *, total: int | None = None,
                              workers: int = 1) -> dict[str, beam.PCollection]:
    """Phase 2 graph: clusters -> one DreamBooth per cluster -> ``candidates/`` and ``rejects/synthesize-*``.

    ``total`` (clusters in the input; counted from the files' footers when not given) and ``workers`` only feed
    the progress line of the workers.
    """
    total = count_parquet_rows(list(cluster_files)) if total is None else total
    return build_phase(p, SYNTHESIZE, config, PhaseInputs(output_dir, cluster_files=tuple(cluster_files),
                                                          n_input=total, workers=workers))


def build_assemble_pipeline(p: beam.Pipeline, config: PipelineConfig, candidate_files: Sequence[str],
                            cluster_files: Sequence[str], output_dir: str) -> dict[str, beam.PCollection]:
    """Phase 3 graph: candidates and their clusters -> score -> target filter -> assemble -> ``examples/``,
    ``scores/`` and ``rejects/assemble-*``."""
    return build_phase(p, ASSEMBLE, config, PhaseInputs(output_dir, cluster_files=tuple(cluster_files),
                                                        candidate_files=tuple(candidate_files)))
