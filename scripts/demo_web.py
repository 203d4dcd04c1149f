"""``make demo-web``: from raw web pages to clusters and examples, on a loopback web site this script runs itself.

1. Starts the loopback site (``tests/web_site.py``, 127.0.0.1 only) serving the bundled sample's real DreamBench
   photos, robots.txt, and its faults.
2. Writes a WARC file of real HTML product pages whose ``<img>`` tags point at that site: one page per product
   of the sample, with page chrome (a header logo, a tracking pixel) around the photos; for every other page the
   WARC also holds the image responses (their bytes are joined from the WARC), the others' images are fetched.
   One page opts out with ``<meta name="robots" content="noai">``; one links a photo robots.txt disallows, a
   missing image and an opted-out image.
3. Runs ``icl-pipeline run --input site.warc.gz --profile demo --phases clusters,synthesize,assemble`` with the
   fetcher allowed onto the loopback address (and a faster per-host rate: the host is our own), then stops the
   site.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from html import escape
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from tests.web_site import SAMPLE, Capture, WebSite, sample_photos, write_warc  # noqa: E402

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


def product_pages() -> dict[str, list[tuple[str, str]]]:
    """``{page URL: [(photo name, alt text), ...]}`` of the sample's product photos (JPEG ones, as served)."""
    served = sample_photos()
    pages: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in pq.read_table(SAMPLE, columns=["image_url", "text", "expected", "expected_page", "note"]).to_pylist():
        name = row["image_url"].rsplit("/", 1)[-1]
        if row["expected"] == "kept" and row["note"].startswith("product photo") and name in served:
            if all(name != seen for seen, _ in pages[row["expected_page"]]):
                pages[row["expected_page"]].append((name, row["text"] or ""))
    return {url: images for url, images in sorted(pages.items()) if len(images) >= 3}


def build_warc(site: WebSite, path: Path) -> tuple[str, dict[str, int]]:
    pages = product_pages()
    logo = next(iter(site.photos))
    captures: list[Capture] = []
    numbers = {"pages": len(pages), "pages_with_captured_images": 0, "images": 0}
    for i, (page_url, images) in enumerate(pages.items()):
        title = page_url.rstrip("/").rsplit("/", 1)[-1].replace("-", " ").replace("_", " ")
        tags = [f'<img src="{site.base}/img/{name}" alt="{escape(alt)}">' for name, alt in images]
        if i == 1:  # what a polite crawler must not take
            tags += [f'<img src="{site.base}/private/{images[0][0]}" alt="staff only">',
                     f'<img src="{site.base}/missing.jpg" alt="discontinued colour">',
                     f'<img src="{site.base}/noai.jpg" alt="artist photo">']
        meta = '<meta name="robots" content="noai">' if i == 2 else ""
        html = PAGE.format(meta=meta, title=escape(title), site=site.base, logo=logo, images="\n".join(tags))
        captures.append(Capture(page_url, html.encode("utf-8"), "text/html; charset=utf-8"))
        numbers["images"] += len(tags)
        if i % 2 == 0:  # every other page's images are in the WARC too; the rest are fetched
            numbers["pages_with_captured_images"] += 1
            captures += [Capture(f"{site.base}/img/{name}", site.photos[name], "image/jpeg") for name, _ in images]
    return write_warc(path, captures), numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="out/demo-web", help="output folder of the run")
    parser.add_argument("--phases", default="clusters,synthesize,assemble")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides (section.key=value)")
    args = parser.parse_args(argv)

    from pipeline.config import ConfigError
    from pipeline.run import run
    from transforms.read import InputFormatError

    with tempfile.TemporaryDirectory() as work, WebSite() as site:
        warc, numbers = build_warc(site, Path(work) / "site.warc.gz")
        print(f"loopback site at {site.base}; WARC {warc}: {numbers['pages']} pages, {numbers['images']} <img> "
              f"pointing at it, {numbers['pages_with_captured_images']} pages with their images in the WARC")
        argv_run = ["--input", warc, "--output", args.output, "--profile", "demo", "--phases", args.phases,
                    "--set", "fetch.allow_private_addresses=true",
                    # the site is ours: a faster per-host rate than the polite default of 1 request a second
                    "--set", "fetch.per_host_rate=50", "--set", "fetch.per_host_concurrency=8"]
        for override in args.set:
            argv_run += ["--set", override]
        try:
            run(argv_run)
        except (InputFormatError, ConfigError) as error:
            if "unknown input format" in str(error) or "'fetch'" in str(error):
                print(f"demo-web: this pipeline does not read WARC files yet ({error}); the extract and fetch "
                      "stages await wiring into pipeline/phases.py", file=sys.stderr)
                return 2
            raise
        print(f"requests the site answered: {len(site.requests)} (robots.txt: {site.count('/robots.txt')}, "
              f"disallowed paths asked: {sum(1 for r in site.requests if r.path.startswith('/private/'))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
