"""``make demo-web``: from raw web pages to clusters and examples, on a loopback web site this script runs itself.

1. Starts the loopback site (``tests/web_site.py``, 127.0.0.1 only) serving the bundled sample's real DreamBench
   photos, robots.txt, and its faults.
2. Writes a WARC file of real HTML product pages whose ``<img>`` tags point at that site: one page per product
   of the sample, with page chrome (a header logo, a tracking pixel) around the photos; for every other page the
   WARC also holds the image responses (their bytes are joined from the WARC), the others' images are fetched.
   One page opts out with ``<meta name="robots" content="noai">``; one links a photo robots.txt disallows, a
   missing image and an opted-out image.
3. Runs ``icl-pipeline run --input site.warc.gz --profile demo --phases clusters,synthesize,assemble`` with the
   fetcher allowed onto the loopback address (and a faster per-host rate: the host is our own), stops the site,
   and prints each phase's funnel and where the output is.

Every ``<img>`` of the WARC is planned (:class:`ImageTag`): the reason it must leave with when the extract or fetch
stage refuses it, or none when it reaches normalize with its bytes. ``tests/test_web_pipeline.py`` runs this flow
and holds the output to the plan.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{meta}<title>{title} | Example Shop</title></head>
<body>
<header><a href="/"><img src="{site}/img/{logo}" alt="Example Shop"></a></header>
<nav><a href="/">Home</a> <a href="/new">New in</a></nav>
<main>
<h1>{title}</h1>
<p>Free delivery on orders over $50. Order before 2 pm and we ship today.</p>
{images}
<p>Questions about the {title}? Our team answers within a day.</p>
<img src="{site}/img/{logo}?pixel" width="1" height="1" alt="">
</main>
<footer><p>&copy; Example Shop</p></footer>
</body></html>"""

# The demo's site is our own loopback server: a faster per-host rate than the polite default of one request a
# second, and the address guard lifted for 127.0.0.1.
FETCH_OVERRIDES = ("fetch.allow_private_addresses=true", "fetch.per_host_rate=50", "fetch.per_host_concurrency=8")


@dataclass(frozen=True)
class ImageTag:
    """One ``<img>`` of the demo WARC and the fate it is planned for."""

    page_url: str
    image_url: str
    stage: str | None
    """``extract`` or ``fetch`` when that stage must refuse it; ``None`` when it reaches normalize with bytes."""
    reason: str | None
    captured: bytes | None
    """The image bytes the WARC holds for it (joined by the extract stage), or ``None`` (fetched)."""


def product_pages() -> dict[str, list[tuple[str, str]]]:
    """``{page URL: [(photo name, alt text), ...]}`` of the sample's product photos (JPEG ones, as served)."""
    import pyarrow.parquet as pq

    from tests.web_site import SAMPLE, sample_photos

    served = sample_photos()
    pages: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in pq.read_table(SAMPLE, columns=["image_url", "text", "expected", "expected_page", "note"]).to_pylist():
        name = row["image_url"].rsplit("/", 1)[-1]
        if row["expected"] == "kept" and row["note"].startswith("product photo") and name in served:
            if all(name != seen for seen, _ in pages[row["expected_page"]]):
                pages[row["expected_page"]].append((name, row["text"] or ""))
    return {url: images for url, images in sorted(pages.items()) if len(images) >= 3}


