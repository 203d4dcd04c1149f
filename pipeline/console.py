"""What a run prints at the console: the funnel of a finished phase and where its output is."""

from __future__ import annotations

from typing import Any


def _row(label: str, value: Any, note: str = "", indent: int = 2) -> str:
    return f"{' ' * indent}{label:<{34 - indent}}{value:>10,}{('   ' + note) if note else ''}"


def funnel_table(manifest: dict[str, Any], phase: str) -> str:
    """A short text table of one finished phase: input -> kept, rejects by reason, reconciliation."""
    summary = manifest["phases"][phase]
    lines = [f"Phase {phase} finished in {summary['wall_seconds']:.1f} s ({manifest.get('runner')})", ""]
    if phase == "clusters":
        records = summary["records"]
        n_input = records["input"] or 1
        lines.append(_row("input records", records["input"]))
        lines.append(_row(f"kept, in {summary['clusters']['written']:,} clusters", records["kept"],
                          f"{100 * records['kept'] / n_input:.1f}%"))
        rejected = records["rejected"]
        lines.append(_row("rejected", sum(rejected.values()),
                          f"{100 * sum(rejected.values()) / n_input:.1f}%"))
        for reason, n in sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(_row(reason, n, indent=4))
        for reason, n in sorted(summary["clusters"]["rejected"].items()):
            lines.append(f"  clusters dropped as {reason}: {n:,}")
        lines.append("  counts reconcile: " + ("yes" if records["reconciled"] else
                                               f"NO ({records.get('unaccounted')} records unaccounted)"))
    return "\n".join(lines)


def output_listing(output_dir: str, phases: list[str]) -> str:
    lines = [f"Output: {output_dir}"]
    if "clusters" in phases:
        lines += ["  clusters/*.parquet   one row per kept cluster",
                  "  rejects/*.parquet    one row per rejected record or cluster, with its reason"]
    lines.append("  manifest.json        config, versions, counts per stage and reason, timings")
    return "\n".join(lines)
