"""The runner layer: Beam 2.77's FnApiRunner data-plane bug and our fix; refused runners.

The multi-process DirectRunner and Beam's local job service send each stage's input to their SDK harnesses
through a stream whose time-based flush thread races with the sending thread and drops whole chunks
(pipeline/runners.py). These tests reproduce it with Beam's own classes and show that
``fnapi_data_plane_fix`` -- what ``icl-pipeline run`` and the job service of ``pipeline.runners`` apply --
delivers every record. If Beam fixes the stream, the first test fails: then the fix can go.
"""

from __future__ import annotations

import os

import apache_beam as beam
import pytest
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.runners import UnsupportedRunnerError, check_runner, dofn_specs_cache, fnapi_data_plane_fix


def test_beams_time_based_stream_drops_chunks_written_while_it_flushes() -> None:
    from apache_beam.runners.worker.data_plane import TimeBasedBufferingClosableOutputStream

    chunk = os.urandom(4 << 20)
    sent: list[int] = []
    lost = 0
    for _ in range(3):  # a race: try a few times; one loss proves it
        sent.clear()
        stream = TimeBasedBufferingClosableOutputStream(close_callback=lambda d: sent.append(len(d)),
                                                        flush_callback=lambda d: sent.append(len(d)),
                                                        time_flush_threshold_ms=2)
        for _ in range(40):
            stream.write(chunk)
        stream.close()
        lost += 40 * len(chunk) - sum(sent)
        if lost:
            break
    assert lost > 0, "Beam's stream delivered every byte: the bug may be fixed upstream (see pipeline/runners.py)"


def _records_seen(n: int, size: int) -> int:
    """A stage whose input is materialized by the runner (it waits for a side input) and sent to 2 SDK workers."""
    options = PipelineOptions(["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"])
    p = beam.Pipeline(options=options)
    big = p | beam.Create(range(n)) | beam.Reshuffle() | beam.Map(lambda i, size: os.urandom(size), size)
    total = big | beam.combiners.Count.Globally()
    # A lambda: pickled by value, so the SDK workers need not import this test module.
    _ = big | beam.Map(lambda element, n: Metrics.counter("test", "seen").inc() or len(element),
                       beam.pvalue.AsSingleton(total))
    result = p.run()
    result.wait_until_finish()
    return sum(c.committed for c in result.metrics().query()["counters"] if c.key.metric.name == "seen")


@pytest.mark.slow
def test_fix_delivers_every_record_to_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    # Beam's period is 1 s: the race needs a stage input that takes longer to send. A 1 ms period shows it with a
    # small input; the fix sets the period to 0 (no flush thread) whatever it was.
    monkeypatch.setattr(worker_handlers, "DATA_BUFFER_TIME_LIMIT_MS", 1)
    with fnapi_data_plane_fix():
        assert worker_handlers.DATA_BUFFER_TIME_LIMIT_MS == 0
        assert _records_seen(200, 1_000_000) == 200
    assert worker_handlers.DATA_BUFFER_TIME_LIMIT_MS == 1  # restored


class _Buffered(beam.DoFn):
    """A stateful DoFn with a timer: the specs Beam must keep finding through the cache."""

    BUFFER = beam.transforms.userstate.BagStateSpec("buffer", beam.coders.VarIntCoder())
    FLUSH = beam.transforms.userstate.TimerSpec("flush", beam.TimeDomain.WATERMARK)

    def process(self, element, buffer=beam.DoFn.StateParam(BUFFER), flush=beam.DoFn.TimerParam(FLUSH)):
        buffer.add(element[1])
        flush.set(0)

    @beam.transforms.userstate.on_timer(FLUSH)
    def emit(self, buffer=beam.DoFn.StateParam(BUFFER)):
        yield sum(buffer.read())


