"""Assembly of stages into Beam pipelines, one per phase, and the ``run`` entry point.

``build_*_pipeline(p, ...)`` functions only wire labelled stages onto a pipeline object, so tests can
hand them a ``TestPipeline``. :func:`run` parses the command line, validates the whole configuration
and every input before building anything, runs the requested phases in order (each one a Beam
pipeline that persists its output, so a phase can also start from an earlier run's files), and writes
``OUT/manifest.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline import manifest as mf
from pipeline.config import PROFILES, ConfigError, PipelineConfig, build_config, config_hash, to_dict
from schemas.parquet import SCHEMA_VERSION
from transforms.assemble import Assemble, RunProvenance
from transforms.caption import Caption
from transforms.cluster_filter import ClusterFilter
from transforms.cross_page import CrossPageDedupe
from transforms.decontaminate import Decontaminate, check_references
from transforms.dedupe import Dedupe, FindBoilerplate
from transforms.embed import Embed, drop_embeddings
from transforms.group import GroupByPage
from transforms.models.clip import check_model_config, model_id
from transforms.normalize import Normalize
from transforms.outputs import (
    STATS_FOLDER,
    ReadCandidates,
    ReadClusters,
    count_parquet_rows,
    delete_matching,
    examples_output,
    expand_phase_inputs,
    matching_files,
    parquet_footer,
    read_columns,
    read_stats,
    remove_temp_dirs,
    write_candidates,
    write_clusters,
    write_examples,
    write_rejects,
    write_stage_extras,
)
from transforms.prompts import ScenePrompts
from transforms.read import TRUNCATED_FILE, InputFile, ReadPairs, expand_inputs, validate_input_file
from transforms.score import Score
from transforms.subject import Subject
from transforms.synthesize import Synthesize, default_cache_dir
from transforms.target_filter import TargetFilter

LOG = logging.getLogger(__name__)

PHASES = ("clusters", "synthesize", "assemble")
"""The phases in the order they run. Each persists its output and can start from the previous one's."""

IMPLEMENTED_PHASES = ("clusters", "synthesize", "assemble")

DEFAULT_PHASES = ",".join(PHASES)

PHASE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "clusters": ("clusters/*.parquet", "rejects/clusters-*.parquet", "stats/clusters.*.json"),
    "synthesize": ("candidates/*.parquet", "rejects/synthesize-*.parquet"),
    "assemble": ("examples/*.parquet", "scores/*.parquet", "rejects/assemble-*.parquet", "stats/assemble.*.json",
                 "README.md", "report/index.html"),
}
"""What each phase writes under OUT (relative globs). ``cache/synthesize/`` is not listed: it is keyed by the
synthesis settings and each cluster's inputs, so it never describes another run's data wrongly."""

PHASE_FOLDERS: dict[str, tuple[str, ...]] = {
    "clusters": ("clusters", "rejects"), "synthesize": ("candidates", "rejects"),
    "assemble": ("examples", "scores", "rejects"),
}
"""The folders whose temporary sub-folders a phase's writers may leave."""

PipelineFactory = Callable[[PipelineOptions], beam.Pipeline]


class UsageError(ValueError):
    """The command line asks for something that cannot run (bad --phases, no --input, ...)."""


class RunError(RuntimeError):
    """A phase did not finish correctly (failed pipeline, counts that do not reconcile)."""


