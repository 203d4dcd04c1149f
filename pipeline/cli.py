"""The ``icl-pipeline`` command.

::

    icl-pipeline run --input GLOB [--input GLOB ...] --output DIR [--profile demo|local|dataflow]
                     [--config FILE.yaml] [--set section.key=value ...] [--phases clusters[,...]]
                     [any Beam pipeline option: --runner, --direct_num_workers, --project, ...]
    icl-pipeline config [--profile P] [--config FILE.yaml] [--set ...] [--list]
    icl-pipeline report OUT [--set report.key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from pipeline.config import PROFILES

DESCRIPTION = """\
Build in-context-learning clusters and synthesized training examples for subject-driven
text-to-image models from crawled image-text pairs, on Apache Beam (DirectRunner, Dataflow,
Flink, Spark).

commands:
  run      run the pipeline phases (clusters, synthesize, assemble; all by default) on inputs
  config   print the effective configuration, or every key with its default (--list)
  report   write the visual report OUT/report/index.html of an output folder

Run 'icl-pipeline COMMAND --help' for a command's options.
"""

RUN_EPILOG = """\
Every option not listed above goes to Apache Beam as a pipeline option, for example
  --runner DataflowRunner --project P --region R --temp_location gs://B/tmp --setup_file ./setup.py
  --direct_running_mode multi_processing --direct_num_workers 4
Configuration is built from the profile, then --config, then each --set; every key with its
default and meaning: 'icl-pipeline config --list'.

Exit status: 0 on success, 2 for invalid arguments, configuration or input files, 1 when a
phase fails or its counts do not reconcile.
"""


def _config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icl-pipeline config", allow_abbrev=False,
        description="Print the effective configuration (profile, then --config, then --set) as YAML.")
    parser.add_argument("--profile", default="demo", choices=PROFILES)
    parser.add_argument("--config", dest="config_file", metavar="FILE.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--list", action="store_true", help="List every key with its type, default and meaning.")
    return parser


def _cmd_config(argv: Sequence[str]) -> int:
    import yaml

    from pipeline.config import build_config, describe, to_dict

    args = _config_parser().parse_args(argv)
    if args.list:
        for doc in describe():
            print(f"{doc.key}  ({doc.type}, default {doc.default!r})\n    {doc.help}")
        return 0
    config = build_config(args.profile, args.config_file, args.overrides)
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0


def _cmd_run(argv: Sequence[str], verbose: bool = False) -> int:
    # The run's modules (every stage, Beam, the model libraries) load here, not for the other commands.
    from pipeline.console import funnel_table, output_listing
    from pipeline.run import RunError, UsageError, parse_run_args, run
    from transforms.common import InputFormatError

    handler = None
    with contextlib.ExitStack() as stack:
        try:
            request = parse_run_args(list(argv))[0]
            handler = log_to_file(request.output)
            if handler is not None and not verbose:
                stack.enter_context(children_stderr_to(os.path.join(request.output, WORKERS_LOG)))
            manifest = run(list(argv))
        except (InputFormatError, UsageError) as error:
            return _failed("run", error, 2)
        except RunError as error:
            return _failed("run", error, 1)
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()
    phases = list(request.phases)  # this invocation's, not an earlier run's
    for phase in phases:
        print(funnel_table(manifest, phase))
        print()
    print(output_listing(_display_path(manifest["command"]), phases))
    for key, what in (("card", "Dataset card"), ("report", "Report")):
        if manifest.get(key):
            print(f"{what}: {_display_file(manifest[key])}")
    return 0


def _display_file(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icl-pipeline report", allow_abbrev=False,
        description="Write the visual report OUT/report/index.html of an output folder: funnel, score histograms "
                    "with their bounds, galleries of examples, rejected candidates and clusters. Works for any "
                    "output, also one of phase clusters only. Settings: the run's `report` section "
                    "(manifest.json), then --set.")
    parser.add_argument("output", metavar="OUT", help="The output folder of a run (any Beam file system path).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="report.KEY=VALUE",
                        help="Override a report setting, e.g. --set report.examples=100.")
    return parser


def _cmd_report(argv: Sequence[str]) -> int:
    import dataclasses

    from pipeline.config import ConfigError, from_dict, parse_override
    from pipeline.manifest import load_manifest
    from pipeline.report import ReportConfig, write_report

    args = _report_parser().parse_args(argv)
    manifest = load_manifest(args.output)
    if not manifest:
        raise ConfigError(f"{args.output}: no manifest.json (not the output folder of a run)")
    # The run's settings, as far as this version knows them (a manifest of another version may differ).
    known = {f.name for f in dataclasses.fields(ReportConfig)}
    section = {k: v for k, v in (manifest.get("config", {}).get("report") or {}).items() if k in known}
    for override in args.overrides:
        path, value = parse_override(override)
        if path[0] != "report" or len(path) != 2:
            raise ConfigError(f"--set {override!r}: only report.KEY settings apply here")
        section[path[1]] = value
    config = from_dict(ReportConfig, section, "report")
    path = write_report(args.output, config, manifest)
    print(f"Report: {_display_file(path)}")
    return 0


def _display_path(command: list[str]) -> str:
    output = command[command.index("--output") + 1] if "--output" in command else "?"
    return output if "://" in output else os.path.abspath(output)


def _run_help() -> None:
    from pipeline.run import add_run_arguments

    parser = argparse.ArgumentParser(
        prog="icl-pipeline run", allow_abbrev=False, epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run pipeline phases over crawled image-text pairs and write Parquet outputs.")
    add_run_arguments(parser)
    parser.print_help()


class _DropBeamImportNoise(logging.Filter):
    """Beam logs this on import whenever its optional GCP extra is not installed; it is not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("apitools not found")