def test_dofn_specs_cache_answers_as_beam_does_once_per_dofn(monkeypatch: pytest.MonkeyPatch) -> None:
    from apache_beam.transforms import userstate

    from pipeline.config import build_config
    from pipeline.phases import CLUSTERS, PhaseInputs, build_phase
    from tests.conftest import SAMPLE
    from transforms.read import InputFile

    beams_own = userstate.get_dofn_specs
    inspected: list[int] = []
    monkeypatch.setattr(userstate, "get_dofn_specs", lambda dofn: inspected.append(id(dofn)) or beams_own(dofn))
    p = beam.Pipeline()
    sample = (InputFile(str(SAMPLE), "parquet"),)
    build_phase(p, CLUSTERS, build_config(profile="demo"), PhaseInputs("unused-output", files=sample))
    stateful = p | beam.Create([("k", 1)]) | beam.ParDo(_Buffered())
    dofns = [t.transform.fn for t in _applied(p) if isinstance(t.transform, beam.ParDo)]
    assert len(dofns) > 100 and stateful.producer.transform.fn in dofns
    expected = [beams_own(dofn) for dofn in dofns]
    with dofn_specs_cache():
        inspected.clear()
        for _ in range(3):  # the same DoFn asked again and again, as Beam does
            assert [userstate.get_dofn_specs(dofn) for dofn in dofns] == expected
            stateful_ones = [bool(state or timers) for state, timers in expected]
            assert [userstate.is_stateful_dofn(dofn) for dofn in dofns] == stateful_ones
        assert sorted(inspected) == sorted(id(d) for d in dofns)  # each inspected once
        userstate.get_dofn_specs(dofns[-1])[0].clear()  # a caller changing its answer changes no later one
        assert userstate.get_dofn_specs(dofns[-1]) == expected[-1]
    assert expected[-1][0] and expected[-1][1]  # the stateful DoFn's state and timer were found
    assert userstate.get_dofn_specs.__name__ == "<lambda>"  # what was there before is back


def _applied(p: beam.Pipeline) -> list:
    found = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node) -> None:
            found.append(node)

    p.visit(Visitor())
    return found


def test_dask_runner_is_refused_with_the_reason() -> None:
    with pytest.raises(UnsupportedRunnerError, match="docs/runners.md"):
        check_runner(PipelineOptions(["--runner", "DaskRunner"]))
    check_runner(PipelineOptions(["--runner", "DirectRunner"]))
    check_runner(PipelineOptions([]))


def test_portable_job_gets_a_long_deadline_and_an_unreachable_endpoint_fails_fast() -> None:
    import socket

    from apache_beam.options.pipeline_options import PortableOptions

    from pipeline.runners import JOB_DEADLINE_S, portable_job_options

    with socket.socket() as server:  # something listening on loopback, as a job service would
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        args = ["--runner", "PortableRunner", "--job_endpoint", f"127.0.0.1:{port}"]
        options = PipelineOptions(args)
        portable_job_options(options, args)
        assert options.view_as(PortableOptions).job_server_timeout == JOB_DEADLINE_S
        mine = [*args, "--job_server_timeout", "90"]
        options = PipelineOptions(mine)
        portable_job_options(options, mine)
        assert options.view_as(PortableOptions).job_server_timeout == 90  # the user's choice stands
    gone = ["--runner", "PortableRunner", "--job_endpoint", f"127.0.0.1:{port}"]
    with pytest.raises(UnsupportedRunnerError, match="no job service answers"):
        portable_job_options(PipelineOptions(gone), gone, connect_timeout_s=2)