@dataclass(frozen=True)
class RunRequest:
    """The project's own command-line arguments of ``icl-pipeline run``."""

    inputs: tuple[str, ...]
    output: str
    profile: str
    config_file: str | None
    overrides: tuple[str, ...]
    phases: tuple[str, ...]
    overwrite: bool = False


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", default=[], metavar="GLOB",
                        help="Input files (repeatable). Phase 'clusters': crawled pairs as Parquet "
                             "(.parquet), JSONL (.jsonl, .jsonl.gz) or WebDataset tar shards (.tar); "
                             "later phases: the previous phase's Parquet output (phase synthesize: "
                             "OUT/clusters/*.parquet when omitted; phase assemble: OUT/candidates/*.parquet, "
                             "with the clusters from assemble.clusters or OUT/clusters/*.parquet). Any Beam file "
                             "system path (gs://, s3://) works.")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="Output directory: clusters/, rejects/, manifest.json (and, with later "
                             "phases, candidates/, examples/, scores/, README.md (the dataset card), "
                             "report/index.html).")
    parser.add_argument("--profile", default="demo", choices=PROFILES,
                        help="Configuration profile: demo (bundled sample, CPU, tiny models, offline), "
                             "local (real models on this machine), dataflow (real models on Dataflow). "
                             "Default: demo.")
    parser.add_argument("--config", dest="config_file", metavar="FILE.yaml",
                        help="YAML file of config sections applied over the profile.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="Override one config key (repeatable), value parsed as YAML, e.g. "
                             "--set group.min_images=4. List keys: icl-pipeline config --list.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Remove the outputs of later phases that this run would leave stale (for example "
                             "examples/ of an earlier run when only --phases clusters runs again). Without it, "
                             "such a run stops before it starts and names them.")
    parser.add_argument("--phases", default=DEFAULT_PHASES, metavar="PHASE[,PHASE...]",
                        help=f"Consecutive phases to run, in order: {', '.join(PHASES)}; each persists its "
                             f"output, so a later phase can start from an earlier run's files. Default: all "
                             f"({DEFAULT_PHASES}).")


def parse_run_args(argv: Sequence[str]) -> tuple[RunRequest, list[str]]:
    """Our flags into a :class:`RunRequest`; everything else is returned untouched for Beam."""
    parser = argparse.ArgumentParser(prog="icl-pipeline run", allow_abbrev=False)
    add_run_arguments(parser)
    args, beam_args = parser.parse_known_args(list(argv))
    return request_from_args(args), beam_args


def request_from_args(args: argparse.Namespace) -> RunRequest:
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise UsageError(f"--phases {args.phases!r}: choose from {', '.join(PHASES)}")
    positions = [PHASES.index(p) for p in phases]
    if positions != list(range(positions[0], positions[0] + len(positions))):
        raise UsageError(f"--phases {args.phases!r}: phases run in the order {', '.join(PHASES)}, each once, "
                       f"without gaps (each reads the previous one's output)")
    missing = [p for p in phases if p not in IMPLEMENTED_PHASES]
    if missing:
        raise UsageError(f"phase(s) {', '.join(missing)} are not available in this version")
    if phases[0] == "clusters" and not args.input:
        raise UsageError("phase 'clusters' needs at least one --input")
    if phases[0] == "synthesize" and not args.input:
        args.input = [FileSystems.join(args.output, "clusters", "*.parquet")]  # the clusters phase's output
    if phases[0] == "assemble" and not args.input:
        args.input = [FileSystems.join(args.output, "candidates", "*.parquet")]  # the synthesize phase's output
    return RunRequest(tuple(args.input), args.output, args.profile, args.config_file,
                      tuple(args.overrides), phases, bool(getattr(args, "overwrite", False)))


# --- graphs ---------------------------------------------------------------------------------------------


