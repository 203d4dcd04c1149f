"""The visual report: rendered by a real headless browser (Debian's chromium), for a full run and for a run of
phase 1 only; the report command; the page's pieces."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from pipeline.report import Line, ReportConfig, build_report, svg_histogram
from schemas.reader import list_shards
from tests.conftest import PhaseOutput, read_rows, run_command_line
from transforms.outputs import Unit, choose_units, row_group_ids, sample_rows

SECTIONS = ("run", "funnel", "responsible", "histograms", "examples", "rejected", "clusters")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


needs_chromium = pytest.mark.skipif(
    _chromium() is None, reason="no chromium on this machine: the report is checked in a real headless browser "
                                "(Debian: apt-get install -y --no-install-recommends chromium; .ci/run installs it)")


def render(page: str, tmp_path, name: str = "page") -> tuple[np.ndarray, str]:
    """Screenshot (RGB array) and serialized DOM of ``page`` (a local HTML file) in headless chromium."""
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars"]
    url = "file://" + os.path.abspath(page)
    png = tmp_path / f"{name}.png"
    shot = subprocess.run([*flags, f"--user-data-dir={tmp_path / (name + '-profile-1')}", f"--screenshot={png}",
                           "--window-size=1280,2000", url], capture_output=True, text=True, timeout=120)
    assert png.exists(), shot.stderr[-2000:]
    dom = subprocess.run([*flags, f"--user-data-dir={tmp_path / (name + '-profile-2')}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "</html>" in dom.stdout, dom.stderr[-2000:]
    return np.asarray(Image.open(png).convert("RGB")), dom.stdout


def assert_not_blank(pixels: np.ndarray) -> None:
    background = np.median(pixels.reshape(-1, 3), axis=0)
    differs = np.abs(pixels.astype(int) - background).sum(axis=2) > 40
    assert differs.mean() > 0.03, f"only {differs.mean():.2%} of the screenshot differs from its background"
    assert len(np.unique(pixels.reshape(-1, 3)[::97], axis=0)) > 50  # photos and charts, not a flat page


@needs_chromium
def test_the_report_of_a_demo_run_renders_in_a_browser(demo_run: PhaseOutput, tmp_path) -> None:
    page = demo_run.output / "report" / "index.html"
    assert demo_run.manifest["report"] == str(page)
    pixels, dom = render(str(page), tmp_path)
    assert pixels.shape[1] == 1280
    assert_not_blank(pixels)
    for section in SECTIONS:
        assert f'id="{section}"' in dom, section
    assert 'id="banner"' in dom and "tiny random-weight models" in dom
    n_examples = demo_run.manifest["candidates"]["examples"]
    assert dom.count('class="example"') == min(48, n_examples)
    # cluster coherence, the 8 target scores (NSFW included), the NSFW scores of the photos and of the renders
    assert dom.count('class="hist"') == 11
    assert dom.count('class="bound"') >= 8  # the bounds drawn on them
    calibration = demo_run.manifest["phases"]["assemble"]["stats"]["target_filter"]["calibration"]
    assert (f"calibrated to keep 25% of the scored candidates: {calibration['requested']} requested, "
            f"{calibration['eligible']} passing the absolute checks, {calibration['expected_kept']} at or above") in dom
    for reason in demo_run.manifest["candidates"]["rejected"]:
        assert f'id="reason-{reason}"' in dom
    assert dom.count("data:image/jpeg;base64,") >= 4 * min(48, n_examples)  # self-contained thumbnails
    assert not re.search(r'(src|href)="(https?:)?//', dom)  # nothing fetched from anywhere


@needs_chromium
def test_the_report_of_a_phase1_only_run_says_what_is_missing(sample_phase1: PhaseOutput, tmp_path) -> None:
    page = tmp_path / "index.html"
    page.write_text(build_report(str(sample_phase1.output)), encoding="utf-8")
    pixels, dom = render(str(page), tmp_path, "phase1")
    assert_not_blank(pixels)
    for section in SECTIONS:
        assert f'id="{section}"' in dom, section
    assert "No examples yet" in dom and "phase assemble has not run" in dom
    # Cluster coherence (from the manifest's quantiles) and the NSFW scores of the photos (the safety stage's counters).
    assert dom.count('class="hist"') == 2 and "cluster coherence" in dom and "NSFW score of the crawled photos" in dom
    assert dom.count('class="cluster"') == min(12, sample_phase1.manifest["clusters"]["written"])
    assert "input records" in dom and "incoherent_cluster" in dom


def test_the_report_command_writes_a_capped_deterministic_sample(demo_run: PhaseOutput, tmp_path) -> None:
    out = tmp_path / "out"
    shutil.copytree(demo_run.output, out, ignore=shutil.ignore_patterns("cache"))
    (out / "report" / "index.html").unlink()
    result = run_command_line("report", str(out), "--set", "report.examples=2", "--set", "report.rejects_per_reason=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Report: {out / 'report' / 'index.html'}" in result.stdout
    page = (out / "report" / "index.html").read_text()
    assert page.count("class='example'") == 2 and "2 of " in page  # the source's quotes (a browser's DOM: ")
    reasons = demo_run.manifest["candidates"]["rejected"]
    assert page.count("class='reject'") == len(reasons)
    config = ReportConfig(examples=2, rejects_per_reason=1)
    assert build_report(str(out), config) == page  # the same sample every time
    bad = run_command_line("report", str(out), "--set", "report.nope=1")
    assert bad.returncode == 2 and "report.nope" in bad.stderr


def test_the_report_shows_what_the_responsible_data_stages_found(demo_run: PhaseOutput) -> None:
    """Faces, person clusters, NSFW score histograms (photos, renders) and semantic-duplicate groups, from the
    stages' counters; the renders' NSFW scores among the target score histograms (the page's source, no browser)."""
    page = (demo_run.output / "report" / "index.html").read_text()
    section = re.search(r'<section id="responsible">.*?</section>', page).group(0)
    counters = demo_run.manifest["phases"]["clusters"]["counters"]
    checked = counters["safety"]["images_checked"]
    assert checked > 0 and f"<th>images checked</th><td class='num'>{checked:,}</td>" in section
    assert "<th>faces found (confirmed)</th><td class='num'>0</td>" in section  # no person in the sample
    assert f"<th>images compared</th><td class='num'>{counters['semantic_dedup']['image_items']:,}</td>" in section
    assert "groups of duplicate images (image_threshold 0.9999)" in section
    photos = re.search(r'<svg[^>]*aria-label="NSFW score of the crawled photos".*?</svg>', section).group(0)
    renders = re.search(r'<svg[^>]*aria-label="NSFW score of the renders".*?</svg>', section).group(0)
    assert f"photos {checked:,}" in photos and 'class="bound"' in photos and "nsfw 0.7" in photos
    n_candidates = demo_run.manifest["candidates"]["input"]
    assert f"renders {n_candidates:,}" in renders
    histograms = re.search(r'<section id="histograms">.*?</section>', page).group(0)
    assert 'aria-label="target nsfw_score"' in histograms
    assert page.count('class="hist"') == 11
    scores = read_rows(demo_run.output, "scores")
    assert scores and all(0.0 <= row["scores"]["nsfw_score"] < 0.7 for row in scores)


def test_galleries_read_row_groups_within_their_budget(demo_run: PhaseOutput) -> None:
    pattern = str(demo_run.output / "examples" / "*.parquet")
    units = row_group_ids(list_shards(pattern), "example_id")
    assert len(units) > 2 and sum(len(u.ids) for u in units) == len(read_rows(demo_run.output, "examples"))
    one = sample_rows(pattern, "example_id", 100, budget_bytes=1)  # a budget of one row group
    assert {row["example_id"] for row in one} in [set(u.ids) for u in units]
    everything = sample_rows(pattern, "example_id", 100, budget_bytes=1 << 30)
    assert len(everything) == sum(len(u.ids) for u in units)
    three = sample_rows(pattern, "example_id", 3, budget_bytes=1 << 30)
    assert [r["example_id"] for r in three] == [r["example_id"] for r in everything[:3]]  # smallest hashes first


def test_histogram_draws_bars_and_bounds() -> None:
    svg = svg_histogram([("kept", [0.1, 0.2, 0.2], "#0a0"), ("rejected", [0.5, 0.9], "#999")],
                        [Line(0.3, "min 0.3"), Line(0.95, "copy")], "text_sim", bins=10)
    assert svg.startswith("<svg") and svg.count('class="bound"') == 2 and "min 0.3" in svg
    assert svg.count("<rect") == 4 and "kept 3" in svg and "rejected 2" in svg
    assert "no values" in svg_histogram([("kept", [], "#0a0")], [], "empty")
    log = svg_histogram([("all", [1.0, 10.0, 1000.0], "#000")], [Line(25.0, "min 25")], "sharpness", log=True)
    assert ">0.871<" in log and ">1.15e+03<" in log  # log10 bins, axis labelled with the values themselves


def test_row_groups_are_chosen_by_the_ids_they_hold_within_the_budget() -> None:
    units = [Unit("a", 0, 100, ("x", "y")), Unit("a", 1, 100, ("z",)), Unit("b", 0, 100, ("w",))]
    assert choose_units(units, ["z", "x", "w", "y"], 250) == [units[1], units[0]]
    assert choose_units(units, ["w", "q"], 1) == [units[2]]  # at least one, unknown ids ignored


def test_the_report_says_when_a_floor_bound_a_calibrated_threshold(tmp_path) -> None:
    """A phase-1 run of incoherent pages: the calibrated coherence threshold stood on its floor; the histogram draws
    the floor and the note says how many clusters were kept short of the request."""
    from transforms.cluster_filter import calibration_stats
    from transforms.settings import ClusterFilterConfig

    stats = calibration_stats([0.3 + 0.01 * i for i in range(31)], 30, 0.75, ClusterFilterConfig(target_keep_rate=0.5),
                              calibrated=0.45, n_kept=0)
    manifest = {"profile": "local", "config": {}, "phases": {"clusters": {"wall_seconds": 1.0,
                                                                         "stats": {"cluster_filter": stats}}}}
    page = build_report(str(tmp_path), manifest=manifest)
    histograms = re.search(r'<section id="histograms">.*?</section>', page).group(0)
    assert "floor 0.75" in histograms and 'class="bound"' in histograms
    assert ("Cluster filter: the floor cluster_filter.coherence_threshold 0.75 bound the threshold (the calibrated one "
            "was 0.4500); 0 clusters kept of the 15 requested, 15 short.") in histograms
    responsible = re.search(r'<section id="responsible">.*?</section>', page).group(0)
    assert "Off in this run" in responsible  # no counters of the safety and semantic-dedup stages
