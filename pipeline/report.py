"""The visual report ``OUT/report/index.html``: one self-contained page (inline CSS, thumbnails as data URLs,
histograms as inline SVG; nothing is fetched) that shows what a run did.

Sections: a banner when the run used tiny random models, the run, the funnel from input records to examples
with the counts per reject reason, what the responsible-data stages found (faces, person clusters, blurred faces,
NSFW score histograms of the crawled photos and of the renders, semantic-duplicate groups), score histograms with
the bounds drawn on them (cluster coherence; every target score, kept and rejected stacked; whether a floor bound a
calibrated bound), a gallery of kept examples (demos, target, prompt, skill, scores), a gallery of rejected
candidates per reason, and a gallery of clusters. Whatever a run lacks (a run of phase 1
only has no candidates) is said, not failed on.

The page opens fast for runs of any size: galleries are capped (``report.examples``, ``report.rejects_per_reason``,
``report.clusters``). They are sampled by a hash of the ids (deterministic, spread over the whole output): only
the id column of every row group is read, then the row groups holding the smallest hashes, up to
``report.read_budget_mb`` per gallery, so writing the report takes seconds whatever the size of the run;
histograms read only the score columns of ``scores/``. ``icl-pipeline report OUT`` writes it again for any output
folder.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.card import is_tiny_run
from pipeline.config import ReportConfig
from pipeline.console import cluster_filter_note, target_filter_note
from transforms.outputs import (
    choose_units,
    matching_files,
    read_present_columns,
    read_row_group,
    row_group_ids,
    sample_order,
    sample_rows,
)
from transforms.settings import NSFW_BINS

REPORT = "report/index.html"


# --- pictures ------------------------------------------------------------------------------------------------


def thumbnail(data: Any, size: int) -> str:
    """A JPEG data URL of the image at most ``size`` px a side ('' when it does not decode); ``data`` is encoded
    bytes or an image column's value."""
    from schemas.parquet import image_bytes

    data = image_bytes(data)
    if not data:
        return ""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale directly
        image = image.convert("RGB")
        image.thumbnail((size, size), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=75)
    except Exception:  # noqa: BLE001 -- a broken image is shown as missing, never breaks the report
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(data: Any, size: int, title: str = "", cls: str = "") -> str:
    url = thumbnail(data, size)
    if not url:
        return f'<div class="missing {cls}" title="{_e(title)}">no image</div>'
    # A fixed display width: small renders (the demo's 64 px) show as large as the others.
    return (f'<img class="{cls}" src="{url}" width="{size}" alt="{_e(title)}" title="{_e(title)}" '
            f'loading="lazy">')


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


# --- histograms -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """A bound drawn on a histogram."""

    x: float
    label: str


