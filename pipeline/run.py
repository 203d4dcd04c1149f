"""The ``run`` command: arguments, checks, and the phases run in order with their accounting.

:func:`run` parses the command line, validates the whole configuration and every input before building anything,
runs the requested phases in order -- each one a Beam pipeline (built by :mod:`pipeline.phases` from its stage
list) that persists its output, so a phase can also start from an earlier run's files -- and records each in
``OUT/manifest.json`` with counts that must reconcile (:mod:`pipeline.accounting`).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline import accounting
from pipeline import manifest as mf
from pipeline.config import PROFILES, ConfigError, PipelineConfig, build_config
from pipeline.console import execution_words
from pipeline.phases import ORDER, PHASE_OUTPUTS, PHASES, PhaseInputs, build_phase, check_resources
from pipeline.runners import (
    LOCAL_RUNNERS,
    UnsupportedRunnerError,
    check_runner,
    dofn_specs_cache,
    fnapi_data_plane_fix,
    local_execution,
    missing_weights,
    phase_options,
    portable_job_options,
)
from transforms.models.clip import model_id
from transforms.outputs import (
    count_parquet_rows,
    delete_matching,
    expand_phase_inputs,
    matching_files,
    remove_temp_dirs,
)
from transforms.read import InputFile, expand_inputs, validate_input_file

LOG = logging.getLogger(__name__)

DEFAULT_PHASES = ",".join(ORDER)

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
                        help="Input files (repeatable; formats by extension, mixed freely). Phase 'clusters': "
                             "crawled pairs as Parquet (.parquet), JSONL (.jsonl, .jsonl.gz) or WebDataset tar "
                             "shards (.tar, .tar.gz; img2dataset's); web pages as WARC files (.warc, .warc.gz: "
                             "each page's <img> tags, their bytes from the WARC or fetched); Parquet or JSONL of "
                             "other layouts with --set read.preset=mmc4|obelics|img2dataset|laion or a column "
                             "mapping --set 'read.columns={image_url: url, text: caption}' (MMC4 and OBELICS "
                             "documents, img2dataset's Parquet, URL lists: images without bytes are fetched, "
                             "see the fetch.* keys). Later phases: the previous phase's Parquet output (phase "
                             "synthesize: OUT/clusters/*.parquet when omitted; phase assemble: "
                             "OUT/candidates/*.parquet, with the clusters from assemble.clusters or "
                             "OUT/clusters/*.parquet). Any Beam file system path (gs://, s3://) works.")
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
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Show every log line on the console: training loss per step, Beam's own INFO lines. "
                             "A local run's whole log is in OUT/run.log either way.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Remove the outputs of later phases that this run would leave stale (for example "
                             "examples/ of an earlier run when only --phases clusters runs again). Without it, "
                             "such a run stops before it starts and names them.")
    parser.add_argument("--phases", default=DEFAULT_PHASES, metavar="PHASE[,PHASE...]",
                        help=f"Consecutive phases to run, in order: {', '.join(ORDER)}; each persists its "
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
    unknown = [p for p in phases if p not in ORDER]
    if unknown or not phases:
        raise UsageError(f"--phases {args.phases!r}: choose from {', '.join(ORDER)}")
    positions = [ORDER.index(p) for p in phases]
    if positions != list(range(positions[0], positions[0] + len(positions))):
        raise UsageError(f"--phases {args.phases!r}: phases run in the order {', '.join(ORDER)}, each once, "
                       f"without gaps (each reads the previous one's output)")
    if phases[0] == "clusters" and not args.input:
        raise UsageError("phase 'clusters' needs at least one --input")
    if phases[0] == "synthesize" and not args.input:
        args.input = [FileSystems.join(args.output, "clusters", "*.parquet")]  # the clusters phase's output
    if phases[0] == "assemble" and not args.input:
        args.input = [FileSystems.join(args.output, "candidates", "*.parquet")]  # the synthesize phase's output
    return RunRequest(tuple(args.input), args.output, args.profile, args.config_file,
                      tuple(args.overrides), phases, bool(getattr(args, "overwrite", False)))


# --- the command --------------------------------------------------------------------------------------------


def run(argv: Sequence[str] | None = None, *, pipeline_factory: PipelineFactory | None = None) -> dict[str, Any]:
    """Run ``icl-pipeline run`` with ``argv`` (without the ``run`` word); returns the manifest.

    ``pipeline_factory`` builds each phase's pipeline from the Beam options (tests pass one that makes a
    ``TestPipeline``); by default it is ``beam.Pipeline(options=...)``.
    """
    import sys

    argv = list(sys.argv[2:] if argv is None else argv)  # sys.argv: icl-pipeline run ...
    request, beam_args = parse_run_args(argv)
    config = build_config(request.profile, request.config_file, request.overrides)
    check_stage_resources(config)
    options = PipelineOptions(beam_args)
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = "DirectRunner"  # chosen here, so Beam need not say so
    check_weights(config, request.phases, options)
    try:
        check_runner(options)
        portable_job_options(options, beam_args)
    except UnsupportedRunnerError as error:
        raise UsageError(str(error)) from error
    factory = pipeline_factory or (lambda opts: beam.Pipeline(options=opts))
    first = first_phase_inputs(request, config)  # every input checked before anything runs

    removed = check_stale_outputs(request)
    _local_mkdirs(request.output)
    manifest = start_manifest(request, argv, config, options, first, removed)
    for phase in request.phases:
        try:
            inputs = first if phase == request.phases[0] else chained_inputs(phase, request, config)
            run_phase(phase, request, config, options, factory, manifest, inputs, beam_args)
        except BaseException:
            # A failed phase leaves no temporary folders behind (its writers' half-written shards).
            removed_temp = remove_temp_dirs(request.output, PHASES[phase].folders)
            if removed_temp:
                LOG.warning("phase %s failed; removed its temporary folders: %s", phase, ", ".join(removed_temp))
            raise
    return manifest


def first_phase_inputs(request: RunRequest, config: PipelineConfig) -> PhaseInputs:
    """The inputs of the first phase of the request, from ``--input``, each file checked."""
    out = request.output
    if request.phases[0] == "synthesize":
        return PhaseInputs(out, cluster_files=tuple(expand_cluster_inputs(request.inputs)))
    if request.phases[0] == "assemble":
        return PhaseInputs(out, candidate_files=tuple(expand_candidate_inputs(request.inputs)),
                           cluster_files=tuple(assemble_cluster_files(request, config)))
    files = expand_inputs(list(request.inputs))
    for input_file in files[:config.read.validate_max_files]:
        validate_input_file(input_file, config.read)
    LOG.info("%d input file(s): %s", len(files), ", ".join(f"{n} {fmt}" for fmt, n in _format_counts(files).items()))
    return PhaseInputs(out, files=tuple(files))


def chained_inputs(phase: str, request: RunRequest, config: PipelineConfig) -> PhaseInputs:
    """The inputs of a phase that runs after another one of the request: what the earlier phases wrote."""
    out = request.output
    if phase == "synthesize":
        return PhaseInputs(out, cluster_files=tuple(expand_cluster_inputs([FileSystems.join(out, "clusters",
                                                                                              "*.parquet")])))
    # assemble: the candidates just written (maybe none), with the clusters they were made from
    return PhaseInputs(out, candidate_files=tuple(matching_files(FileSystems.join(out, "candidates", "*.parquet"))),
                       cluster_files=tuple(assemble_cluster_files(request, config)))


def start_manifest(request: RunRequest, argv: Sequence[str], config: PipelineConfig, options: PipelineOptions,
                   first: PhaseInputs, removed: Sequence[str]) -> dict[str, Any]:
    """The manifest this run updates: a new one from phase clusters, else the earlier phases' one without the
    phases this run makes stale."""
    manifest: dict[str, Any] = {} if request.phases[0] == "clusters" else mf.load_manifest(request.output)
    for phase in ORDER[ORDER.index(request.phases[-1]) + 1:]:
        manifest.get("phases", {}).pop(phase, None)  # removed: the manifest no longer describes them
    if removed:
        manifest["overwritten"] = {"at": mf.now(), "files": len(removed)}
    manifest.update(mf.describe_run(argv, request.profile, options.view_as(StandardOptions).runner or "DirectRunner",
                                    config))
    if first.files:
        manifest["inputs"] = {"patterns": list(request.inputs), "files": len(first.files),
                              "formats": _format_counts(first.files)}
    manifest.setdefault("phases", {})
    return manifest


def run_phase(phase: str, request: RunRequest, config: PipelineConfig, options: PipelineOptions,
              factory: PipelineFactory, manifest: dict[str, Any], inputs: PhaseInputs,
              beam_args: Sequence[str]) -> None:
    """Run one phase on ``inputs``, record it in ``manifest`` (written to OUT), and raise :class:`RunError` when its
    counts do not reconcile or its input was truncated.

    On the local DirectRunner the phase runs in the launching process or in worker processes, as
    :func:`pipeline.runners.local_execution` decides from its input's size (``options``: the command line's)."""
    out = request.output
    # The phase's earlier files (its card and report are rewritten in place at its end).
    delete_matching([FileSystems.join(out, *pattern.split("/")) for pattern in PHASES[phase].outputs
                     if pattern.endswith((".parquet", ".json"))])
    started = time.monotonic()
    records: int | None = None
    if phase == "clusters":
        records = estimate_records(inputs.files, config.workers.min_records)
    elif phase == "synthesize":
        inputs = replace(inputs, n_input=count_parquet_rows(list(inputs.cluster_files)))
        records = inputs.n_input
    elif phase == "assemble":
        inputs = replace(inputs, n_input=count_parquet_rows(list(inputs.candidate_files)))
        records = inputs.n_input
    execution = local_execution(options, beam_args, phase, records, processes=config.workers.processes,
                                min_records=config.workers.min_records)
    if execution is not None:
        options = phase_options(beam_args, options.view_as(StandardOptions).runner, execution)
        LOG.info("phase %s: %s (%s): %s", phase, execution_words(execution.describe()), execution.mode,
                 execution.reason)
    if phase == "synthesize":
        inputs = replace(inputs, workers=execution.workers if execution is not None else 1)
        LOG.info("phase synthesize: %d clusters in %d file(s); model %s", inputs.n_input, len(inputs.cluster_files),
                 config.synth.model.name)
    elif phase == "assemble":
        LOG.info("phase assemble: %d candidates in %d file(s), clusters from %d file(s); CLIP %s", inputs.n_input,
                 len(inputs.candidate_files), len(inputs.cluster_files), model_id(config.embed))
    with dofn_specs_cache():  # Beam's inspection of each DoFn, once per DoFn instead of ~18 times
        p = factory(options)
        build_phase(p, PHASES[phase], config, inputs)
        result = run_pipeline(p, phase)
        largest = accounting.largest_elements(result, p)  # in the cache: it goes over every DoFn once more
    remove_temp_dirs(out, PHASES[phase].folders)  # the writers' and the image packs'
    summary = accounting.summarize(PHASES[phase], out, accounting.beam_counters(result), inputs, config, started)
    summary["largest_element"] = largest
    if execution is not None:
        summary["execution"] = execution.describe()
    accounting.record_phase(manifest, phase, summary)
    if phase == "assemble":
        mf.write_manifest(out, manifest)  # the card and the report read it
        manifest.update(write_card_and_report(out, config, manifest))
    mf.write_manifest(out, manifest)
    failure = accounting.failure(phase, summary, config.read.allow_truncated)
    if failure:
        raise RunError(failure)


def run_pipeline(p: beam.Pipeline, phase: str) -> Any:
    LOG.info("phase %s: running", phase)
    with fnapi_data_plane_fix():  # Beam 2.77's multi-process and local portable runners lose data otherwise
        result = p.run()
        state = result.wait_until_finish()
    if state is not None and str(state) not in ("DONE", "PipelineState.DONE"):
        raise RunError(f"phase {phase}: pipeline ended in state {state}")
    return result


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


# --- the inputs of later phases -------------------------------------------------------------------------------


def expand_cluster_inputs(patterns: Sequence[str], phase: str = "synthesize") -> list[str]:
    """The clusters files of ``--input`` globs (phase assemble: of ``assemble.clusters``), each checked to be
    a clusters file of our schema version."""
    return expand_phase_inputs(list(patterns), "clusters", phase=phase,
                               where="--input" if phase == "synthesize" else "assemble.clusters",
                               required=("cluster_id", "images"))


def expand_candidate_inputs(patterns: Sequence[str]) -> list[str]:
    """The candidates files of ``--input`` globs, each checked to be a candidates file of our schema version."""
    return expand_phase_inputs(list(patterns), "candidates", phase="assemble")


def assemble_cluster_files(request: RunRequest, config: PipelineConfig) -> list[str]:
    """The clusters files phase 3 joins the candidates with: ``assemble.clusters`` or ``OUT/clusters/``."""
    pattern = config.assemble.clusters or FileSystems.join(request.output, "clusters", "*.parquet")
    return expand_cluster_inputs([pattern], phase="assemble")


# --- checks before anything runs -------------------------------------------------------------------------------


def stale_outputs(output_dir: str, phases: Sequence[str]) -> dict[str, list[str]]:
    """The files under ``output_dir`` that a run of ``phases`` would leave describing another run: everything
    written by the phases after the last one of ``phases`` (their inputs are about to change), by phase."""
    later = ORDER[ORDER.index(phases[-1]) + 1:]
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


def weights_needed(config: PipelineConfig, phases: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(config key, Hugging Face repo, what)`` of the hub-hosted weights the requested phases load."""
    needs = []
    if config.embed.enabled and not config.embed.checkpoint and config.embed.pretrained and (
            "clusters" in phases or "assemble" in phases):
        from transforms.models.clip import pretrained_config

        repo = (pretrained_config(config.embed).get("hf_hub") or "").strip("/")
        if repo:
            needs.append(("embed.checkpoint", repo, f"the CLIP weights of {config.embed.model}/"
                                                    f"{config.embed.pretrained}"))
    name = config.synth.model.name
    if "synthesize" in phases and "/" in name and not os.path.isdir(name) and "://" not in name:
        needs.append(("synth.model.name", name, "the base model"))
    return needs