def build_clusters_pipeline(p: beam.Pipeline, config: PipelineConfig, files: Sequence[InputFile],
                            output_dir: str) -> dict[str, beam.PCollection]:
    """Phase 1 graph: read -> normalize -> group by page -> dedupe -> embed -> cluster filter -> cross-page
    duplicates -> decontaminate -> caption -> subject -> scene prompts -> ``clusters/`` and ``rejects/``
    (the model stages as configured).

    The CLIP stages come after dedupe (no GPU time on duplicates); cross-page duplicates are decided after the
    coherence filter, on the cleaned clusters, so that the copy kept is one that is written (and the most
    coherent of equal size), and only the ~10% of clusters the filter keeps are held for that global decision;
    decontamination comes last among them, where its CLIP check can use the embeddings and its count is the
    number of clusters it took out of the output. Captioning and prompt writing, the costliest model calls
    per cluster, run only on the clusters that survive all of that.
    """
    records, read_rejects = p | "Read" >> ReadPairs(list(files), config.read)
    images, normalize_rejects = records | "Normalize" >> Normalize(config.normalize)
    boilerplate = images | "FindBoilerplate" >> FindBoilerplate(config.dedupe)
    pages, group_rejects = (images, boilerplate) | "GroupByPage" >> GroupByPage(
        config.group, config.dedupe.boilerplate_max_pages)
    clusters, dedupe_rejects = pages | "Dedupe" >> Dedupe(config.dedupe, config.group.min_images)
    stage_rejects = [read_rejects, normalize_rejects, group_rejects, dedupe_rejects]

    if config.embed.enabled:
        clusters, embed_rejects = clusters | "Embed" >> Embed(config.embed, config.group.min_images)
        stage_rejects.append(embed_rejects)
    if config.cluster_filter.enabled:
        filtered = clusters | "ClusterFilter" >> ClusterFilter(config.cluster_filter, config.group.min_images)
        write_stage_extras(filtered, "ClusterFilter", output_dir, "clusters", "cluster_filter", config.output)
        clusters, filter_rejects = filtered
        stage_rejects.append(filter_rejects)
    if config.cross_page.enabled:
        clusters, cross_page_rejects = clusters | "CrossPageDedupe" >> CrossPageDedupe(config.cross_page)
        stage_rejects.append(cross_page_rejects)
    if config.decontaminate.against:
        checked = clusters | "Decontaminate" >> Decontaminate(
            config.decontaminate, config.normalize, config.embed if config.embed.enabled else None)
        write_stage_extras(checked, "Decontaminate", output_dir, "clusters", "decontaminate", config.output)
        clusters, contaminated = checked
        stage_rejects.append(contaminated)

    # Captions, then the subject (read from the captions), then scene prompts (for the subject).
    for label, section, stage in (("Caption", config.caption, Caption), ("Subject", config.subject, Subject),
                                  ("ScenePrompts", config.prompts, ScenePrompts)):
        if section.enabled:
            clusters, model_rejects = clusters | label >> stage(section, config.llm)
            stage_rejects.append(model_rejects)
    if config.embed.enabled and not config.embed.store_embeddings:
        clusters = clusters | "DropEmbeddings" >> beam.Map(drop_embeddings)

    clusters | "WriteClusters" >> write_clusters(output_dir, config.output)
    rejects = tuple(stage_rejects) | "CollectRejects" >> beam.Flatten()
    rejects | "WriteRejects" >> write_rejects(output_dir, "clusters", config.output)
    return {"clusters": clusters, "rejects": rejects}


def build_synthesize_pipeline(p: beam.Pipeline, config: PipelineConfig, cluster_files: Sequence[str],
                              output_dir: str, *, total: int | None = None,
                              workers: int = 1) -> dict[str, beam.PCollection]:
    """Phase 2 graph: read clusters -> synthesize (one DreamBooth per cluster) -> ``candidates/`` and
    ``rejects/synthesize-*``.

    ``total`` (clusters in the input; counted from the files' footers when not given) and ``workers``
    only feed the progress line of the workers.
    """
    cache_dir = config.synth.cache_dir or default_cache_dir(output_dir)
    total = count_parquet_rows(cluster_files) if total is None else total
    clusters, read_rejects = p | "ReadClusters" >> ReadClusters(cluster_files, "synthesize")
    candidates, synth_rejects = clusters | "Synthesize" >> Synthesize(config.synth, cache_dir, total, workers)
    candidates | "WriteCandidates" >> write_candidates(output_dir, config.output)
    rejects = (read_rejects, synth_rejects) | "CollectRejects" >> beam.Flatten()
    rejects | "WriteRejects" >> write_rejects(output_dir, "synthesize", config.output)
    return {"candidates": candidates, "rejects": rejects}


def build_assemble_pipeline(p: beam.Pipeline, config: PipelineConfig, candidate_files: Sequence[str],
                            cluster_files: Sequence[str], output_dir: str) -> dict[str, beam.PCollection]:
    """Phase 3 graph: read candidates and their clusters -> score -> target filter -> assemble ->
    ``examples/``, ``scores/`` and ``rejects/assemble-*``.

    A cluster row that cannot be read is only counted (``read_clusters/internal_error``, in images) and logged:
    its candidates are accounted for as ``cluster_missing`` rejects, so the phase's counts stay in candidates.
    """
    candidates, read_rejects = p | "ReadCandidates" >> ReadCandidates(candidate_files, "score")
    clusters, unreadable = p | "ReadClusters" >> ReadClusters(cluster_files, "read_clusters")
    _ = unreadable | "LogUnreadableClusters" >> beam.Map(_log_unreadable_cluster)
    units, score_rejects = (candidates, clusters) | "Score" >> Score(config.score, config.embed)
    filtered = units | "TargetFilter" >> TargetFilter(config.target_filter)
    write_stage_extras(filtered, "TargetFilter", output_dir, "assemble", "target_filter", config.output)
    kept, filter_rejects = filtered
    run_provenance = RunProvenance(mf.package_versions().get("icl-cluster-pipeline"), config_hash(config),
                                   model_id(config.embed))
    examples, assemble_rejects = kept | "Assemble" >> Assemble(config.assemble, run_provenance)
    shards = examples | "WriteExamples" >> write_examples(output_dir, examples_output(config.assemble,
                                                                                       config.output.codec))
    rejects = (read_rejects, score_rejects, filter_rejects, assemble_rejects) | "CollectRejects" >> beam.Flatten()
    rejects | "WriteRejects" >> write_rejects(output_dir, "assemble", config.output)
    return {"examples": examples, "shards": shards, "rejects": rejects}


