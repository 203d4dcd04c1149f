#!/usr/bin/env python3
"""Phase 1 at scale: throughput, memory and correctness on each execution path, against a plain loop.

    python benchmarks/bench_scale.py --output benchmarks/results/scale.json            # 10^4 and 5x10^4 records
    python benchmarks/bench_scale.py --sizes 2000 --modes in_memory mp2 --output /tmp/scale.json   # a quick look

For each size it builds a crawl (``benchmarks/crawl_gen.py``: about 10 real photos of one DreamBench subject per
page, every image a distinct crop/size/colour variant, plus one hot gallery page of ``--hot-page`` images) and
runs ``icl-pipeline run --phases clusters --profile demo`` (the demo's tiny CLIP and offline backends) as a
subprocess, in each mode:

* ``in_memory``: ``--direct_running_mode in_memory``, everything in the launching process (Beam's default);
* ``mp1``, ``mp2``: ``--direct_running_mode multi_processing --direct_num_workers 1|2`` (SDK harness processes,
  as on Flink and Dataflow);
* ``portable``: ``PortableRunner`` with Beam's job service and a worker pool started here on loopback
  (``pipeline/runners.py``), ``--direct_num_workers 2``.

It records wall time, records/s (input records over the phase's own wall time), whether the counts reconcile (a
run that does not is a failure, not a figure), the largest element Beam sampled, and the peak resident memory of
the runner process and of each worker process (sampled every 0.2 s with psutil). ``--repeat N`` runs the modes of
``--repeat-modes`` N times each (the no-loss check: every run must reconcile); their figures are the median.

The baseline is a plain single-process loop that calls the same per-record functions on the same records
(``--plain-records`` of them): decode and normalize every record (``normalize_image``, which includes the
pHash), and, for the images a page keeps under the cap, the CLIP preprocessing and forward pass and the face
and NSFW detector, on batches of the same sizes. Ratios are per core (records/s of the mode divided by its
worker processes). ``--plain-only`` measures the baseline again into an existing results file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import header, write_results  # noqa: E402
from benchmarks.crawl_gen import build_crawl  # noqa: E402

MODES = ("in_memory", "mp1", "mp2", "portable")
WORKERS = {"in_memory": 1, "mp1": 1, "mp2": 2, "portable": 2}


# --- memory ---------------------------------------------------------------------------------------------


class PeakMemory(threading.Thread):
    """Samples the resident memory and CPU time of a process tree; keeps each process's peak memory, its last CPU
    time (user + system seconds) and the role it plays."""

    def __init__(self, roots: list[int], interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.interval = interval
        self.peaks: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.roles: dict[int, str] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            for root in self.roots:
                try:
                    tree = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                for process in tree:
                    try:
                        rss = process.memory_info().rss
                        times = process.cpu_times()
                        self.cpu[process.pid] = times.user + times.system
                        if process.pid not in self.roles:
                            self.roles[process.pid] = _role(process.cmdline(), process.pid in self.roots)
                    except psutil.Error:
                        continue
                    self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), rss)
            self._halt.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self._halt.set()
        self.join()
        by_role: dict[str, list[float]] = {}
        for pid, peak in self.peaks.items():
            if peak >= 32 * 2**20:  # not the shells and launchers around the real processes
                by_role.setdefault(self.roles.get(pid, "other"), []).append(round(peak / 2**20, 1))
        return {role: sorted(values, reverse=True) for role, values in sorted(by_role.items())}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds per role, summed over its processes (as last sampled: within ``interval`` of the end)."""
        by_role: dict[str, float] = {}
        for pid, seconds in self.cpu.items():
            role = self.roles.get(pid, "other")
            by_role[role] = round(by_role.get(role, 0.0) + seconds, 1)
        return dict(sorted(by_role.items()))


