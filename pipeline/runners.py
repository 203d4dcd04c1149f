"""What the pipeline needs of the Beam runners it is launched on, and Beam's local portability services.

* :func:`check_runner` refuses runners that cannot run the pipeline (Beam 2.77's ``DaskRunner``; see
  docs/runners.md).
* :func:`local_execution` decides where a phase runs on the local DirectRunner -- in the launching process, or in
  one worker process per core once its input is large enough to repay their start-up -- and
  :func:`phase_options` gives the phase's Beam options (with quiet worker logging).
* :func:`fnapi_data_plane_fix` works around a data-loss bug of Beam 2.77's ``FnApiRunner`` -- the engine of the
  multi-process DirectRunner and of Beam's local job service (the portable path on one machine). The runner
  sends each stage's input to its SDK harness processes through a ``TimeBasedBufferingClosableOutputStream``
  (``worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = 1000``); that stream's periodic flush thread calls ``get()``
  and then ``_clear()`` on the buffer without holding any lock against the ``write()`` calls of the sending
  thread, so a chunk written between the two is discarded without a trace. It happens whenever writing one
  stage input takes longer than the flush period: whole ~10 MB chunks of records vanish (about 140 crawled
  images each), in a different stage on every run. Setting the period to 0 makes the runner use Beam's
  size-based stream, which has no flush thread. ``tests/test_runners.py`` reproduces the bug with Beam's own
  classes and checks the fix.
* :func:`dofn_specs_cache` removes a cost of Beam's, not a bug: Beam looks for state and timer parameters by
  reading the signature of every method of a DoFn (``userstate.get_dofn_specs``), and does so about 18 times per
  DoFn per run (graph construction, three ``to_runner_api`` passes, the DirectRunner's checks, each bundle): 2.3 s
  of an 8 s phase-1 run of the bundled sample, the same on every run whatever its size. While active, the answer
  is computed once per DoFn instance.
* :func:`portable_job_options` works around another: Beam's ``PortableRunner`` (and ``FlinkRunner``,
  ``SparkRunner``, which extend it) opens the job's state and message streams with ``job_server_timeout`` (300 s
  by default) as their gRPC deadline, so every job that runs longer fails with ``DEADLINE_EXCEEDED`` after all its
  work. Unless the user sets ``--job_server_timeout``, a run gets a deadline of a week, after checking that the
  job endpoint answers (so an unreachable endpoint still fails in seconds, with a clear message).
* ``python -m pipeline.runners job PORT`` / ``pool PORT`` run Beam's job service and worker pool (the layout of
  a Flink cluster, on one machine) with that fix, every gRPC server bound to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

UNSUPPORTED_RUNNERS = {
    "DaskRunner": "Beam 2.77's DaskRunner hands every output of a multi-output step to every consumer and computes "
                  "only the last branch of a pipeline, so dead letters and side outputs would be mixed and lost "
                  "(docs/runners.md, with minimal reproductions); use the portable runner (Flink, Spark) or "
                  "Dataflow",
}


class UnsupportedRunnerError(ValueError):
    """The pipeline cannot run on the requested runner."""


def check_runner(options: Any) -> None:
    """Raise :class:`UnsupportedRunnerError` for a runner that cannot run the pipeline (``options``: Beam's)."""
    name = _runner_name(options)
    if name in UNSUPPORTED_RUNNERS:
        raise UnsupportedRunnerError(f"--runner {name} is not supported: {UNSUPPORTED_RUNNERS[name]}")


PORTABLE_RUNNERS = ("PortableRunner", "FlinkRunner", "SparkRunner")

JOB_DEADLINE_S = 7 * 24 * 3600
"""The state-stream deadline of a portable job when the user sets none: longer than any phase runs."""


def _runner_name(options: Any) -> str:
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner
    return runner.rsplit(".", 1)[-1] if isinstance(runner, str) else type(runner).__name__ if runner else ""


def portable_job_options(options: Any, beam_args: list[str], connect_timeout_s: float = 30.0) -> None:
    """On a portable runner: refuse an unreachable ``--job_endpoint`` at once, and lift the state-stream deadline
    (see the module docstring) unless ``--job_server_timeout`` was given."""
    from apache_beam.options.pipeline_options import PortableOptions

    if _runner_name(options) not in PORTABLE_RUNNERS:
        return
    portable = options.view_as(PortableOptions)
    endpoint = portable.job_endpoint
    if endpoint and endpoint != "embed":
        import socket

        host, _, port = endpoint.rpartition(":")
        try:
            with socket.create_connection((host or "localhost", int(port)), timeout=connect_timeout_s):
                pass
        except (OSError, ValueError) as error:
            raise UnsupportedRunnerError(f"--job_endpoint {endpoint}: no job service answers there ({error}); "
                                         f"start one (docs/runners.md) or check the address") from error
    if _given("--job_server_timeout", beam_args) is None:
        portable.job_server_timeout = JOB_DEADLINE_S


LOCAL_RUNNERS = ("DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner")

WORKER_LOG_FLAGS = {
    "--default_sdk_harness_log_level": "WARNING",
    "--sdk_harness_log_level_overrides": '{"transforms": "INFO", "pipeline": "INFO", "dreambooth_synth": "INFO"}',
}
"""What worker processes log when the user sets nothing: the pipeline's own progress at INFO, everything else
(Beam's harness, model libraries) from WARNING."""

SIZED_PHASES = ("clusters", "assemble")
"""Phases whose work grows with their records (images, candidates): the ones the ``workers`` section spreads over
processes. Phase synthesize runs in one process unless the command line says otherwise: its model already uses
every core (torch's threads) or the GPU."""


@dataclass(frozen=True)
class LocalExecution:
    """How a phase runs on the local DirectRunner: ``mode`` (``in_memory`` or Beam's ``multi_processing`` /
    ``multi_threading``), ``workers`` and why (for the manifest and the console)."""

    mode: str
    workers: int
    reason: str

    @property
    def flags(self) -> dict[str, str]:
        """Beam's own flags for this execution (given on the command line, they decided it)."""
        return {"--direct_running_mode": self.mode, "--direct_num_workers": str(self.workers)}

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "workers": self.workers, "reason": self.reason}