def svg_histogram(series: Sequence[tuple[str, Sequence[float], str]], lines: Sequence[Line], title: str,
                  bins: int = 30, log: bool = False, weights: Sequence[Sequence[float]] | None = None) -> str:
    """A stacked histogram as inline SVG: ``series`` of ``(label, values, colour)``; vertical ``lines`` at bounds.

    ``log``: bins on log10 of the values (for scales spanning decades). ``weights``: per series, a weight per
    value (a histogram reconstructed from quantiles).
    """
    def tx(v: float) -> float:
        return math.log10(max(v, 0.1)) if log else v  # log axis: everything under 0.1 is one flat bin

    all_values = [tx(v) for _, values, _ in series for v in values]
    width, height, left, right, top, bottom = 400, 170, 40, 12, 22, 34
    if not all_values:
        return (f'<svg class="hist" width="{width}" height="{height}" role="img"><text x="{left}" y="{top + 40}" '
                f'class="axis">{_e(title)}: no values</text></svg>')
    bound_xs = [tx(line.x) for line in lines]
    lo, hi = min(all_values + bound_xs), max(all_values + bound_xs)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.02
    lo, hi = lo - pad, hi + pad
    stacks = []
    for k, (_, values, _) in enumerate(series):
        counts = [0.0] * bins
        w = weights[k] if weights else [1.0] * len(values)
        for value, weight in zip(values, w, strict=True):
            i = int((tx(value) - lo) / (hi - lo) * bins)
            counts[min(bins - 1, max(0, i))] += weight
        stacks.append(counts)
    peak = max(sum(stack[i] for stack in stacks) for i in range(bins)) or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom
    bar_w = plot_w / bins
    parts = [f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{_e(title)}">', f'<text x="{left}" y="14" class="title">{_e(title)}</text>']
    for i in range(bins):
        base = 0.0
        for (label, _, colour), stack in zip(series, stacks, strict=True):
            if stack[i] <= 0:
                continue
            h = stack[i] / peak * plot_h
            y = top + plot_h - (base + h)
            parts.append(f'<rect x="{left + i * bar_w:.1f}" y="{y:.1f}" width="{max(bar_w - 1, 1):.1f}" '
                         f'height="{h:.1f}" fill="{colour}"><title>{_e(label)}: {stack[i]:.0f}</title></rect>')
            base += h
    axis_y = top + plot_h
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" class="axisline"/>')

    def label(v: float) -> str:
        real = 10 ** v if log else v
        return f"{real:.3g}"

    parts.append(f'<text x="{left}" y="{axis_y + 14}" class="axis">{label(lo)}</text>')
    parts.append(f'<text x="{left + plot_w}" y="{axis_y + 14}" class="axis" text-anchor="end">{label(hi)}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 8}" class="axis" text-anchor="end">{peak:.0f}</text>')
    for line, x in zip(lines, bound_xs, strict=True):
        px = left + (x - lo) / (hi - lo) * plot_w
        anchor = "start" if px < left + 30 else "end" if px > left + plot_w - 30 else "middle"
        parts.append(f'<line x1="{px:.1f}" y1="{top - 4}" x2="{px:.1f}" y2="{axis_y}" class="bound"/>')
        parts.append(f'<text x="{px:.1f}" y="{axis_y + 26}" class="boundlabel" text-anchor="{anchor}">'
                     f'{_e(line.label)}</text>')
    legend = []
    for k, (name, values, colour) in enumerate(series):
        n = sum(weights[k]) if weights else len(values)
        legend.append(f'<tspan fill="{colour}">{_e(name)} {n:,.0f}</tspan>')
    parts.append(f'<text x="{width - right}" y="14" class="legend" text-anchor="end">{"  ".join(legend)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def quantile_histogram_values(quantiles: dict[str, float]) -> tuple[list[float], list[float]]:
    """Points and weights that reproduce a distribution known by its percentiles (``{"p00": v, "p05": v, ...}``):
    the mass between consecutive percentiles spread evenly between them."""
    points = sorted((int(key[1:]), value) for key, value in quantiles.items() if key.startswith("p"))
    values, weights = [], []
    steps = 8
    for (p0, v0), (p1, v1) in zip(points, points[1:], strict=False):
        for k in range(steps):
            values.append(v0 + (v1 - v0) * (k + 0.5) / steps)
            weights.append((p1 - p0) / 100 / steps)
    return values, weights


# --- sections --------------------------------------------------------------------------------------------------

KEPT_COLOUR, REJECTED_COLOUR = "#2e7d32", "#9e9e9e"

SCORE_BOUNDS = {
    "subject_sim": (("min_subject_sim", "min"),),
    "subject_sim_max": (("max_copy_sim", "copy"),),
    "text_sim": (("min_text_sim", "min"),),
    "copy_distance": (("max_copy_distance", "copy <="),),
    "brightness": (("min_brightness", "min"), ("max_brightness", "max")),
    "contrast": (("min_contrast", "min"),),
    "sharpness": (("min_sharpness", "min"),),
    "nsfw_score": (),  # its bound is the nsfw section's lowest class threshold (_nsfw_line)
}


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{_e(title)}</h2>{body}</section>'


def _banner(manifest: dict[str, Any]) -> str:
    if not is_tiny_run(manifest):
        return ""
    config = manifest.get("config", {})
    models = (f"CLIP {config.get('embed', {}).get('model')}, "
              f"diffusion {config.get('synth', {}).get('model', {}).get('name')}")
    return ('<div id="banner" class="banner"><strong>Demo run: tiny random-weight models</strong> '
            f'({_e(models)}). Their scores and renders are meaningless by construction: this page shows how the '
            'pipeline works, not the quality of real data.</div>')


def _run_section(manifest: dict[str, Any]) -> str:
    phases = manifest.get("phases", {})
    rows = [("created", manifest.get("created")), ("profile", manifest.get("profile")),
            ("runner", manifest.get("runner")), ("config hash", manifest.get("config_hash")),
            ("pipeline version", manifest.get("version")),
            ("command", " ".join(manifest.get("command", [])))]
    rows += [(f"phase {name}", f"{summary.get('wall_seconds', 0):.1f} s") for name, summary in phases.items()]
    run_cost = manifest.get("cost") or {}
    if run_cost:
        rows.append(("synthesis cost per cluster", f"{run_cost['seconds_per_cluster']:.2f} device-s "
                                                   f"({run_cost['hours_per_10000_clusters']:,.1f} h per 10,000 "
                                                   f"clusters)"))
    if run_cost.get("seconds_per_example"):
        rows.append(("synthesis cost per kept example", f"{run_cost['seconds_per_example']:.2f} device-s "
                                                        f"({run_cost['hours_per_100000_examples']:,.1f} h per "
                                                        f"100,000 examples)"))
    body = "<table class='kv'>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"
    if run_cost:
        body += f"<p class='note'>{_e(run_cost['unit'])}.</p>"
    return _section("run", "Run", body)


def _funnel_section(manifest: dict[str, Any]) -> str:
    from pipeline.accounting import departures

    steps = manifest.get("funnel") or _fallback_funnel(manifest)
    if not steps:
        return _section("funnel", "Funnel", "<p>No counts in manifest.json.</p>")
    first_of_unit: dict[str, int] = {}
    rows = []
    for step in steps:
        # An example is a kept candidate: its bar is a share of the candidates.
        unit = "candidates" if step["unit"] == "examples" else step["unit"]
        base = first_of_unit.setdefault(unit, step["count"] or 1)
        share = step["count"] / base if base else 0
        left = departures(step)
        reasons = ", ".join(f'<span class="reason">{_e(r)}</span> {n:,}'
                            for r, n in sorted(left.items(), key=lambda kv: (-kv[1], kv[0])))
        rows.append(f"<tr><td>{_e(step['step'])}</td><td class='num'>{step['count']:,}</td><td>{_e(step['unit'])}"
                    f"</td><td><div class='bar' style='width:{max(1.0, 100 * share):.1f}%'></div></td>"
                    f"<td class='reasons'>{reasons}</td></tr>")
    body = ("<table class='funnel'><tr><th>step</th><th>count</th><th>unit</th><th>share of the first step of its "
            "unit</th><th>left before this step, by reason</th></tr>" + "".join(rows) + "</table>")
    checks = []
    if manifest.get("records"):
        checks.append(f"records reconcile: {'yes' if manifest['records'].get('reconciled') else 'NO'}")
    if manifest.get("candidates"):
        checks.append(f"candidates reconcile: {'yes' if manifest['candidates'].get('reconciled') else 'NO'}")
    if checks:
        body += f"<p class='note'>{_e('; '.join(checks))}</p>"
    return _section("funnel", "Funnel: from input records to examples", body)


def _fallback_funnel(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    from pipeline.accounting import funnel

    return funnel(manifest)


def _histograms_section(output_dir: str, manifest: dict[str, Any], config: ReportConfig) -> str:
    from apache_beam.io.filesystems import FileSystems

    charts = []
    cluster_filter = manifest.get("phases", {}).get("clusters", {}).get("stats", {}).get("cluster_filter")
    if cluster_filter and cluster_filter.get("mean_sim_quantiles"):
        values, weights = quantile_histogram_values(cluster_filter["mean_sim_quantiles"])
        n = cluster_filter.get("clusters_scored", 0)
        lines = ([Line(cluster_filter["coherence_threshold"], f"threshold {cluster_filter['coherence_threshold']:.3g}")]
                 if cluster_filter.get("coherence_threshold") is not None else [])
        if cluster_filter.get("floor_bound"):
            lines[0] = Line(cluster_filter["coherence_threshold"], f"floor {cluster_filter['coherence_threshold']:.3g}")
        charts.append(svg_histogram([("clusters", values, "#1565c0")], lines, "cluster coherence (mean_sim)",
                                    config.bins, weights=[[w * n for w in weights]]))
    target_filter = manifest.get("phases", {}).get("assemble", {}).get("stats", {}).get("target_filter", {})
    bounds = target_filter.get("bounds", {})
    rows = read_present_columns(FileSystems.join(output_dir, "scores", "*.parquet"), ["scores", "decision"])
    if rows:
        for name, bound_keys in SCORE_BOUNDS.items():
            kept = [r["scores"][name] for r in rows if r["decision"] == "kept" and r["scores"][name] is not None]
            rejected = [r["scores"][name] for r in rows if r["decision"] != "kept" and r["scores"][name] is not None]
            lines = [Line(float(bounds[key]), f"{label} {bounds[key]:.3g}") for key, label in bound_keys
                     if bounds.get(key) is not None]
            if name == "nsfw_score":
                if not kept and not rejected:
                    continue  # the renders were not checked
                lines = _nsfw_line(manifest)
            charts.append(svg_histogram([("kept", kept, KEPT_COLOUR), ("rejected", rejected, REJECTED_COLOUR)],
                                        lines, f"target {name}", config.bins, log=name == "sharpness"))
    if not charts:
        return _section("histograms", "Score histograms", "<p>No scores yet: the run has no cluster filter "
                        "statistics and no scored candidates.</p>")
    note = ""
    if not rows:
        note = "<p class='note'>No scored candidates yet (phase assemble has not run on this output).</p>"
    elif target_filter.get("mode") == "target_keep_rate":
        calibration = target_filter.get("calibration", {})
        limited = ""
        if calibration.get("limited_by_absolute_checks"):
            limited = (" Fewer pass the absolute checks (quality, copies) than that: every one of them "
                       + ("that passes the similarity floors is kept." if calibration.get("below_floors")
                          else "is kept."))
        note = (f"<p class='note'>The similarity bounds were calibrated to keep "
                f"{100 * target_filter.get('target_keep_rate', 0):.0f}% of the scored candidates: "
                f"{calibration.get('requested', 0):,} requested, {calibration.get('eligible', 0):,} passing the "
                f"absolute checks, {calibration.get('expected_kept', 0):,} at or above the bounds "
                f"(quantile level {_e(calibration.get('level'))}).{limited}</p>")
    floor_notes = [n for n in (cluster_filter_note(cluster_filter or {}), target_filter_note(target_filter)) if n]
    if floor_notes:
        note += ("<p class='note floors'>A calibrated bound keeps at most the requested share, never under its floor. "
                 + _e(" ".join(floor_notes)) + "</p>")
    return _section("histograms", "Score histograms with their bounds",
                    note + "<div class='charts'>" + "".join(charts) + "</div>")


def _nsfw_line(manifest: dict[str, Any]) -> list[Line]:
    """The lowest NSFW class threshold of the run (a score at or over it may be flagged), as a histogram line."""
    nsfw = manifest.get("config", {}).get("nsfw", {})
    thresholds = [v for k, v in nsfw.items() if k != "enabled" and isinstance(v, (int, float))
                  and not isinstance(v, bool)]
    if not nsfw.get("enabled") or not thresholds:
        return []
    low = min(thresholds)
    return [Line(float(low), f"nsfw {low:.3g}" if len(set(thresholds)) == 1 else f"lowest class {low:.3g}")]


def _binned_histogram(counters: dict[str, int], prefix: str, bins: int, lines: Sequence[Line], title: str,
                      label: str, colour: str) -> str:
    """A histogram of scores the stage counted in ``bins`` equal bins of 0..1 (counters ``<prefix>0`` ...)."""
    centres = [(k + 0.5) / bins for k in range(bins)]
    counts = [float(counters.get(f"{prefix}{k}", 0)) for k in range(bins)]
    return svg_histogram([(label, centres, colour)], lines, title, bins, weights=[counts])


def _kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{_e(k)}</th><td class='num'>{v:,}</td></tr>" if isinstance(v, int)
                    else f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{cells}</table>"


def _responsible_section(manifest: dict[str, Any]) -> str:
    """Faces, person clusters, blurred faces, NSFW scores (photos and renders) and semantic-duplicate groups, from
    the stages' counters in the manifest."""
    phases = manifest.get("phases", {})
    config = manifest.get("config", {})
    clusters = phases.get("clusters", {})
    counters = clusters.get("counters", {})
    blocks = []
    safety = counters.get("safety")
    people = config.get("people", {})
    if safety:
        rows = [("images checked", safety.get("images_checked", 0)),
                ("images with a face", safety.get("images_with_faces", 0)),
                ("faces found (confirmed)", safety.get("faces", 0)),
                (f"person images (a face over {100 * people.get('prominent_face_share', 0):.3g}% of the image)",
                 safety.get("person_images", 0)),
                ("person clusters", safety.get("person_clusters", 0)),
                (f"person clusters dropped (people.policy {people.get('policy')})",
                 safety.get("person_subject_clusters", 0)),
                ("images in them", safety.get("person_subject", 0)),
                ("faces blurred", safety.get("faces_blurred", 0)),
                ("photos rejected as NSFW (nsfw_input)", safety.get("nsfw_input", 0))]
        chart = _binned_histogram(safety, "nsfw_score_bin_", NSFW_BINS, _nsfw_line(manifest),
                                  "NSFW score of the crawled photos", "photos", "#6a1b9a")
        blocks.append("<h3>Faces and NSFW (stage safety)</h3><div class='charts'>" + _kv_table(rows) + chart + "</div>")
    elif clusters:
        blocks.append("<h3>Faces and NSFW (stage safety)</h3><p>Off in this run (detector.enabled, or nothing to "
                      "decide: nsfw.enabled false and people.policy keep without blurring).</p>")
    targets = phases.get("assemble", {}).get("counters", {}).get("nsfw_targets")
    if targets:
        rejected = phases.get("assemble", {}).get("rejects_by_stage", {}).get("target_filter", {}).get("nsfw", 0)
        rows = [("renders flagged by the detector", targets.get("flagged", 0)),
                ("renders rejected as nsfw (detector or the base model's safety checker)", rejected),
                ("units left unchecked (a detector fault)", targets.get("units_unchecked", 0))]
        chart = _binned_histogram(targets, "nsfw_score_bin_", NSFW_BINS, _nsfw_line(manifest),
                                  "NSFW score of the renders", "renders", "#6a1b9a")
        blocks.append("<h3>NSFW check of the renders (phase 3)</h3><div class='charts'>" + _kv_table(rows) + chart
                      + "</div>")
    semantic = counters.get("semantic_dedup")
    if semantic:
        settings = config.get("semantic_dedup", {})
        rows = [("clusters compared", semantic.get("cluster_items", 0)),
                (f"groups of duplicate clusters (cluster_threshold {settings.get('cluster_threshold')})",
                 semantic.get("duplicate_groups_cluster", 0)),
                ("clusters dropped (semantic_duplicate_cluster)",
                 semantic.get("semantic_duplicate_cluster_clusters", 0)),
                ("images compared", semantic.get("image_items", 0)),
                (f"groups of duplicate images (image_threshold {settings.get('image_threshold')})",
                 semantic.get("duplicate_groups_image", 0)),
                ("images dropped (semantic_duplicate_image)", semantic.get("semantic_duplicate_image", 0)),
                ("images of clusters left too small", semantic.get("cluster_too_small", 0)),
                ("k-means buckets (clusters, images)",
                 f"{semantic.get('centroids_cluster', 0):,}, {semantic.get('centroids_image', 0):,}"),
                ("pairs compared", semantic.get("pairs_compared", 0))]
        blocks.append("<h3>Semantic duplicates across the dataset (stage semantic_dedup)</h3>" + _kv_table(rows)
                      + "<p class='note'>A group is one kept cluster or image and the duplicates that left for it; "
                        "each reject row in rejects/ names the one kept.</p>")
    elif clusters:
        blocks.append("<h3>Semantic duplicates across the dataset (stage semantic_dedup)</h3><p>Off in this run.</p>")
    if not blocks:
        return _section("responsible", "Faces, NSFW and semantic duplicates", "<p>No phase of this output ran "
                        "these checks.</p>")
    if is_tiny_run(manifest):
        blocks.insert(0, "<p class='note'>The face and NSFW detector runs with its real weights in every run; the "
                         "semantic duplicates are decided on the tiny CLIP model's embeddings, which mean "
                         "nothing.</p>")
    return _section("responsible", "Faces, NSFW and semantic duplicates", "".join(blocks))


def _scores_table(scores: dict[str, Any]) -> str:
    cells = []
    for name, value in scores.items():
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        cells.append(f"<tr><th>{_e(name)}</th><td>{_e(text)}</td></tr>")
    return "<table class='scores'>" + "".join(cells) + "</table>"


def _examples_section(output_dir: str, config: ReportConfig) -> str:
    from apache_beam.io.filesystems import FileSystems

    pattern = FileSystems.join(output_dir, "examples", "*.parquet")
    if not matching_files(pattern):
        return _section("examples", "Kept examples", "<p>No examples yet: phase assemble has not run on this "
                        "output (or kept nothing).</p>")
    rows = sample_rows(pattern, "example_id", config.examples, config.read_budget_mb << 20)
    size = config.thumbnail_px
    cards = []
    for row in rows:
        target = row["target"]
        demos = "".join(f"<figure>{_img(d['image'], size // 2 + 24, d.get('caption') or '', 'demo')}"
                        f"<figcaption>{_e(d.get('caption') or '(no caption)')}</figcaption></figure>"
                        for d in row["demos"])
        cards.append(
            f"<div class='example'><div class='demos'>{demos}</div>"
            f"<div class='target'>{_img(target['image'], size, target['prompt'], 'target')}"
            f"<p class='prompt'>{_e(target['prompt'])}</p><p class='skill'>{_e(target.get('skill'))} · "
            f"{_e(row.get('subject') or row.get('class_noun') or '')}</p>{_scores_table(row.get('scores') or {})}"
            f"</div></div>")
    total = _count_rows(pattern)
    note = f"<p class='note'>{len(rows)} of {total:,} examples (a deterministic sample).</p>"
    return _section("examples", "Kept examples: demos → target", note + "<div class='gallery'>" + "".join(cards)
                    + "</div>")


def _count_rows(pattern: str) -> int:
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    total = 0
    for path in matching_files(pattern):
        with FileSystems.open(path) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def _rejected_section(output_dir: str, manifest: dict[str, Any], config: ReportConfig) -> str:
    from apache_beam.io.filesystems import FileSystems

    rejects = read_present_columns(FileSystems.join(output_dir, "rejects", "assemble-*.parquet"),
                            ["id", "stage", "reason", "detail"])
    if not rejects:
        body = ("<p>No rejected candidates" + ("" if manifest.get("phases", {}).get("assemble") else
                                              ": phase assemble has not run on this output") + ".</p>")
        return _section("rejected", "Rejected candidates, per reason", body)
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for row in rejects:
        by_reason.setdefault(row["reason"], []).append(row)
    scores = {r["candidate_id"]: r for r in read_present_columns(FileSystems.join(output_dir, "scores", "*.parquet"),
                                                         ["candidate_id", "prompt", "scores"])}
    inputs = manifest.get("phases", {}).get("assemble", {}).get("inputs") or matching_files(
        FileSystems.join(output_dir, "candidates", "*.parquet"))
    units = row_group_ids([p for p in inputs if FileSystems.exists(p)], "candidate_id")
    # The first ids of every reason, then the next ones, ...: each reason gets its share of the read budget.
    ranked = {reason: sorted((r["id"] for r in rows), key=sample_order) for reason, rows in by_reason.items()}
    interleaved = [ids[k] for k in range(config.rejects_per_reason) for ids in ranked.values() if k < len(ids)]
    chosen_units = choose_units(units, interleaved, config.read_budget_mb << 20)
    images: dict[str, dict[str, Any]] = {}
    for unit in chosen_units:
        for row in read_row_group(unit.path, unit.row_group, ["candidate_id", "image", "prompt", "skill"]):
            images[row["candidate_id"]] = row
    readable = {id_ for unit in chosen_units for id_ in unit.ids}
    known = {id_ for unit in units for id_ in unit.ids}
    chosen = {reason: [row for row in sorted(rows, key=lambda r: sample_order(r["id"]))
                       if row["id"] in readable or row["id"] not in known][:config.rejects_per_reason]
              for reason, rows in by_reason.items()}
    blocks = []
    for reason, rows in sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        cards = []
        for row in chosen[reason]:
            candidate = images.get(row["id"], {})
            scored = scores.get(row["id"], {})
            prompt = scored.get("prompt") or candidate.get("prompt") or ""
            cards.append(f"<div class='reject'>{_img(candidate.get('image'), config.thumbnail_px, prompt, 'target')}"
                         f"<p class='prompt'>{_e(prompt)}</p><p class='detail'>{_e(row.get('detail'))}</p>"
                         f"{_scores_table(scored.get('scores') or {}) if scored else ''}</div>")
        blocks.append(f"<h3 id='reason-{_e(reason)}'><span class='reason'>{_e(reason)}</span> · {len(rows):,} "
                      f"candidate(s) · stage {_e(rows[0]['stage'])}</h3><div class='gallery'>{''.join(cards)}</div>")
    return _section("rejected", "Rejected candidates, per reason", "".join(blocks))


def _clusters_section(output_dir: str, config: ReportConfig) -> str:
    from apache_beam.io.filesystems import FileSystems

    pattern = FileSystems.join(output_dir, "clusters", "*.parquet")
    if not matching_files(pattern):
        return _section("clusters", "Clusters", "<p>No clusters in this output.</p>")
    rows = sample_rows(pattern, "cluster_id", config.clusters, config.read_budget_mb << 20,
                       ["cluster_id", "page_url", "subject", "class_noun", "images", "stats", "prompts"])
    cards = []
    for row in rows:
        stats = row.get("stats") or {}
        mean_sim = stats.get("mean_sim")
        thumbs = "".join(f"<figure>{_img(im['image'], config.thumbnail_px // 2 + 24, im.get('caption') or '', 'demo')}"
                         f"<figcaption>{_e(im.get('caption') or im.get('text') or '')}</figcaption></figure>"
                         for im in (row.get("images") or [])[:6])
        prompts = "; ".join(p["prompt"] for p in (row.get("prompts") or [])[:3])
        cards.append(f"<div class='cluster'><p><strong>{_e(row.get('subject') or '(no subject)')}</strong> · "
                     f"{stats.get('n_images', 0)} images"
                     + (f" · coherence {mean_sim:.3f}" if mean_sim is not None else "")
                     + f"</p><p class='url'>{_e(row['page_url'])}</p><div class='demos'>{thumbs}</div>"
                     f"<p class='detail'>{_e(prompts)}</p></div>")
    note = f"<p class='note'>{len(rows)} of {_count_rows(pattern):,} clusters (a deterministic sample).</p>"
    return _section("clusters", "Clusters", note + "<div class='gallery'>" + "".join(cards) + "</div>")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1240px;padding:16px;
color:#212121;background:#fafafa}
h1{font-size:24px;margin:8px 0}h2{font-size:19px;border-bottom:2px solid #e0e0e0;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin:18px 0 6px}
nav a{margin-right:14px;color:#1565c0;text-decoration:none}
.banner{background:#fff3cd;border:1px solid #e0b100;border-radius:6px;padding:10px 14px;margin:10px 0}
table{border-collapse:collapse}th,td{text-align:left;padding:3px 8px;vertical-align:top;font-size:13px}
.kv th{color:#616161;font-weight:600}.num{text-align:right;font-variant-numeric:tabular-nums}
.funnel tr:nth-child(even){background:#f0f0f0}.funnel td:nth-child(4){width:220px}
.bar{height:12px;background:#1565c0;border-radius:2px}
.reason{font-family:ui-monospace,monospace;background:#eceff1;border-radius:3px;padding:0 4px}
.reasons{font-size:12px}.note{color:#616161;font-size:13px}
.charts{display:flex;flex-wrap:wrap;gap:10px}
.hist{background:#fff;border:1px solid #e0e0e0;border-radius:4px}
.hist .title{font-size:12px;font-weight:600}.hist .axis,.hist .legend{font-size:10px;fill:#616161}
.hist .legend{font-weight:600}.hist .axisline{stroke:#9e9e9e}
.hist .bound{stroke:#c62828;stroke-width:2;stroke-dasharray:4 2}.hist .boundlabel{font-size:10px;fill:#c62828}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
.example,.reject,.cluster{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:8px}
.example{display:flex;gap:10px;width:580px}.reject{width:200px}.cluster{width:580px}
.demos{display:flex;flex-wrap:wrap;gap:6px;align-content:flex-start}
figure{margin:0;width:104px}figure img{width:100px;height:auto}
figcaption{font-size:11px;color:#424242;overflow-wrap:anywhere}
img{display:block;border-radius:3px;background:#eee;height:auto}img.target{outline:3px solid #2e7d32}
.reject img.target{outline-color:#9e9e9e}
.missing{width:100px;height:100px;background:#eee;color:#9e9e9e;font-size:11px;display:flex;align-items:center;
justify-content:center}
.prompt{font-size:13px;font-weight:600;margin:6px 0 2px}.skill,.url{font-size:12px;color:#616161;margin:0 0 4px;
overflow-wrap:anywhere}
.detail{font-size:11px;color:#616161;overflow-wrap:anywhere}
.scores th,.scores td{font-size:11px;padding:0 6px 0 0}
"""


def build_report(output_dir: str, config: ReportConfig | None = None,
                 manifest: dict[str, Any] | None = None) -> str:
    """The report's HTML for the output folder ``output_dir`` (reads ``manifest.json`` unless given)."""
    from pipeline.manifest import load_manifest

    config = config or ReportConfig()
    manifest = manifest if manifest is not None else load_manifest(output_dir)
    title = f"icl-cluster-pipeline report · {output_dir.rstrip('/').rsplit('/', 1)[-1]}"
    nav = "".join(f"<a href='#{i}'>{t}</a>" for i, t in (("funnel", "Funnel"), ("responsible", "Faces, NSFW, "
                                                                                        "duplicates"),
                                                         ("histograms", "Histograms"),
                                                         ("examples", "Examples"), ("rejected", "Rejected"),
                                                         ("clusters", "Clusters")))
    sections = [
        _banner(manifest),
        _run_section(manifest),
        _funnel_section(manifest),
        _responsible_section(manifest),
        _histograms_section(output_dir, manifest, config),
        _examples_section(output_dir, config),
        _rejected_section(output_dir, manifest, config),
        _clusters_section(output_dir, config),
    ]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><nav>{nav}</nav>{''.join(sections)}</body></html>")


def write_report(output_dir: str, config: ReportConfig | None = None,
                 manifest: dict[str, Any] | None = None) -> str:
    """Write ``OUT/report/index.html``; returns its path."""
    from apache_beam.io.filesystems import FileSystems

    path = FileSystems.join(output_dir, *REPORT.split("/"))
    page = build_report(output_dir, config, manifest)
    with FileSystems.create(path, mime_type="text/html") as handle:
        handle.write(page.encode("utf-8"))
    return path
