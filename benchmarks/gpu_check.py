"""The GPU check: everything the project needs to know from a GPU, in one run of at most 8 minutes.

GPU time comes in short windows, so this one command answers it all and writes it to
``benchmarks/results/gpu.json`` (and a summary to stdout), part after part, so that whatever ran is kept
even if the window closes early:

1. ``cuda_tests`` -- the tests marked ``gpu`` (skipped on CPU-only machines), through pytest.
2. ``embed`` -- ``benchmarks/bench_embed.py --device cuda``: CLIP ViT-L-14 in bf16 with random weights, a
   batch-size sweep, then the Beam stage against a plain loop at the best size.
3. ``synth`` -- ``benchmarks/synth_speed.py``: SD-1.5-sized DreamBooth-LoRA (rank 4, 512 px, 500 steps
   scaled from a measured fraction, 16 renders at 25 steps) per cluster -- latents, train, sample, GPU
   memory peak and after each cluster -- for the plain diffusers loop and each speed switch, and the two
   ways of running several clusters per GPU (one UNet batch of adapter slots, or worker processes).
4. ``synth_compiled`` -- the same with the UNet compiled, in a process of its own (compilation is the one
   step whose time is hard to bound; if it overruns, only it is lost).

On a fresh GPU machine, from the repository root::

    pip install -c constraints.txt -e '.[dev]' && bash benchmarks/gpu_check.sh

``--cpu-smoke`` runs the same code with tiny shapes on CPU (about a minute; the test suite runs it so that
this script cannot rot before a GPU arrives). Its output goes to a temporary file: CPU figures never
overwrite ``benchmarks/results/gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import header, write_results  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "gpu.json"
GPU_BUDGET = 465.0
"""Seconds for the whole check on a GPU: 8 minutes, less what starting Python and writing take."""
SMOKE_BUDGET = 240.0
"""A cap, not the expected time (about a minute on 2 idle cores): a busy shared machine must not cut it short."""


def gpu_test_files() -> list[str]:
    """Test modules that hold tests marked ``gpu`` (collecting only those keeps the part short)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text(encoding="utf-8"))