def test_offline_local_run_fails_at_once_naming_the_keys(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local profile's real weights, not cached, no hub (HF_HUB_OFFLINE: nothing leaves this machine): one
    error before any pipeline is built, naming the keys to set."""
    import time

    from pipeline.config import ConfigError
    from pipeline.run import run
    from tests.conftest import SAMPLE

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        run(["--profile", "local", "--input", str(SAMPLE), "--output", str(tmp_path / "out")])
    assert time.monotonic() - started < 60
    message = str(error.value)
    assert "set embed.checkpoint to local files" in message and "set synth.model.name to local files" in message
    assert not (tmp_path / "out" / "clusters").exists()


def test_missing_weights_asks_the_hub_only_when_the_cache_lacks_them(tmp_path, monkeypatch) -> None:
    from pipeline.runners import missing_weights

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    asked = []
    problems = missing_weights([("embed.checkpoint", "org/not-cached", "the CLIP weights")],
                               hub_reachable=lambda: asked.append(1) or False)
    assert asked == [1] and problems == ["the CLIP weights (org/not-cached): not in the Hugging Face cache, and the "
                                         "hub cannot be reached (offline, or HF_HUB_OFFLINE is set); set "
                                         "embed.checkpoint to local files"]
    assert missing_weights([("k", "org/x", "w")], hub_reachable=lambda: True) == []  # downloadable: the run fetches


# --- how a local phase runs: in this process or in worker processes ----------------------------------------


def _execution(beam_args: list[str], phase: str = "clusters", records: int | None = 10_000, *, processes: int = 0,
               min_records: int = 3000, cores: int = 4):
    from apache_beam.options.pipeline_options import StandardOptions

    from pipeline.runners import local_execution

    options = PipelineOptions(beam_args)
    options.view_as(StandardOptions).runner = options.view_as(StandardOptions).runner or "DirectRunner"
    return local_execution(options, beam_args, phase, records, processes=processes, min_records=min_records,
                           cores=cores)


def test_large_inputs_use_every_core_and_small_ones_one_process() -> None:
    big, small = _execution([], records=3000), _execution([], records=2999)
    assert (big.mode, big.workers) == ("multi_processing", 4) and "at least 3,000 records" in big.reason
    assert (small.mode, small.workers) == ("in_memory", 1) and "under workers.min_records 3,000" in small.reason
    assert _execution([], records=None).mode == "multi_processing"  # unknown size: counted as large
    assert _execution([], "assemble", 5000).workers == 4
    assert _execution([], processes=3).workers == 3
    assert _execution([], records=10, min_records=0).mode == "multi_processing"
    # Synthesis keeps one process (its model uses the cores, or the GPU); so does a one-core machine.
    assert _execution([], "synthesize", 10_000).mode == "in_memory"
    assert _execution([], cores=1).mode == "in_memory" and _execution([], cores=4, processes=1).mode == "in_memory"
    # Other runners decide for themselves.
    assert _execution(["--runner", "PortableRunner"]) is None and _execution(["--runner=DataflowRunner"]) is None


def test_beams_own_flags_override_the_workers_section() -> None:
    def of(args: list[str], **kw) -> tuple[str, int]:
        execution = _execution(args, **kw)
        return execution.mode, execution.workers

    assert of(["--direct_running_mode", "in_memory"], records=10**6) == ("in_memory", 1)
    assert of(["--direct_running_mode=multi_processing"], records=5) == ("multi_processing", 4)  # one per core
    assert of(["--direct_running_mode=multi_processing"], processes=3) == ("multi_processing", 3)
    assert of(["--direct_running_mode", "multi_threading", "--direct_num_workers", "3"]) == ("multi_threading", 3)
    assert of(["--direct_num_workers", "3"], records=5) == ("multi_processing", 3)  # Beam would run one process
    assert of(["--direct-num-workers=1"]) == ("in_memory", 1)
    assert of(["--direct_num_workers=0"]) == ("multi_processing", 4)  # Beam's 0: every core
    assert of(["--direct_num_workers", "2"], phase="synthesize") == ("multi_processing", 2)


def test_phase_options_add_quiet_worker_logging_unless_given() -> None:
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    from pipeline.runners import LocalExecution, phase_options

    def options(args: list[str], execution: LocalExecution) -> dict:
        opts = phase_options(args, "DirectRunner", execution)
        assert opts.view_as(StandardOptions).runner == "DirectRunner"
        direct = opts.view_as(DirectOptions)
        return {**opts.get_all_options(drop_default=True), "mode": direct.direct_running_mode,
                "workers": direct.direct_num_workers}

    multi = options(["--temp_location", "/tmp/x"], LocalExecution("multi_processing", 3, "test"))
    assert (multi["mode"], multi["workers"], multi["temp_location"]) == ("multi_processing", 3, "/tmp/x")
    assert multi["default_sdk_harness_log_level"] == "WARNING"
    assert multi["sdk_harness_log_level_overrides"]["transforms"] == "INFO"
    mine = options(["--default_sdk_harness_log_level=DEBUG"], LocalExecution("multi_processing", 2, "test"))
    assert mine["default_sdk_harness_log_level"] == "DEBUG"
    single = options([], LocalExecution("in_memory", 1, "test"))
    assert (single["mode"], single["workers"]) == ("in_memory", 1)
    assert "default_sdk_harness_log_level" not in single


def test_phase_one_input_is_counted_from_parquet_footers_and_file_sizes(tmp_path, sample_rows,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.run import BYTES_PER_RECORD, estimate_records
    from tests.conftest import SAMPLE
    from tests.formats import write_jsonl
    from transforms.read import InputFile

    sample = InputFile(str(SAMPLE), "parquet")
    assert estimate_records([sample], 10**6) == 282  # the sample's rows, from its footer
    warc = tmp_path / "pages.warc.gz"
    warc.write_bytes(os.urandom(3 * BYTES_PER_RECORD + 5))
    assert estimate_records([sample, InputFile(str(warc), "warc")], 10**6) == 282 + 3
    assert estimate_records([sample, sample], 100) == 282  # counting stops once there are enough
    urls = tmp_path / "urls.jsonl.gz"  # a URL list: lines of ~100 bytes, counted as lines
    write_jsonl([{"page_url": f"https://a.example/{i}", "image_url": f"https://a.example/{i}.jpg", "text": None,
                  "image": None} for i in range(5000)], str(urls), gz=True)
    assert estimate_records([InputFile(str(urls), "jsonl")], 10**6) == 5000
    assert estimate_records([InputFile(str(urls), "jsonl")], 1000) == 1000
    photos = write_jsonl(sample_rows, str(tmp_path / "photos.jsonl"))  # lines of ~100 kB: a sample, scaled
    monkeypatch.setattr("pipeline.run.JSONL_SAMPLE_BYTES", 4 << 20)
    assert 0.75 * 282 <= estimate_records([InputFile(photos, "jsonl")], 10**6) <= 1.25 * 282
    assert estimate_records([InputFile(str(tmp_path / "gone.parquet"), "parquet")], 100) is None


def test_worker_log_records_relayed_by_beam_become_records_again() -> None:
    """What the multi-process DirectRunner relays from a worker (Beam's LogEntry as text on its ``local_job_service``
    logger) reads on the console as the worker's own record; Beam's harness lines and other libraries' INFO go."""
    import logging

    from apache_beam.portability.api import beam_fn_api_pb2

    import transforms.read
    from pipeline.cli import _WorkerRecords

    info, warn = beam_fn_api_pb2.LogEntry.Severity.INFO, beam_fn_api_pb2.LogEntry.Severity.WARN

    def relayed(message: str, path: str, severity: int) -> logging.LogRecord:
        entry = beam_fn_api_pb2.LogEntry(message=message, log_location=f"{path}:42", severity=severity)
        entry.timestamp.seconds, entry.timestamp.nanos = 1_800_000_000, 250_000_000
        level = logging.WARNING if severity == warn else logging.INFO  # as Beam maps it
        return logging.LogRecord(_WorkerRecords.RELAYED, level, __file__, 1, "Worker: %s",
                                 (str(entry).replace("\n", " "),), None)

    quiet, verbose = _WorkerRecords(), _WorkerRecords(verbose=True)
    ours = relayed('read: 282 records from "a b".parquet', transforms.read.__file__, info)
    assert quiet.filter(ours)
    assert (ours.name, ours.getMessage(), ours.lineno, ours.processName) == (
        "transforms.read", 'read: 282 records from "a b".parquet', 42, "worker")
    assert ours.created == 1_800_000_000.25 and ours.msecs == 250
    beam_info = ("Creating state cache", "/site-packages/apache_beam/runners/worker/statecache.py", info)
    assert not quiet.filter(relayed(*beam_info)) and verbose.filter(relayed(*beam_info))
    harness = ("No semi_persistent_directory found: ...", "/site-packages/apache_beam/x.py", warn)
    assert not quiet.filter(relayed(*harness)) and not verbose.filter(relayed(*harness))
    problem = relayed("could not open the pack", "/site-packages/somelib/x.py", warn)
    assert quiet.filter(problem) and problem.levelno == logging.WARNING  # a worker's warning always shows
    other = logging.LogRecord(_WorkerRecords.RELAYED, logging.INFO, __file__, 1, "Completed job in %s s", (3,), None)
    assert not quiet.filter(other) and verbose.filter(other)  # the service's own lines: as Beam's other INFO lines