def _log_unreadable_cluster(reject: Any) -> None:
    LOG.warning("assemble: cluster %s of the clusters input is unreadable (%s); its candidates are rejected as "
                "cluster_missing", reject.id, reject.detail)


# --- running ------------------------------------------------------------------------------------------


def _run_pipeline(p: beam.Pipeline, phase: str) -> Any:
    LOG.info("phase %s: running", phase)
    result = p.run()
    state = result.wait_until_finish()
    if state is not None and str(state) not in ("DONE", "PipelineState.DONE"):
        raise RunError(f"phase {phase}: pipeline ended in state {state}")
    return result


def _local_mkdirs(path: str) -> None:
    if "://" not in path:
        os.makedirs(path, exist_ok=True)


def run_clusters_phase(request: RunRequest, config: PipelineConfig, files: Sequence[InputFile],
                       options: PipelineOptions, pipeline_factory: PipelineFactory) -> dict[str, Any]:
    out = request.output
    delete_matching([FileSystems.join(out, "clusters", "*.parquet"),
                        FileSystems.join(out, "rejects", "clusters-*.parquet"),
                        FileSystems.join(out, STATS_FOLDER, "clusters.*.json")])
    started = time.monotonic()
    p = pipeline_factory(options)
    build_clusters_pipeline(p, config, files, out)
    result = _run_pipeline(p, "clusters")
    remove_temp_dirs(out, ["clusters", "rejects"])
    counters = mf.beam_counters(result)
    written = mf.cluster_summary(out)
    rejects = mf.reject_summary(out, "clusters")
    n_input = counters.get("read", {}).get("records", 0)
    cluster_rejects = {reason: rows for reason, rows in rejects["rows"].items()
                       if reason in _CLUSTER_LEVEL_REASONS}
    # File-level rows account for no record: they are listed apart from the record funnel.
    rejected_records = {reason: n for reason, n in rejects["images"].items() if reason != TRUNCATED_FILE}
    records = mf.reconcile(n_input, written["images"], rejected_records)
    truncated = mf.reject_rows(out, "clusters", TRUNCATED_FILE, ["source", "detail"])
    if truncated:
        records["truncated_files"] = [{"path": row["source"], "detail": row["detail"]} for row in truncated]
    return {
        "wall_seconds": round(time.monotonic() - started, 3),
        "records": records,
        "clusters": {"written": written["clusters"], "rejected": cluster_rejects},
        "rejects_by_stage": rejects["by_stage"],
        "counters": counters,
        "stats": read_stats(out, "clusters"),
    }


# Reasons whose reject rows stand for a whole cluster (one row, n_images images).
_CLUSTER_LEVEL_REASONS = frozenset({
    # phase 1
    "cluster_too_small", "incoherent_cluster", "duplicate_cluster", "contaminated", "caption_failed",
    "subject_failed", "prompts_failed",
    # phase 2
    "synthesis_failed", "no_usable_images", "non_finite_loss", "out_of_memory",
})



def expand_cluster_inputs(patterns: Sequence[str], phase: str = "synthesize") -> list[str]:
    """The clusters files of ``--input`` globs (phase assemble: of ``assemble.clusters``), each checked to be
    a clusters file of our schema version."""
    return expand_phase_inputs(list(patterns), "clusters", phase=phase,
                               where="--input" if phase == "synthesize" else "assemble.clusters",
                               required=("cluster_id", "images"))