def _given(flag: str, beam_args: Sequence[str]) -> str | None:
    """The value of ``flag`` (``--flag V`` or ``--flag=V``, dashes or underscores) in ``beam_args``, else ``None``."""
    names = (flag, flag.replace("_", "-"))
    value = None
    for i, arg in enumerate(beam_args):
        name, eq, rest = arg.partition("=")
        if name in names:
            value = rest if eq else (beam_args[i + 1] if i + 1 < len(beam_args) else "")
    return value


def local_execution(options: Any, beam_args: Sequence[str], phase: str, records: int | None, *, processes: int,
                    min_records: int, cores: int | None = None) -> LocalExecution | None:
    """How ``phase`` runs when the runner is the local DirectRunner (``None`` for any other runner).

    Beam's ``--direct_running_mode`` / ``--direct_num_workers`` decide when given (a mode of several workers without
    a count gets ``processes``, else one per core; a count above 1 without a mode runs ``multi_processing``: Beam
    would otherwise run one process and warn). Otherwise phases clusters and assemble run in ``processes`` worker
    processes (0: one per core) when their input holds at least ``min_records`` records (``records``: ``None`` when
    unknown, counted as large) and the machine has more than one core; anything else runs in the launching process.
    """
    if _runner_name(options) not in LOCAL_RUNNERS:
        return None
    cores = cores or os.cpu_count() or 1
    per_core = processes or cores
    mode, count = _given("--direct_running_mode", beam_args), _given("--direct_num_workers", beam_args)
    if mode is not None or count is not None:
        n = int(count) if count not in (None, "") else None
        if n == 0:
            n = cores  # Beam's meaning of 0
        if mode is None:
            mode = "multi_processing" if (n or 1) > 1 else "in_memory"
        if mode == "in_memory":
            return LocalExecution(mode, 1, "--direct_running_mode in_memory" if count is None else
                                  f"--direct_num_workers {count}")
        return LocalExecution(mode, n or per_core, "--direct_running_mode/--direct_num_workers")
    if phase not in SIZED_PHASES:
        return LocalExecution("in_memory", 1, f"phase {phase}: its model uses every core itself")
    if per_core < 2:
        return LocalExecution("in_memory", 1, f"{cores} core(s), workers.processes {processes}")
    if records is None:
        return LocalExecution("multi_processing", per_core, "an input of unknown size")
    if records < min_records:
        return LocalExecution("in_memory", 1, f"{records:,} records, under workers.min_records {min_records:,}")
    return LocalExecution("multi_processing", per_core, f"at least {min_records:,} records (workers.min_records)")