def _role(cmdline: list[str], is_root: bool) -> str:
    text = " ".join(cmdline)
    if "sdk_worker" in text or "SdkHarness" in text:
        return "worker"
    if "pipeline.runners job" in text:
        return "job_service"
    if "pipeline.runners pool" in text:
        return "worker_pool"
    return "runner" if is_root else "other"


# --- the pipeline runs ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def run_mode(mode: str, crawl: str, output: str, log: Path, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    args = [sys.executable, "-m", "pipeline.cli", "run", "--profile", "demo", "--phases", "clusters",
            "--input", os.path.join(crawl, "*.parquet"), "--output", output, "--overwrite",
            *(a for o in overrides for a in ("--set", o))]
    services: list[subprocess.Popen] = []
    if mode == "in_memory":
        args += ["--direct_running_mode", "in_memory"]
    elif mode in ("mp1", "mp2"):
        args += ["--direct_running_mode", "multi_processing", "--direct_num_workers", str(WORKERS[mode])]
    elif mode == "portable":
        job, pool = _free_port(), _free_port()
        for name, port in (("job", job), ("pool", pool)):
            services.append(subprocess.Popen([sys.executable, "-m", "pipeline.runners", name, str(port)], cwd=REPO,
                                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_for_port(port)
        args += ["--runner", "PortableRunner", "--job_endpoint", f"localhost:{job}", "--environment_type",
                 "EXTERNAL", "--environment_config", f"localhost:{pool}", "--direct_num_workers",
                 str(WORKERS[mode]), "--sdk_worker_parallelism", str(WORKERS[mode])]
    started = time.monotonic()
    with open(log, "wb") as handle:
        process = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=handle, stderr=subprocess.STDOUT)
        memory = PeakMemory([process.pid, *(s.pid for s in services)])
        memory.start()
        code = process.wait()
    wall = time.monotonic() - started
    peaks = memory.stop()
    for service in services:
        service.terminate()
        service.wait(timeout=30)
    result: dict[str, Any] = {"exit_status": code, "wall_s": round(wall, 1), "peak_rss_mib": peaks,
                              "cpu_s": memory.cpu_seconds(), "workers": WORKERS[mode]}
    manifest_path = Path(output) / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        records = manifest.get("records", {})
        phase = manifest.get("phases", {}).get("clusters", {})
        result.update({"reconciled": bool(records.get("reconciled")), "records": records,
                       "phase_wall_s": phase.get("wall_seconds"),
                       "clusters_written": manifest.get("clusters", {}).get("written"),
                       "largest_element": phase.get("largest_element", {})})
        if records.get("reconciled") and phase.get("wall_seconds"):
            result["records_per_s"] = round(records["input"] / phase["wall_seconds"], 2)
    else:
        result["reconciled"] = False
    result["ok"] = code == 0 and result["reconciled"]
    if not result["ok"]:
        result["log_tail"] = log.read_text(errors="replace")[-3000:]
    return result


# --- the plain loop -------------------------------------------------------------------------------------


def plain_loop(crawl: str, limit: int, batch_size: int, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """The same per-record work without Beam, on the records the pipeline does it to: every record is read and
    normalized (+pHash); the images a page keeps under ``group.max_images_per_page`` (the pipeline caps a page
    before any model sees it) go through the CLIP preprocessing and forward pass and -- when the demo profile
    runs the safety stage -- the face and NSFW detector (NudeNet, same input size and batch size)."""
    import glob

    import pyarrow.parquet as pq
    import torch

    from pipeline.config import build_config
    from transforms.models.clip import decode_image, image_transform, load_image_encoder
    from transforms.normalize import Rejected, normalize_image
    from transforms.safety import decode_array

    config = build_config("demo", overrides=list(overrides))
    cap = config.group.max_images_per_page
    encoder = load_image_encoder(config.embed)
    transform = image_transform(config.embed)
    detector = None
    if config.detector.enabled:
        from transforms.models.detectors import load_detector

        detector = load_detector(config.detector)
    done, modelled, batch, pixels, per_page = 0, 0, [], [], {}
    started = time.perf_counter()
    for path in sorted(glob.glob(os.path.join(crawl, "*.parquet"))):
        for chunk in pq.ParquetFile(path).iter_batches(batch_size=64, columns=["page_url", "image"]):
            for page, data in zip(chunk.column(0).to_pylist(), chunk.column(1).to_pylist(), strict=True):
                done += 1
                try:
                    normalized = normalize_image(data, config.normalize)
                except Rejected:
                    continue
                per_page[page] = per_page.get(page, 0) + 1
                if per_page[page] <= cap:
                    modelled += 1
                    batch.append(transform(decode_image(normalized.image)))
                    if detector is not None:
                        pixels.append(decode_array(normalized.image))
                if len(batch) == batch_size:
                    encoder.embed(torch.stack(batch))
                    batch = []
                if len(pixels) == config.detector.batch_size:
                    detector.detect(pixels)
                    pixels = []
                if done >= limit:
                    break
            if done >= limit:
                break
        if done >= limit:
            break
    if batch:
        encoder.embed(torch.stack(batch))
    if pixels:
        detector.detect(pixels)
    seconds = time.perf_counter() - started
    return {"records": done, "records_through_models": modelled, "seconds": round(seconds, 2),
            "records_per_s": round(done / seconds, 2), "batch_size": batch_size,
            "work": ["normalize", "phash", "page cap", "clip"] + (["detector"] if detector else [])}


def rescore(results: dict[str, Any], workdir: Path, plain_records: int, batch_size: int) -> None:
    """Measure the plain loop again on each size's kept crawl and recompute the ratios to it."""
    overrides = tuple(results.get("overrides", ()))
    for size, entry in results["sizes"].items():
        entry["plain_loop"] = plain_loop(str(workdir / f"crawl-{size}"), min(int(size), plain_records), batch_size,
                                         overrides)
        print(f"{size} records: plain loop {entry['plain_loop']['records_per_s']} records/s", flush=True)
        for run in entry["runs"].values():
            if run.get("records_per_s"):
                run["per_core_vs_plain"] = round(run["records_per_s"] / run["workers"]
                                                 / entry["plain_loop"]["records_per_s"], 3)


def _summary(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's figures: the median run (by records/s) of the runs that reconciled, and every run's outcome;
    ``ok`` only when every run reconciled."""
    good = sorted((a for a in attempts if a["ok"]), key=lambda a: a.get("records_per_s") or 0)
    chosen = dict(good[len(good) // 2]) if good else dict(attempts[-1])
    chosen["ok"] = all(a["ok"] for a in attempts)
    if len(attempts) > 1:
        chosen["attempts"] = [{k: a.get(k) for k in ("ok", "wall_s", "records_per_s", "reconciled")}
                              | {"unaccounted": a.get("records", {}).get("unaccounted"),
                                 "largest_element_bytes": a.get("largest_element", {}).get("max_bytes")}
                              for a in attempts]
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--hot-page", type=int, default=5000, help="images of the one gallery page")
    parser.add_argument("--sides", type=int, nargs=2, default=(288, 448), metavar=("MIN", "MAX"),
                        help="side of the crawl's images in pixels")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each of --repeat-modes (default 1)")
    parser.add_argument("--repeat-modes", nargs="+", default=["mp2", "portable"], choices=MODES)
    parser.add_argument("--plain-records", type=int, default=3000, help="records the plain loop times")
    parser.add_argument("--workdir", default=None, help="where crawls and outputs go (default: a temporary folder); "
                        "crawls there are kept, and reused by a later run of the same sizes")
    parser.add_argument("--keep", action="store_true", help="keep the crawls and outputs")
    parser.add_argument("--output", default="benchmarks/results/scale.json")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a configuration override for every run (the demo profile's otherwise)")
    parser.add_argument("--plain-only", action="store_true",
                        help="only measure the plain loop again, on the crawls kept in --workdir, and update the "
                             "ratios of --output's runs")
    args = parser.parse_args(argv)

    from pipeline.config import build_config

    if args.plain_only:
        if not args.workdir:
            parser.error("--plain-only needs the --workdir that holds the crawls")
        results = json.loads(Path(args.output).read_text(encoding="utf-8"))
        rescore(results, Path(args.workdir), args.plain_records, build_config("demo").embed.batch_size)
        write_results(args.output, results)
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    command = ["python", "benchmarks/bench_scale.py", *(sys.argv[1:] if argv is None else argv)]
    results: dict[str, Any] = {**header("scale"), "command": command,
                               "profile": "demo", "overrides": args.set, "phase": "clusters", "sizes": {},
                               "modes": args.modes}
    batch_size = build_config("demo").embed.batch_size
    try:
        for size in args.sizes:
            crawl = str(workdir / f"crawl-{size}")
            started = time.monotonic()
            spec = {"records": size, "hot_page": min(args.hot_page, size // 2), "sides": list(args.sides)}
            marker = Path(crawl) / ".crawl.json"  # a crawl of the same spec kept in --workdir is reused
            if not (marker.exists() and json.loads(marker.read_text()) == spec):
                build_crawl(crawl, size, hot_page=spec["hot_page"], sides=tuple(args.sides))
                marker.write_text(json.dumps(spec))
            entry: dict[str, Any] = {"records": size, "hot_page": min(args.hot_page, size // 2),
                                     "image_sides": list(args.sides),
                                     "crawl_build_s": round(time.monotonic() - started, 1), "runs": {}}
            entry["plain_loop"] = plain_loop(crawl, min(size, args.plain_records), batch_size, tuple(args.set))
            print(f"{size} records: plain loop {entry['plain_loop']['records_per_s']} records/s", flush=True)
            for mode in args.modes:
                attempts = []
                for attempt in range(args.repeat if mode in args.repeat_modes else 1):
                    out = str(workdir / f"out-{size}-{mode}")
                    run = run_mode(mode, crawl, out, workdir / f"log-{size}-{mode}-{attempt}.txt", tuple(args.set))
                    attempts.append(run)
                    print(f"  {mode:9s} #{attempt + 1} ok={run['ok']} wall={run['wall_s']} s "
                          f"records/s={run.get('records_per_s')} peak MiB={run['peak_rss_mib']} "
                          f"largest element={run.get('largest_element', {}).get('max_bytes')}", flush=True)
                    if not args.keep:
                        shutil.rmtree(out, ignore_errors=True)
                run = _summary(attempts)
                if run.get("records_per_s"):
                    run["per_core_vs_plain"] = round(run["records_per_s"] / run["workers"]
                                                     / entry["plain_loop"]["records_per_s"], 3)
                entry["runs"][mode] = run
                results["sizes"][str(size)] = entry
                write_results(args.output, results)  # each mode as soon as it is measured
            runs = entry["runs"]
            base = runs.get("in_memory", {}).get("records_per_s")
            if base:
                entry["speedup_vs_in_memory"] = {m: round(r["records_per_s"] / base, 3)
                                                 for m, r in runs.items() if r.get("records_per_s")}
            results["sizes"][str(size)] = entry
            write_results(args.output, results)  # each size as soon as it is measured
            if not args.keep and not args.workdir:
                shutil.rmtree(crawl, ignore_errors=True)
        sizes = [str(s) for s in args.sizes]
        if len(sizes) >= 2:
            small, large = results["sizes"][sizes[0]]["runs"], results["sizes"][sizes[-1]]["runs"]
            growth = {}
            for mode in args.modes:
                a = (small.get(mode, {}).get("peak_rss_mib") or {}).get("worker")
                b = (large.get(mode, {}).get("peak_rss_mib") or {}).get("worker")
                if a and b:
                    growth[mode] = round(max(b) / max(a), 3)
            results["worker_peak_rss_growth"] = growth
    finally:
        write_results(args.output, results)
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