def _direct_workers(options: PipelineOptions) -> int:
    from apache_beam.options.pipeline_options import DirectOptions

    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode in ("multi_processing", "multi_threading"):
        return max(1, direct.direct_num_workers or 1)
    return 1


def _seconds_summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def quantile(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"total": round(sum(values), 3), "mean": round(sum(values) / len(values), 3), "p50": quantile(0.5),
            "p90": quantile(0.9), "max": round(ordered[-1], 3)}


PER_CLUSTER_SECONDS_LIMIT = 10_000
"""The manifest lists each cluster's seconds up to this many clusters; beyond, only their distribution
(every candidate row of ``candidates/`` carries its cluster's seconds)."""


def synthesis_summary(output_dir: str) -> dict[str, Any]:
    """Clusters, candidates and per-cluster seconds as written in ``OUT/candidates/*.parquet``."""
    from dreambooth_synth.synthesizer import PARTS

    table = read_columns(FileSystems.join(output_dir, "candidates", "*.parquet"), ["cluster_id", "seconds"])
    per_cluster: dict[str, dict[str, float]] = {}
    n_candidates = 0
    if table is not None:
        n_candidates = table.num_rows
        for cluster_id, seconds in zip(table.column("cluster_id").to_pylist(), table.column("seconds").to_pylist(),
                                       strict=True):
            if cluster_id not in per_cluster and seconds is not None:
                per_cluster[cluster_id] = {k: round(float(seconds[k]), 3) for k in (*PARTS, "total")}
    summary: dict[str, Any] = {
        "clusters": len(per_cluster),
        "candidates": n_candidates,
        "seconds": {part: _seconds_summary([s[part] for s in per_cluster.values()]) for part in (*PARTS, "total")},
    }
    if len(per_cluster) <= PER_CLUSTER_SECONDS_LIMIT:
        summary["per_cluster_seconds"] = dict(sorted(per_cluster.items()))
    return summary


def run_synthesize_phase(request: RunRequest, config: PipelineConfig, files: Sequence[str],
                         options: PipelineOptions, pipeline_factory: PipelineFactory) -> dict[str, Any]:
    out = request.output
    delete_matching([FileSystems.join(out, "candidates", "*.parquet"),
                        FileSystems.join(out, "rejects", "synthesize-*.parquet")])
    started = time.monotonic()
    n_input = count_parquet_rows(files)
    LOG.info("phase synthesize: %d clusters in %d file(s); model %s", n_input, len(files), config.synth.model.name)
    p = pipeline_factory(options)
    build_synthesize_pipeline(p, config, files, out, total=n_input, workers=_direct_workers(options))
    result = _run_pipeline(p, "synthesize")
    remove_temp_dirs(out, ["candidates", "rejects"])
    counters = mf.beam_counters(result)
    written = synthesis_summary(out)
    rejects = mf.reject_summary(out, "synthesize")
    stage = counters.get("synthesize", {})
    rejected = rejects["rows"]
    accounted = written["clusters"] + sum(rejected.values())
    clusters = {
        "input": n_input,
        "synthesized": stage.get("clusters_trained", 0),
        "cached": stage.get("clusters_cached", 0),
        "rejected": rejected,
        "written": written["clusters"],
        "reconciled": n_input == accounted and written["clusters"] == stage.get("clusters_trained", 0)
        + stage.get("clusters_cached", 0),
    }
    if n_input != accounted:
        clusters["unaccounted"] = n_input - accounted
    summary = {
        "wall_seconds": round(time.monotonic() - started, 3),
        "inputs": list(files),
        "model": config.synth.model.name,
        "clusters": clusters,
        "candidates": written["candidates"],
        "seconds_per_cluster": written["seconds"],
        "counters": counters,
    }
    if "per_cluster_seconds" in written:
        summary["per_cluster_seconds"] = written["per_cluster_seconds"]
    return summary


def examples_summary(output_dir: str) -> dict[str, Any]:
    """Files, examples, row groups and bytes of ``OUT/examples/*.parquet`` (from the footers)."""
    files = matching_files(FileSystems.join(output_dir, "examples", "*.parquet"))
    rows = groups = size = 0
    for path in files:
        metadata = parquet_footer(path)[0]
        rows += metadata.num_rows
        groups += metadata.num_row_groups
        size += FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    return {"files": len(files), "examples": rows, "row_groups": groups, "bytes": size}