def phase_options(beam_args: Sequence[str], runner: str, execution: LocalExecution) -> Any:
    """Beam's options of one phase: the command line's, with the phase's execution on the local DirectRunner and,
    for worker processes, quiet worker logging, each flag unless the command line sets it."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    flags = {**execution.flags, **(WORKER_LOG_FLAGS if execution.mode == "multi_processing" else {})}
    extra = [f"{flag}={value}" for flag, value in flags.items() if _given(flag, beam_args) is None]
    options = PipelineOptions([*beam_args, *extra])
    options.view_as(StandardOptions).runner = runner
    return options


@contextlib.contextmanager
def fnapi_data_plane_fix() -> Iterator[None]:
    """While active, the FnApiRunner's data plane uses size-based buffering (no racing flush thread).

    The value is read when the runner starts its gRPC servers, inside ``Pipeline.run()``: wrap the run with this
    (it restores Beam's default afterwards).
    """
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    previous = worker_handlers.DATA_BUFFER_TIME_LIMIT_MS
    worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = 0
    try:
        yield
    finally:
        worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = previous


@contextlib.contextmanager
def dofn_specs_cache() -> Iterator[None]:
    """While active, Beam's ``userstate.get_dofn_specs`` inspects each DoFn instance once (see the module
    docstring); afterwards Beam's own function is back.

    An instance's methods and their default arguments (where Beam's state and timer parameters live) do not change
    once it is built, so its answer does not either. Entries hold a weak reference to their DoFn: a new object that
    reuses a dead one's ``id`` is inspected afresh. Answers are copies, so a caller that changes its sets changes no
    later answer.
    """
    import weakref

    from apache_beam.transforms import userstate

    original = userstate.get_dofn_specs
    cache: dict[int, tuple[Any, frozenset, frozenset]] = {}

    def get_dofn_specs(dofn: Any) -> tuple[set, set]:
        entry = cache.get(id(dofn))
        if entry is not None and entry[0]() is dofn:
            return set(entry[1]), set(entry[2])
        state, timers = original(dofn)
        try:
            cache[id(dofn)] = (weakref.ref(dofn), frozenset(state), frozenset(timers))
        except TypeError:  # an object without weak references: not cached
            pass
        return state, timers

    userstate.get_dofn_specs = get_dofn_specs
    try:
        yield
    finally:
        userstate.get_dofn_specs = original


def bind_loopback_only() -> None:
    """Make every gRPC server of this process bind 127.0.0.1 (Beam's services bind ``[::]:PORT``, every interface)."""
    import grpc._server

    if getattr(grpc._server._Server.add_insecure_port, "__name__", "") == "add_insecure_port_loopback":
        return
    original = grpc._server._Server.add_insecure_port

    def add_insecure_port_loopback(self: Any, address: str) -> int:
        host, _, port = address.rpartition(":")
        if host in ("[::]", "0.0.0.0", ""):
            address = f"127.0.0.1:{port}"
        return original(self, address)

    grpc._server._Server.add_insecure_port = add_insecure_port_loopback


def main(argv: list[str]) -> None:
    """``job PORT [beam args]``: Beam's local job service; ``pool PORT [beam args]``: a Beam worker pool."""
    if len(argv) < 2 or argv[0] not in ("job", "pool"):
        raise SystemExit("usage: python -m pipeline.runners job|pool PORT [Beam's own arguments]")
    service, port = argv[0], argv[1]
    bind_loopback_only()
    if service == "job":
        from apache_beam.runners.portability import local_job_service_main

        with fnapi_data_plane_fix():  # the job service runs pipelines with the FnApiRunner
            local_job_service_main.run(["--port", port, *argv[2:]])
    else:
        from apache_beam.runners.worker import worker_pool_main

        worker_pool_main.main(["--service_port", port, *argv[2:]])


if __name__ == "__main__":
    main(sys.argv[1:])


# --- model weights a local run needs --------------------------------------------------------------------

HUB_HOST = ("huggingface.co", 443)


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    import os
    import socket

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout_s):
            return True
    except OSError:
        return False


def missing_weights(needs: list[tuple[str, str, str]], hub_reachable: Any = _hub_reachable) -> list[str]:
    """For ``(key, Hugging Face repo, what)`` of the weights a run needs: one message per repo that is neither in
    the local Hugging Face cache nor reachable (``HF_HUB_OFFLINE`` set, or the hub does not answer)."""
    from huggingface_hub import snapshot_download

    missing = []
    reachable: bool | None = None
    for key, repo, what in needs:
        try:
            snapshot_download(repo, local_files_only=True)
            continue
        except Exception:  # noqa: BLE001 -- not in the cache (its exception types vary between releases)
            pass
        if reachable is None:
            reachable = hub_reachable()
        if not reachable:
            missing.append(f"{what} ({repo}): not in the Hugging Face cache, and the hub cannot be reached "
                           f"(offline, or HF_HUB_OFFLINE is set); set {key} to local files")
    return missing
