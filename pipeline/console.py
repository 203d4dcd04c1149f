"""What a run prints at the console: the funnel of a finished phase and where its output is."""

from __future__ import annotations

from typing import Any


def _row(label: str, value: Any, note: str = "", indent: int = 2) -> str:
    return f"{' ' * indent}{label:<{34 - indent}}{value:>10,}{('   ' + note) if note else ''}"


def _share(label: str, value: int, total: int) -> str:
    """A row with the value's share of ``total``."""
    return _row(label, value, f"{100 * value / (total or 1):.1f}%")


def _rejected(rejected: dict[str, int], total: int) -> list[str]:
    """The rejected row and one row per reason, the most frequent first."""
    return [_share("rejected", sum(rejected.values()), total)] + [
        _row(reason, n, indent=4) for reason, n in sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0]))]


def _reconciled(block: dict[str, Any], unit: str) -> str:
    return "  counts reconcile: " + ("yes" if block["reconciled"] else f"NO ({block.get('unaccounted')} {unit} "
                                                                         f"unaccounted)")


def funnel_table(manifest: dict[str, Any], phase: str) -> str:
    """A short text table of one finished phase: input -> kept, rejects by reason, reconciliation."""
    summary = manifest["phases"][phase]
    lines = [f"Phase {phase} finished in {summary['wall_seconds']:.1f} s ({manifest.get('runner')})", ""]
    if phase == "clusters":
        records = summary["records"]
        lines.append(_row("input records", records["input"]))
        sources = summary.get("input_records", {})
        if sources:
            lines.append(_row("read from files", sources.get("read", 0), indent=4))
            lines.append(_row("<img> found on WARC pages", sources.get("extract", 0), indent=4))
        lines.append(_share(f"kept, in {summary['clusters']['written']:,} clusters", records["kept"], records["input"]))
        lines.extend(_rejected(records["rejected"], records["input"]))
        fetch = summary.get("fetch")
        if fetch:
            lines.append(f"  fetch: {fetch['fetched']:,} images fetched ({fetch['bytes'] / 1e6:.1f} MB), "
                         f"{fetch['passed_through']:,} records had their bytes already")
            lines.append(_row("rejected by fetch", sum(fetch["rejected"].values())))
            lines.extend(_row(reason, n, indent=4)
                         for reason, n in sorted(fetch["rejected"].items(), key=lambda kv: (-kv[1], kv[0])))
        for reason, n in sorted(summary["clusters"]["rejected"].items()):
            lines.append(f"  clusters dropped as {reason}: {n:,}")
        for truncated in records.get("truncated_files", []):
            lines.append(f"  TRUNCATED INPUT {truncated['path']}: {truncated['detail']}")
        lines.append(_reconciled(records, "records"))
    elif phase == "synthesize":
        clusters = summary["clusters"]
        lines.append(_row("input clusters", clusters["input"]))
        lines.append(_share("synthesized (trained now)", clusters["synthesized"], clusters["input"]))
        lines.append(_share("reused from the resume cache", clusters["cached"], clusters["input"]))
        lines.extend(_rejected(clusters["rejected"], clusters["input"]))
        lines.append(_row("candidates written", summary["candidates"]))
        seconds = summary.get("seconds_per_cluster", {})
        if seconds.get("total"):
            parts = ", ".join(f"{part} {seconds[part]['mean']:.1f}" for part in seconds
                              if part != "total" and seconds[part])
            lines.append(f"  seconds per cluster: mean {seconds['total']['mean']:.1f}, p90 "
                         f"{seconds['total']['p90']:.1f} ({parts}); "
                         f"{seconds['total']['mean'] * 10_000 / 3600:,.1f} device-hours per 10,000 clusters")
        lines.append(_reconciled(clusters, "clusters"))
    elif phase == "assemble":
        candidates = summary["candidates"]
        lines.append(_row("input candidates", candidates["input"]))
        lines.append(_share("examples written", candidates["examples"], candidates["input"]))
        lines.extend(_rejected(candidates["rejected"], candidates["input"]))
        target_filter = summary.get("stats", {}).get("target_filter", {})
        bounds = target_filter.get("bounds", {})
        if bounds:
            mode = target_filter.get("mode")
            note = f" (calibrated: target_keep_rate {target_filter.get('target_keep_rate')})" \
                if mode == "target_keep_rate" else ""
            lines.append(f"  similarity bounds{note}: subject_sim >= {_bound(bounds.get('min_subject_sim'))}, "
                         f"text_sim >= {_bound(bounds.get('min_text_sim'))}")
        examples = summary.get("examples", {})
        if examples.get("files"):
            lines.append(f"  examples/: {examples['files']} file(s), {examples['row_groups']} row group(s), "
                         f"{examples['bytes'] / 1e6:.1f} MB")
        run_cost = manifest.get("cost", {})
        if run_cost.get("seconds_per_example"):
            lines.append(f"  synthesis cost: {run_cost['seconds_per_cluster']:.1f} device-s per cluster, "
                         f"{run_cost['seconds_per_example']:.1f} per kept example; "
                         f"{run_cost['hours_per_100000_examples']:,.1f} device-hours per 100,000 examples")
        lines.append(_reconciled(candidates, "candidates"))
    return "\n".join(lines)


def _bound(value: Any) -> str:
    return "none" if value is None else f"{value:.4f}"


def output_listing(output_dir: str, phases: list[str]) -> str:
    lines = [f"Output: {output_dir}"]
    if "clusters" in phases:
        lines += ["  clusters/*.parquet   one row per kept cluster",
                  "  rejects/*.parquet    one row per rejected record or cluster, with its reason"]
    if "synthesize" in phases:
        lines += ["  candidates/*.parquet one row per rendered image (prompt, skill, seed, training settings)",
                  "  rejects/synthesize-* one row per cluster that could not be synthesized, with its reason",
                  "  cache/synthesize/    finished clusters, reused by a rerun with the same synth settings"]
    if "assemble" in phases:
        lines += ["  examples/*.parquet   one row per training example: 3 real demos + 1 synthesized target",
                  "  scores/*.parquet     one row per scored candidate: its scores and the filter's decision",
                  "  rejects/assemble-*   one row per candidate that did not become an example, with its reason",
                  "  README.md            the dataset card",
                  "  report/index.html    the visual report: funnel, score histograms, galleries"]
    lines.append("  manifest.json        config, versions, counts per stage and reason, timings")
    return "\n".join(lines)