def expand_candidate_inputs(patterns: Sequence[str]) -> list[str]:
    """The candidates files of ``--input`` globs, each checked to be a candidates file of our schema version."""
    return expand_phase_inputs(list(patterns), "candidates", phase="assemble")


def assemble_cluster_files(request: RunRequest, config: PipelineConfig) -> list[str]:
    """The clusters files phase 3 joins the candidates with: ``assemble.clusters`` or ``OUT/clusters/``."""
    pattern = config.assemble.clusters or FileSystems.join(request.output, "clusters", "*.parquet")
    return expand_cluster_inputs([pattern], phase="assemble")


def run_assemble_phase(request: RunRequest, config: PipelineConfig, candidate_files: Sequence[str],
                       cluster_files: Sequence[str], options: PipelineOptions,
                       pipeline_factory: PipelineFactory) -> dict[str, Any]:
    out = request.output
    delete_matching([FileSystems.join(out, "examples", "*.parquet"),
                        FileSystems.join(out, "scores", "*.parquet"),
                        FileSystems.join(out, "rejects", "assemble-*.parquet"),
                        FileSystems.join(out, STATS_FOLDER, "assemble.*.json")])
    started = time.monotonic()
    n_input = count_parquet_rows(candidate_files)
    LOG.info("phase assemble: %d candidates in %d file(s), clusters from %d file(s); CLIP %s", n_input,
             len(candidate_files), len(cluster_files), model_id(config.embed))
    p = pipeline_factory(options)
    build_assemble_pipeline(p, config, candidate_files, cluster_files, out)
    result = _run_pipeline(p, "assemble")
    remove_temp_dirs(out, ["examples", "scores", "rejects"])
    counters = mf.beam_counters(result)
    examples = examples_summary(out)
    rejects = mf.reject_summary(out, "assemble")
    rejected = rejects["rows"]  # one row per candidate
    scored = read_columns(FileSystems.join(out, "scores", "*.parquet"), ["candidate_id"])
    accounted = examples["examples"] + sum(rejected.values())
    candidates: dict[str, Any] = {
        "input": n_input,
        "scored": 0 if scored is None else scored.num_rows,
        "kept_by_filter": counters.get("target_filter", {}).get("kept", 0),
        "examples": examples["examples"],
        "rejected": rejected,
        "keep_rate": round(examples["examples"] / n_input, 6) if n_input else None,
        "reconciled": n_input == accounted,
    }
    if n_input != accounted:
        candidates["unaccounted"] = n_input - accounted
    return {
        "wall_seconds": round(time.monotonic() - started, 3),
        "inputs": list(candidate_files),
        "cluster_inputs": list(cluster_files),
        "clip_model": model_id(config.embed),
        "candidates": candidates,
        "rejects_by_stage": rejects["by_stage"],
        "examples": examples,
        "counters": counters,
        "stats": read_stats(out, "assemble"),
    }


def write_card_and_report(output_dir: str, config: PipelineConfig, manifest: dict[str, Any]) -> dict[str, str]:
    """The dataset card ``OUT/README.md`` and the report ``OUT/report/index.html``, as configured."""
    from pipeline.card import write_card
    from pipeline.report import write_report

    written = {}
    if config.report.enabled:
        written["report"] = write_report(output_dir, config.report, manifest)
    if config.card.enabled:  # after the report: the card lists the files the output holds
        written["card"] = write_card(output_dir, manifest, config.card)
    return written