SMOKE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""On CPU, tiny models gain nothing from more threads, and on a busy machine threads that lose their cores stall
each other (the tiny CLIP model ran 50x slower with two threads on two busy cores)."""
ENV: dict[str, str] = {}


def _run(command: list[str], timeout: float, log: Path) -> tuple[int | None, float]:
    """Run ``command`` in the repository root with its output in ``log``; ``(exit code or None on timeout,
    seconds)``."""
    started = time.monotonic()
    env = {**os.environ, **ENV,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with open(log, "w", encoding="utf-8") as handle:
        process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            code: int | None = process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the part and any worker processes it started
            process.wait()
            code = None
    return code, round(time.monotonic() - started, 2)


def _tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def cuda_tests(python: str, timeout: float, work: Path) -> dict[str, Any]:
    files = gpu_test_files()
    junit, log = work / "cuda-tests.xml", work / "cuda-tests.log"
    code, seconds = _run([python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
                          f"--junitxml={junit}", *files], timeout, log)
    part: dict[str, Any] = {"files": files, "seconds": seconds, "exit_code": code}
    if not junit.exists():
        return {**part, "status": "timeout" if code is None else "error", "log_tail": _tail(log)}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = suite.findall("testcase") if suite is not None else []
    failed = []
    for case in cases:
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}: {problem.get('message', '')}"[:400])
    skipped = sum(c.find("skipped") is not None for c in cases)
    status = "timeout" if code is None else ("failed" if failed or code not in (0, 5) else "ok")
    return {**part, "status": status, "tests": len(cases), "passed": len(cases) - len(failed) - skipped,
            "failed": failed, "skipped": skipped, **({"log_tail": _tail(log)} if status != "ok" else {})}


def embed(python: str, smoke: bool, timeout: float, work: Path) -> dict[str, Any]:
    output, log = work / "embed.json", work / "embed.log"
    if smoke:
        options = ["--device", "cpu", "--sweep", "--model", "tiny-random", "--precision", "fp32",
                   "--gpu-batch-sizes", "8", "--sweep-images", "32", "--pool-images", "16", "--repeats", "1"]
    else:
        # Two sizes around the known optimum of ViT-L-14 bf16 on a large GPU, one repeat: the window is short.
        options = ["--device", "cuda", "--gpu-batch-sizes", "256,1024", "--sweep-images", "4096", "--repeats", "1"]
    code, seconds = _run([python, str(REPO / "benchmarks" / "bench_embed.py"), "--output", str(output), *options],
                         timeout, log)
    if code != 0 or not output.exists():
        return {"status": "timeout" if code is None else "error", "seconds": seconds, "exit_code": code,
                "log_tail": _tail(log)}
    results = json.loads(output.read_text(encoding="utf-8"))
    return {"status": "ok", "seconds": seconds, "results": results["results"],
            "batch_size_sweep_images_per_s": results.get("batch_size_sweep_images_per_s")}


def synth(python: str, smoke: bool, budget: float, timeout: float, work: Path, model_dir: Path,
          only: str = "", skip: str = "", name: str = "synth") -> dict[str, Any]:
    output, log = work / f"{name}.json", work / f"{name}.log"
    command = [python, "-m", "benchmarks.synth_speed", "--output", str(output), "--budget", f"{budget:.0f}",
               "--model-dir", str(model_dir)]
    if smoke:
        command += ["--smoke", "--compile-backend", "eager", "--threads", "1"]
    if only:
        command += ["--only", only]
    if skip:
        command += ["--skip", skip]
    code, seconds = _run(command, timeout, log)
    part: dict[str, Any] = {"status": "ok" if code == 0 else ("timeout" if code is None else "error"),
                            "seconds": seconds, "exit_code": code}
    if output.exists():  # written after each variant: a part cut short keeps what it measured
        part.update(json.loads(output.read_text(encoding="utf-8")))
    failed = [n for n, v in part.get("variants", {}).items() if "error" in v]
    if failed and part["status"] == "ok":
        part["status"] = "failed"
    if part["status"] != "ok":
        part["log_tail"] = _tail(log)
    return part


def summary(report: dict[str, Any]) -> str:
    """The check's results as the lines a person reads first."""
    lines = [f"GPU check ({report['mode']}) on {report['machine'].get('cuda') or 'CPU'}: "
             f"{report.get('wall_seconds', 0):.0f} s of {report['budget_s']:.0f} s"]
    if report["mode"] == "cpu-smoke":
        lines.append("  (tiny shapes on CPU: these figures check that the code runs, they say nothing of a GPU)")
    tests = report["parts"].get("cuda_tests")
    if tests:
        lines.append(f"  CUDA tests: {tests['status']} -- {tests.get('passed', 0)} passed, "
                     f"{len(tests.get('failed', []))} failed, {tests.get('skipped', 0)} skipped "
                     f"({tests['seconds']:.0f} s)")
        lines += [f"    FAILED {f}" for f in tests.get("failed", [])]
    part = report["parts"].get("embed")
    if part:
        for r in part.get("results", []):
            lines.append(f"  embed {r['model']} {r['precision']} batch {r['batch_size']}: plain loop "
                         f"{r['plain_loop_images_per_s']:.0f} img/s, Beam stage {r['beam_images_per_s']:.0f} img/s "
                         f"(ratio {r['ratio']:.2f})")
        if part["status"] != "ok":
            lines.append(f"  embed: {part['status']}")
    part = report["parts"].get("synth")
    if part:
        recipe = part.get("recipe", {})
        lines.append(f"  synthesis per cluster ({recipe.get('train_steps')} steps from {recipe.get('measure_steps')} "
                     f"measured, {recipe.get('renders')} renders at {recipe.get('sample_steps')} steps, "
                     f"{recipe.get('resolution')} px): {part['status']}")
        lines.append(f"    {'variant':32} {'latents':>8} {'train':>8} {'sample':>8} {'other':>7} {'total':>8} "
                     f"{'clus/GPU-h':>10} {'x plain':>7} {'peak MiB':>9} {'growth':>6}")
        for name, v in part.get("variants", {}).items():
            if "error" in v:
                lines.append(f"    {name:32} ERROR {v['error'][:80]}")
                continue
            s = v["seconds_per_cluster"]
            peak, growth = v.get("gpu_peak_mib"), v.get("gpu_growth_mib")
            lines.append(f"    {name:32} {s['latents']:8.2f} {s['train']:8.2f} {s['sample']:8.2f} {s['other']:7.2f} "
                         f"{s['total']:8.2f} {v['clusters_per_gpu_hour']:10.0f} {v.get('speedup_vs_plain') or 0:7.2f} "
                         f"{'-' if peak is None else f'{peak:.0f}':>9} {'-' if growth is None else f'{growth:.1f}':>6}")
        for name, why in part.get("skipped", {}).items():
            lines.append(f"    {name:32} skipped: {why}")
        several, best = part.get("several_clusters_per_gpu"), part.get("best")
        if several:
            lines.append(f"  several clusters per GPU: {several.get('more_clusters_per_gpu_hour')} gives more "
                         f"clusters per GPU-hour ({several.get('best_of_each_way')}; one at a time: "
                         f"{several.get('one_at_a_time_clusters_per_gpu_hour')})")
        if best:
            lines.append(f"  best: {best['variant']}, {best['gpu_seconds_per_cluster']:.1f} GPU-s per cluster, "
                         f"{best['clusters_per_gpu_hour']:.0f} clusters per GPU-hour, {best['speedup_vs_plain']}x "
                         f"the plain loop; target 15 s met: {best['target_15s_met']}; memory flat: "
                         f"{part.get('memory_flat')}")
    return "\n".join(lines)