def check_weights(config: PipelineConfig, phases: Sequence[str], options: PipelineOptions) -> None:
    """On a local run, fail in the first seconds -- one line naming the key to set -- when weights the run needs
    are neither cached nor downloadable, instead of every worker retrying the download."""
    if options.view_as(StandardOptions).runner not in LOCAL_RUNNERS:
        return  # remote workers fetch for themselves; this machine's network says nothing about theirs
    problems = missing_weights(weights_needed(config, phases))
    if problems:
        raise ConfigError("; ".join(problems))


def check_stage_resources(config: PipelineConfig) -> None:
    """Refuse, before anything runs, a model name or tag open_clip does not know and reference images that
    do not exist (each stage's cheap check: no weights are read)."""
    try:
        check_resources(config)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def estimate_records(files: Sequence[InputFile], enough: int) -> int | None:
    """Records of phase 1's input files, counted until there are ``enough`` (it only decides how the phase runs):
    Parquet files from their footers, JSONL files from their lines (the first :data:`JSONL_SAMPLE_BYTES`, scaled to
    the file's size beyond them), WARC and tar files one record per :data:`BYTES_PER_RECORD`; ``None`` when a file
    cannot be measured."""
    total = 0
    for input_file in files:
        if total >= enough:
            break
        try:
            if input_file.format == "parquet":
                total += count_parquet_rows([input_file.path])
            elif input_file.format == "jsonl":
                total += _jsonl_records(input_file.path, enough - total)
            else:
                total += max(1, _file_size(input_file.path) // BYTES_PER_RECORD)
        except Exception:  # noqa: BLE001 -- only an estimate: the read reports what is wrong with the file
            return None
    return total


BYTES_PER_RECORD = 100_000
"""For the estimate of a WARC or tar input's records: about one web photo's bytes."""

JSONL_SAMPLE_BYTES = 8 << 20
"""How much of a JSONL file the estimate reads: a URL list's lines are ~200 bytes, a line with its photo ~130 kB."""


def _file_size(path: str) -> int:
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def _jsonl_records(path: str, enough: int) -> int:
    """Lines of a JSONL file (``.gz`` too), read until ``enough`` of them or :data:`JSONL_SAMPLE_BYTES`, then
    scaled to the file's size (of a compressed file: its compressed size, so an estimate on the low side)."""
    lines = read = 0
    with FileSystems.open(path) as handle:
        for line in iter(handle.readline, b""):
            lines, read = lines + 1, read + len(line)
            if lines >= enough:
                return lines
            if read >= JSONL_SAMPLE_BYTES:
                return max(lines, _file_size(path) * lines // read)
    return lines


def _local_mkdirs(path: str) -> None:
    if "://" not in path:
        os.makedirs(path, exist_ok=True)


def _format_counts(files: Sequence[InputFile]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in files:
        counts[f.format] = counts.get(f.format, 0) + 1
    return counts