class _DropOpenClipInfo(logging.Filter):
    """open_clip logs every step of building a model at INFO on the root logger; its warnings stay, except the two
    it gives for random weights, which our own load announces once (a tiny random model is the demo's choice)."""

    _RANDOM_WEIGHTS = ("No pretrained weights loaded", "Local config loaded, but no CLIP weights found")

    def filter(self, record: logging.LogRecord) -> bool:
        if "open_clip" not in record.pathname:
            return True
        return record.levelno >= logging.WARNING and not record.getMessage().startswith(self._RANDOM_WEIGHTS)


class _ConsoleDetail(logging.Filter):
    """What the console leaves to the log file and --verbose: the training library's per-step and per-subject
    lines (the synthesis stage reports progress itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith("dreambooth_synth")


class _WorkerRecords(logging.Filter):
    """The multi-process DirectRunner relays the log records of its worker processes to the launching process, each as
    one line of protocol-buffer text (``Worker: severity: ... message: "..." log_location: "path:line"``) on Beam's
    ``local_job_service`` logger. This turns each back into the record it was -- level, module, message, time -- so
    that the console's filters and format apply to it as to this process's own, and drops what is not the pipeline's
    below WARNING, and the harness's start-up warnings (with ``verbose``, only the start-up warnings go)."""

    RELAYED = "apache_beam.runners.portability.local_job_service"
    OURS = ("transforms", "pipeline", "dreambooth_synth", "schemas")
    _STARTUP = ("No semi_persistent_directory found", "Discarding unparseable args")

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "Worker: %s" or not isinstance(record.args, tuple) or len(record.args) != 1:
            return self.verbose or record.levelno >= logging.WARNING  # the service's own lines, as Beam's others
        from apache_beam.portability.api import beam_fn_api_pb2
        from google.protobuf import text_format

        entry = beam_fn_api_pb2.LogEntry()
        try:
            text_format.Parse(str(record.args[0]), entry)
        except text_format.ParseError:
            return True  # shown as Beam wrote it
        path, _, line = entry.log_location.rpartition(":")
        record.pathname, record.lineno = path, int(line) if line.isdigit() else 0
        record.name = module_of(path)
        record.msg, record.args = entry.message + (f"\n{entry.trace.rstrip()}" if entry.trace else ""), None
        record.created = entry.timestamp.seconds + entry.timestamp.nanos / 1e9
        record.msecs = entry.timestamp.nanos // 1_000_000
        record.processName = "worker"
        if entry.message.startswith(self._STARTUP):
            return False
        return self.verbose or record.levelno >= logging.WARNING or record.name.split(".")[0] in self.OURS