def merge_compiled(report: dict[str, Any]) -> None:
    """Fold the compiled variant into the synthesis part and compare everything again."""
    from benchmarks.synth_speed import compare

    synth_part, compiled = report["parts"].get("synth"), report["parts"].get("synth_compiled")
    if not synth_part or not compiled:
        return
    variants = synth_part.setdefault("variants", {})
    for name, value in compiled.get("variants", {}).items():
        variants[name] = value
    for name, why in compiled.get("skipped", {}).items():
        synth_part.setdefault("skipped", {})[name] = why
    synth_part.update(compare(variants))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code, tiny shapes, on CPU")
    parser.add_argument("--output", default="", help=f"results file (default: {RESULTS.relative_to(REPO)}; "
                                                     "with --cpu-smoke, a temporary file)")
    parser.add_argument("--budget", type=float, default=0.0, help="seconds for the whole check (default: "
                                                                  f"{GPU_BUDGET:.0f} on a GPU, {SMOKE_BUDGET:.0f} "
                                                                  "with --cpu-smoke)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter the parts run with")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    output = Path(args.output) if args.output else (
        Path(tempfile.gettempdir()) / "gpu-check-smoke.json" if smoke else RESULTS)
    if smoke and output.resolve() == RESULTS.resolve():
        parser.error(f"--cpu-smoke never writes {RESULTS.relative_to(REPO)}: its figures are not a GPU's")
    import torch

    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; --cpu-smoke checks this script on a CPU")
    budget = args.budget or (SMOKE_BUDGET if smoke else GPU_BUDGET)
    if smoke:
        ENV.update(SMOKE_ENV)
    started = time.time()
    deadline = started + budget
    report: dict[str, Any] = {**header("gpu"), "mode": "cpu-smoke" if smoke else "gpu", "budget_s": budget,
                              "command": "bash benchmarks/gpu_check.sh" + (" --cpu-smoke" if smoke else ""),
                              "parts": {}}

    def left() -> float:
        return deadline - time.time()

    def save() -> None:
        report["wall_seconds"] = round(time.time() - started, 1)
        write_results(output, report)

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        # Caps per part (seconds): the synthesis figures matter most, and the compiled UNet goes last in a
        # process of its own, with what is left (at least its reserve).
        caps = {"cuda_tests": 60.0, "embed": 60.0, "compiled_reserve": 70.0} if smoke else \
            {"cuda_tests": 75.0, "embed": 90.0, "compiled_reserve": 160.0}
        report["parts"]["cuda_tests"] = cuda_tests(args.python, min(caps["cuda_tests"], left()), work)
        save()
        report["parts"]["embed"] = embed(args.python, smoke, min(caps["embed"], left()), work)
        save()
        main_budget = max(left() - caps["compiled_reserve"], 30.0)
        report["parts"]["synth"] = synth(args.python, smoke, main_budget - 10, main_budget, work, work / "model",
                                         skip="compiled")
        save()
        report["parts"]["synth_compiled"] = synth(args.python, smoke, left() - 10, max(left(), 10.0), work,
                                                  work / "model", only="compiled", name="synth_compiled")
        merge_compiled(report)
        save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(summary(report))
    print(f"results: {output}")
    parts = report["parts"]
    ok = all(p.get("status") == "ok" for p in parts.values()) and parts["synth"].get("memory_flat", False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