def build_warc(site: Any, path: Path) -> tuple[str, list[ImageTag]]:
    """Write the demo WARC for ``site`` (a running ``tests.web_site.WebSite``); returns its path and the plan of
    every ``<img>`` in it, in page order."""
    from tests.web_site import Capture, write_warc

    logo = next(iter(site.photos))
    captures: list[Capture] = []
    plan: list[ImageTag] = []
    for i, (page_url, images) in enumerate(product_pages().items()):
        title = page_url.rstrip("/").rsplit("/", 1)[-1].replace("-", " ").replace("_", " ")
        captured = i % 2 == 0  # every other page's images are in the WARC too; the rest are fetched
        opted_out = i == 2  # <meta name="robots" content="noai">: none of its photos may be used
        tags = [f'<img src="{site.base}/img/{name}" alt="{escape(alt)}">' for name, alt in images]
        page_plan = [ImageTag(page_url, f"{site.base}/img/{logo}", "extract", "navigation_image", None)]
        for name, _ in images:
            page_plan.append(ImageTag(page_url, f"{site.base}/img/{name}", "extract" if opted_out else None,
                                      "opted_out" if opted_out else None, site.photos[name] if captured else None))
        if i == 1:  # what a polite crawler must not take
            extras = [(f"/private/{images[0][0]}", "staff only", "robots_disallowed"),
                      ("/missing.jpg", "discontinued colour", "fetch_http_4xx"),
                      ("/noai.jpg", "artist photo", "opted_out")]
            tags += [f'<img src="{site.base}{path}" alt="{alt}">' for path, alt, _ in extras]
            page_plan += [ImageTag(page_url, f"{site.base}{path}", "fetch", reason, None) for path, _, reason in extras]
        page_plan.append(ImageTag(page_url, f"{site.base}/img/{logo}?pixel", "extract", "tracking_pixel", None))
        meta = '<meta name="robots" content="noai">' if opted_out else ""
        html = PAGE.format(meta=meta, title=escape(title), site=site.base, logo=logo, images="\n".join(tags))
        captures.append(Capture(page_url, html.encode("utf-8"), "text/html; charset=utf-8"))
        if captured:
            captures += [Capture(f"{site.base}/img/{name}", site.photos[name], "image/jpeg") for name, _ in images]
        plan += page_plan
    return write_warc(path, captures), plan


@dataclass
class DemoRun:
    manifest: dict[str, Any]
    plan: list[ImageTag]
    requests: list[Any]
    """What the site answered (``tests.web_site.Request``)."""
    seconds: float


def run_demo(output: str, phases: str = "clusters,synthesize,assemble", overrides: tuple[str, ...] = (),
             beam_args: tuple[str, ...] = ()) -> DemoRun:
    """Start the site, write the WARC, run the pipeline on it, stop the site."""
    from pipeline.run import run
    from tests.web_site import WebSite

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as work, WebSite() as site:
        warc, plan = build_warc(site, Path(work) / "site.warc.gz")
        pages = len({tag.page_url for tag in plan})
        print(f"demo-web: loopback site at {site.base}; {warc}: {pages} pages, {len(plan)} <img>, "
              f"{sum(1 for t in plan if t.captured)} of them with their bytes in the WARC", flush=True)
        argv = ["--input", warc, "--output", output, "--profile", "demo", "--phases", phases, *beam_args]
        for override in (*FETCH_OVERRIDES, *overrides):
            argv += ["--set", override]
        manifest = run(argv)
        site.settle()
        requests = list(site.requests)
    return DemoRun(manifest, plan, requests, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="out/demo-web", help="output folder of the run")
    parser.add_argument("--phases", default="clusters,synthesize,assemble")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides (section.key=value)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every line on the console (OUT/run.log "
                                                                     "has them either way)")
    args, beam_args = parser.parse_known_args(argv)

    from pipeline.cli import configure_logging, log_to_file

    # Quiet: the funnels at the end say what happened; OUT/run.log has every line (--verbose shows them).
    configure_logging(verbose=args.verbose)  # before Beam loads
    if not args.verbose:
        for console in logging.getLogger().handlers:
            console.setLevel(logging.WARNING)
    from pipeline.console import funnel_table, output_listing
    from pipeline.run import RunError
    from transforms.common import InputFormatError

    handler = log_to_file(args.output)
    try:
        demo = run_demo(args.output, args.phases, tuple(args.set), tuple(beam_args))
    except (InputFormatError, RunError, ValueError) as error:
        print(f"demo-web: error: {error}", file=sys.stderr)
        return 1
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    for phase in phases:
        print()
        print(funnel_table(demo.manifest, phase))
    asked = Counter("robots.txt" if r.path == "/robots.txt" else "disallowed" if r.path.startswith("/private/")
                    else "images" for r in demo.requests)
    print(f"\nThe site answered {len(demo.requests)} requests: {asked['robots.txt']} for robots.txt, "
          f"{asked['images']} for images, {asked['disallowed']} for paths robots.txt disallows.")
    print(f"demo-web took {demo.seconds:.0f} s.\n")
    print(output_listing(str(Path(args.output).resolve()), phases))
    for key, what in (("card", "Dataset card"), ("report", "Report")):
        if demo.manifest.get(key):
            print(f"{what}: {Path(demo.manifest[key]).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