def module_of(path: str) -> str:
    """The module name of a source file's path (``.../transforms/read.py`` -> ``transforms.read``): relative to the
    project's root or to the longest ``sys.path`` entry holding it; the file's name otherwise."""
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *(p for p in sys.path if p)]
    holding = [root.rstrip(os.sep) + os.sep for root in roots if path.startswith(root.rstrip(os.sep) + os.sep)]
    relative = path[len(max(holding, key=len)):] if holding else os.path.basename(path)
    module = relative.removesuffix(".py").replace(os.sep, ".")
    return module.removesuffix(".__init__")


WORKERS_LOG = "workers.log"
"""What processes the run starts (Beam's worker processes) print on their own standard error, under OUT."""


@contextlib.contextmanager
def children_stderr_to(path: str):
    """Point file descriptor 2 -- which every process this one starts inherits, Beam's worker processes included -- at
    ``path``, while this process's own console (``sys.stderr`` and the logging handlers on it) stays on the terminal.

    A worker process prints its harness's start-up lines and its log on its standard error, where they would cover
    the console; their log records also reach this process (:class:`_WorkerRecords`), so the console loses nothing
    of the pipeline's. ``path`` is removed afterwards if nothing was written to it. Without a real standard error
    (output captured by a test), nothing is redirected.
    """
    try:
        if sys.stderr.fileno() != 2:
            raise OSError
    except (AttributeError, OSError, ValueError):
        yield
        return
    original = sys.stderr
    original.flush()
    console = os.fdopen(os.dup(2), "w", buffering=1, encoding=original.encoding, errors="backslashreplace")
    moved = [h for h in logging.getLogger().handlers
             if type(h) is logging.StreamHandler and h.stream is original]
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(target, 2)
    os.close(target)
    for h in moved:
        h.setStream(console)
    sys.stderr = console
    try:
        yield
    finally:
        console.flush()
        os.dup2(console.fileno(), 2)
        sys.stderr = original
        for h in moved:
            h.setStream(original)
        console.close()
        with contextlib.suppress(OSError):
            if os.path.getsize(path) == 0:
                os.remove(path)


LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO, verbose: bool = False) -> None:
    """Console logging for the command; call before Apache Beam is imported."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropBeamImportNoise())
        handler.addFilter(_DropOpenClipInfo())
        if not verbose:
            handler.addFilter(_ConsoleDetail())
    # Beam's own INFO lines (options, stage fusion, ...) drown the pipeline's progress.
    logging.getLogger("apache_beam").setLevel(logging.INFO if verbose else logging.WARNING)
    relayed = logging.getLogger(_WorkerRecords.RELAYED)  # worker processes' records: the pipeline's progress too
    relayed.setLevel(logging.INFO)
    for old in [f for f in relayed.filters if isinstance(f, _WorkerRecords)]:
        relayed.removeFilter(old)
    relayed.addFilter(_WorkerRecords(verbose))


def log_to_file(output_dir: str) -> logging.Handler | None:
    """Also write the whole log (training loss included) to ``OUT/run.log`` when the output is local; returns the
    handler (the caller removes it when the run ends)."""
    if "://" in output_dir:
        return None
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "run.log")
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_DropBeamImportNoise())
    handler.addFilter(_DropOpenClipInfo())
    logging.getLogger().addHandler(handler)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or "-v" in argv
    argv = [a for a in argv if a not in ("--verbose", "-v")]
    configure_logging(verbose=verbose)

    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: icl-pipeline {{run,config,report}} ...\n\n{DESCRIPTION}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    from pipeline.config import ConfigError

    try:
        if command == "run":
            if "-h" in rest or "--help" in rest:
                _run_help()
                return 0
            return _cmd_run(rest, verbose)
        if command == "config":
            return _cmd_config(rest)
        if command == "report":
            return _cmd_report(rest)
    except ConfigError as error:
        return _failed(command, error, 2)
    print(f"icl-pipeline: unknown command {command!r}\n\n{DESCRIPTION}", file=sys.stderr)
    return 2


def _failed(command: str, error: Exception, status: int) -> int:
    """Exit status 2: invalid arguments, configuration or input files; 1: a phase failed or did not reconcile."""
    print(f"icl-pipeline {command}: error: {error}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
