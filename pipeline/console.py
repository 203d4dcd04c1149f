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
    execution = summary.get("execution")
    lines = [f"Phase {phase} finished in {summary['wall_seconds']:.1f} s ({manifest.get('runner')}"
             f"{', ' + execution_words(execution) if execution else ''})", ""]
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
        lines.extend(f"  {line}" for line in responsible_lines(summary.get("counters", {})))
        cluster_filter = summary.get("stats", {}).get("cluster_filter", {})
        if cluster_filter.get("mode") == "target_keep_rate":
            rate = cluster_filter.get("target_keep_rate")
            lines.append(f"  coherence threshold (calibrated: target_keep_rate {rate}): "
                         f"{_bound(cluster_filter.get('coherence_threshold'))}")
        note = cluster_filter_note(cluster_filter)
        if note:
            lines.append(f"  {note}")
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
        floors = target_filter_note(target_filter)
        if floors:
            lines.append(f"  {floors}")
        nsfw = summary.get("counters", {}).get("nsfw_targets")
        if nsfw:
            checked = sum(n for name, n in nsfw.items() if name.startswith("nsfw_score_bin_"))
            unchecked = nsfw.get("units_unchecked", 0)
            lines.append(f"  NSFW check of the renders: {checked:,} checked, {nsfw.get('flagged', 0):,} flagged"
                         + (f", {unchecked:,} cluster(s) unchecked" if unchecked else ""))
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


def execution_words(execution: dict[str, Any]) -> str:
    """How a local phase runs (``LocalExecution.describe()``, the manifest's ``execution``), in words."""
    return "in one process" if execution["mode"] == "in_memory" else f"{execution['workers']} worker processes"


def _bound(value: Any) -> str:
    return "none" if value is None else f"{value:.4f}"


def responsible_lines(counters: dict[str, dict[str, int]]) -> list[str]:
    """One line per responsible-data stage that ran in phase 1 (its Beam counters): faces and NSFW, semantic
    duplicates."""
    lines = []
    safety = counters.get("safety")
    if safety:
        lines.append(f"faces: {safety.get('faces', 0):,} in {safety.get('images_with_faces', 0):,} of "
                     f"{safety.get('images_checked', 0):,} images checked; person clusters "
                     f"{safety.get('person_clusters', 0):,} ({safety.get('person_subject_clusters', 0):,} dropped); "
                     f"faces blurred {safety.get('faces_blurred', 0):,}; NSFW photos {safety.get('nsfw_input', 0):,}")
    semantic = counters.get("semantic_dedup")
    if semantic:
        lines.append(f"semantic duplicates: {semantic.get('duplicate_groups_cluster', 0):,} groups of clusters "
                     f"({semantic.get('semantic_duplicate_cluster_clusters', 0):,} clusters dropped), "
                     f"{semantic.get('duplicate_groups_image', 0):,} groups of images "
                     f"({semantic.get('semantic_duplicate_image', 0):,} images dropped)")
    return lines


def cluster_filter_note(stats: dict[str, Any]) -> str | None:
    """A sentence on the floor under a calibrated coherence threshold, when it bound the result or fewer clusters
    than requested were kept (``stats.clusters.cluster_filter``); ``None`` otherwise."""
    if stats.get("mode") != "target_keep_rate":
        return None
    parts = []
    if stats.get("floor_bound"):
        parts.append(f"the floor cluster_filter.coherence_threshold {stats.get('floor')} bound the threshold (the "
                     f"calibrated one was {_bound(stats.get('calibrated_threshold'))})")
    if stats.get("short_of_request"):
        parts.append(f"{stats.get('kept', 0):,} clusters kept of the {stats.get('requested', 0):,} requested, "
                     f"{stats['short_of_request']:,} short")
    return ("Cluster filter: " + "; ".join(parts) + ".") if parts else None


def target_filter_note(stats: dict[str, Any]) -> str | None:
    """A sentence on the floors under the calibrated similarity bounds, when one bound the result or fewer candidates
    than requested were kept (``stats.assemble.target_filter``); ``None`` otherwise."""
    if stats.get("mode") != "target_keep_rate":
        return None
    calibration = stats.get("calibration", {})
    parts = [f"the floor target_filter.{name} {bound['floor']} bound it (the calibrated bound was "
             f"{_bound(bound['calibrated'])})" for name, bound in calibration.get("floors", {}).items()
             if bound.get("floor_bound")]
    if calibration.get("below_floors"):
        parts.append(f"{calibration['below_floors']:,} candidates passing the absolute checks are under a floor")
    short = calibration.get("short_of_request")
    if short:
        cause = ("the floors" if calibration.get("limited_by_floors") else "the absolute checks"
                 if calibration.get("limited_by_absolute_checks") else "ties in the scores")
        parts.append(f"{calibration.get('expected_kept', 0):,} kept of the {calibration.get('requested', 0):,} "
                     f"requested, {short:,} short (limited by {cause})")
    if not (calibration.get("floor_bound") or short):
        return None
    return "Target filter: " + "; ".join(parts) + "."


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