def run(argv: Sequence[str] | None = None, *, pipeline_factory: PipelineFactory | None = None) -> dict[str, Any]:
    """Run ``icl-pipeline run`` with ``argv`` (without the ``run`` word); returns the manifest.

    ``pipeline_factory`` builds each phase's pipeline from the Beam options (tests pass one that makes a
    ``TestPipeline``); by default it is ``beam.Pipeline(options=...)``.
    """
    import sys

    argv = list(sys.argv[2:] if argv is None else argv)  # sys.argv: icl-pipeline run ...
    request, beam_args = parse_run_args(argv)
    config = build_config(request.profile, request.config_file, request.overrides)
    _check_stage_resources(config)
    options = PipelineOptions(beam_args)
    _check_runner(options)
    factory = pipeline_factory or (lambda opts: beam.Pipeline(options=opts))

    files: list[InputFile] = []
    cluster_files: list[str] = []
    candidate_files: list[str] = []
    if request.phases[0] == "synthesize":
        cluster_files = expand_cluster_inputs(request.inputs)
    if request.phases[0] == "assemble":
        candidate_files = expand_candidate_inputs(request.inputs)
        cluster_files = assemble_cluster_files(request, config)
    if request.phases[0] == "clusters":
        files = expand_inputs(list(request.inputs))
        for input_file in files[:config.read.validate_max_files]:
            validate_input_file(input_file)
        LOG.info("%d input file(s): %s", len(files),
                 ", ".join(f"{n} {fmt}" for fmt, n in _format_counts(files).items()))

    removed = check_stale_outputs(request)
    _local_mkdirs(request.output)
    manifest: dict[str, Any] = {} if request.phases[0] == "clusters" else mf.load_manifest(request.output)
    for phase in PHASES[PHASES.index(request.phases[-1]) + 1:]:
        manifest.get("phases", {}).pop(phase, None)  # removed above: the manifest no longer describes them
    if removed:
        manifest["overwritten"] = {"at": mf.now(), "files": len(removed)}
    manifest.update({
        "pipeline": "icl-cluster-pipeline",
        "version": mf.package_versions().get("icl-cluster-pipeline"),
        "schema_version": SCHEMA_VERSION,
        "created": mf.now(),
        "command": ["icl-pipeline", "run", *argv],
        "profile": request.profile,
        "runner": options.view_as(StandardOptions).runner or "DirectRunner",
        "config": to_dict(config),
        "config_hash": config_hash(config),
        "versions": mf.package_versions(),
    })
    if files:
        manifest["inputs"] = {"patterns": list(request.inputs), "files": len(files),
                              "formats": _format_counts(files)}
    manifest.setdefault("phases", {})
    for phase in request.phases:
        try:
            _run_phase(phase, request, config, options, factory, manifest, files, cluster_files, candidate_files)
        except BaseException:
            # A failed phase leaves no temporary folders behind (its writers' half-written shards).
            removed_temp = remove_temp_dirs(request.output, PHASE_FOLDERS[phase], only_empty=False)
            if removed_temp:
                LOG.warning("phase %s failed; removed its temporary folders: %s", phase, ", ".join(removed_temp))
            raise
    return manifest


def _run_phase(phase: str, request: RunRequest, config: PipelineConfig, options: PipelineOptions,
               factory: PipelineFactory, manifest: dict[str, Any], files: list[InputFile],
               cluster_files: list[str], candidate_files: list[str]) -> None:
    """Run one phase, record it in ``manifest`` (written to OUT), and raise :class:`RunError` when its counts do
    not reconcile or its input was truncated."""
    if phase == "clusters":
        summary = run_clusters_phase(request, config, files, options, factory)
        manifest["records"] = summary["records"]
        manifest["clusters"] = summary["clusters"]
    elif phase == "synthesize":
        if not cluster_files:  # chained after the clusters phase: read what it wrote
            cluster_files = expand_cluster_inputs([FileSystems.join(request.output, "clusters", "*.parquet")])
        summary = run_synthesize_phase(request, config, cluster_files, options, factory)
    elif phase == "assemble":
        if request.phases[0] != "assemble":  # chained: what the earlier phases wrote (maybe nothing)
            candidate_files = matching_files(FileSystems.join(request.output, "candidates", "*.parquet"))
            cluster_files = assemble_cluster_files(request, config)
        summary = run_assemble_phase(request, config, candidate_files, cluster_files, options, factory)
        manifest["candidates"] = summary["candidates"]
    else:  # pragma: no cover -- guarded by request_from_args
        raise RunError(f"phase {phase} is not available")
    manifest["phases"][phase] = {"finished": mf.now(), **summary}
    manifest["funnel"] = mf.funnel(manifest)
    if phase == "assemble":
        mf.write_manifest(request.output, manifest)  # the card and the report read it
        manifest.update(write_card_and_report(request.output, config, manifest))
    mf.write_manifest(request.output, manifest)
    if phase == "clusters" and not summary["records"]["reconciled"]:
        raise RunError(f"counts do not reconcile: {summary['records']} -- some records were lost; "
                       f"this is a bug, please report it with {mf.MANIFEST}")
    truncated = summary["records"].get("truncated_files", []) if phase == "clusters" else []
    if truncated and not config.read.allow_truncated:
        listing = "; ".join(f"{t['path']}: {t['detail']}" for t in truncated)
        raise RunError(f"{len(truncated)} input file(s) end early, so this run covers only part of them: "
                       f"{listing}. Every output is written and consistent for the records that were read; "
                       f"re-fetch the file(s), or accept the shortened input with --set read.allow_truncated=true")
    if phase == "synthesize" and not summary["clusters"]["reconciled"]:
        raise RunError(f"synthesis counts do not reconcile: {summary['clusters']} -- some clusters were "
                       f"lost; this is a bug, please report it with {mf.MANIFEST}")
    if phase == "assemble" and not summary["candidates"]["reconciled"]:
        raise RunError(f"candidate counts do not reconcile: {summary['candidates']} -- some candidates were "
                       f"lost; this is a bug, please report it with {mf.MANIFEST}")


def stale_outputs(output_dir: str, phases: Sequence[str]) -> dict[str, list[str]]:
    """The files under ``output_dir`` that a run of ``phases`` would leave describing another run: everything
    written by the phases after the last one of ``phases`` (their inputs are about to change), by phase."""
    later = PHASES[PHASES.index(phases[-1]) + 1:]
    stale: dict[str, list[str]] = {}
    for phase in later:
        files = [path for pattern in PHASE_OUTPUTS[phase]
                 for path in matching_files(FileSystems.join(output_dir, *pattern.split("/")))]
        if files:
            stale[phase] = files
    return stale


def _folders_of(output_dir: str, files: Sequence[str]) -> list[str]:
    """The top-level folders (or files) under ``output_dir`` that ``files`` are in, for messages."""
    prefix = output_dir.rstrip("/") + "/"
    return sorted({path[len(prefix):].split("/", 1)[0] + ("/" if "/" in path[len(prefix):] else "")
                   for path in files if path.startswith(prefix)})


def check_stale_outputs(request: RunRequest) -> list[str]:
    """Stop a run that would leave later phases' outputs beside its own (they would no longer match the
    manifest), or with ``--overwrite`` remove exactly those; returns the files removed."""
    stale = stale_outputs(request.output, request.phases)
    if not stale:
        return []
    files = [path for paths in stale.values() for path in paths]
    if not request.overwrite:
        raise UsageError(
            f"{request.output} holds the output of phase(s) {', '.join(stale)} of an earlier run "
            f"({', '.join(_folders_of(request.output, files))}), which this run (--phases {','.join(request.phases)}) "
            f"would leave stale: they would no longer match manifest.json. Add --overwrite to remove them, run the "
            f"later phases too, or choose another --output")
    FileSystems.delete(files)
    LOG.info("--overwrite: removed %d file(s) of phase(s) %s that this run makes stale", len(files), ", ".join(stale))
    return files


UNSUPPORTED_RUNNERS = {
    "DaskRunner": "Beam 2.77's DaskRunner hands every output of a multi-output step to every consumer and computes "
                  "only the last branch of a pipeline, so dead letters and side outputs would be mixed and lost "
                  "(docs/runners.md, with minimal reproductions); use the portable runner (Flink, Spark) or "
                  "Dataflow",
}


def _check_runner(options: PipelineOptions) -> None:
    runner = options.view_as(StandardOptions).runner
    name = runner.rsplit(".", 1)[-1] if isinstance(runner, str) else type(runner).__name__ if runner else ""
    if name in UNSUPPORTED_RUNNERS:
        raise UsageError(f"--runner {name} is not supported: {UNSUPPORTED_RUNNERS[name]}")


def _check_stage_resources(config: PipelineConfig) -> None:
    """Refuse, before anything runs, a model name or tag open_clip does not know and reference images that
    do not exist (cheap checks: no weights are read)."""
    try:
        if config.embed.enabled:
            check_model_config(config.embed)
        check_references(config.decontaminate)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def _format_counts(files: Sequence[InputFile]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in files:
        counts[f.format] = counts.get(f.format, 0) + 1
    return counts
