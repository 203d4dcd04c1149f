"""Record accounting: every record, cluster and candidate that enters a phase is written or rejected with a reason.

Counts come from what was actually written, not from what the stages believe they did. Phase 1: ``kept`` is the
number of images in ``clusters/``, ``rejected`` the images accounted for by ``rejects/clusters-*`` rows, per
reason, and ``input`` the ``read/records`` Beam counter; ``input == kept + sum(rejected)`` must hold
(:func:`reconcile`). Phase 2 reconciles clusters (``input == written + rejected``), phase 3 candidates
(``input == examples + sum(rejected)``). When they do not, a record was lost -- a bug -- and the command fails
(:func:`failure`). Beam counters of every stage are recorded alongside, per phase, and :func:`funnel` lists
every step from input records to examples with what left before it.

Which reject rows stand for a whole cluster is declared by the stage modules (their ``REASONS``), read from the
phase's entry in the registry (:mod:`pipeline.phases`, :func:`whole_cluster_reasons`).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from apache_beam.io.filesystems import FileSystems

from dreambooth_synth.synthesizer import PARTS
from pipeline.config import PipelineConfig
from pipeline.manifest import MANIFEST, now
from transforms.outputs import matching_files, parquet_footer, read_columns, read_stats
from transforms.read import TRUNCATED_FILE

if TYPE_CHECKING:
    from pipeline.phases import Phase, PhaseInputs


INPUT_STAGES = ("read", "extract")
"""The stages whose ``records`` counter is phase 1's input: records read from files, ``<img>`` found on WARC pages."""


def beam_counters(result: Any) -> dict[str, dict[str, int]]:
    """``{namespace: {name: value}}`` of a finished pipeline's counters (committed where supported)."""
    counters: dict[str, dict[str, int]] = {}
    for counter in result.metrics().query()["counters"]:
        try:
            value = counter.committed
        except Exception:  # noqa: BLE001 -- some runners support only attempted metrics
            value = None
        if value is None:
            value = counter.attempted
        name = counter.key.metric
        section = counters.setdefault(name.namespace, {})
        section[name.name] = section.get(name.name, 0) + int(value or 0)
    return {ns: dict(sorted(values.items())) for ns, values in sorted(counters.items())}


def largest_elements(result: Any, pipeline: Any = None, top: int = 3) -> dict[str, Any]:
    """The largest element Beam sampled in any PCollection (its ``sampled_byte_size`` monitoring info), with the
    ``top`` PCollections holding the largest; empty where the runner does not report it (the portable runner's
    results carry user metrics only). Beam's data plane warns at 512 MB per element and fails at 2 GB."""
    infos = getattr(result, "monitoring_infos", None)
    if infos is None:
        return {}
    from apache_beam.metrics import monitoring_infos as mi

    largest: dict[str, int] = {}
    for info in infos():
        if info.urn != mi.SAMPLED_BYTE_SIZE_URN:
            continue
        _, _, _, maximum = mi.extract_distribution(info)
        pcollection = info.labels.get(mi.PCOLLECTION_LABEL, "?")
        largest[pcollection] = max(largest.get(pcollection, 0), int(maximum))
    if not largest:
        return {}
    names: dict[str, str] = {}
    if pipeline is not None:  # PCollection ids -> the labels a data engineer knows ("Normalize/Normalize.None")
        names = {pid: pc.unique_name.lstrip("0123456789")
                 for pid, pc in pipeline.to_runner_api().components.pcollections.items()}
    ranked = sorted(largest.items(), key=lambda kv: -kv[1])[:top]
    return {"max_bytes": ranked[0][1],
            "largest": [{"pcollection": names.get(p, p), "max_bytes": b} for p, b in ranked]}


# --- each phase's summary -------------------------------------------------------------------------------------


def clusters_summary(phase: Phase, output_dir: str, counters: dict[str, dict[str, int]], inputs: PhaseInputs,
                     config: PipelineConfig, started: float) -> dict[str, Any]:
    """Phase clusters: the ``records`` block (input records kept or rejected, per reason), the clusters written and
    dropped whole, per reason."""
    written = cluster_summary(output_dir)
    rejects = reject_summary(output_dir, "clusters")
    # The phase's input: the records read from files plus every <img> found on WARC pages (each a pair or a reject).
    sources = {stage: counters.get(stage, {}).get("records", 0) for stage in INPUT_STAGES}
    n_input = sum(sources.values())
    whole = whole_cluster_reasons(phase)
    cluster_rejects = {reason: rows for reason, rows in rejects["rows"].items() if reason in whole}
    # File-level rows account for no record: they are listed apart from the record funnel.
    rejected_records = {reason: n for reason, n in rejects["images"].items() if reason != TRUNCATED_FILE}
    records = reconcile(n_input, written["images"], rejected_records)
    truncated = reject_rows(output_dir, "clusters", TRUNCATED_FILE, ["source", "detail"])
    if truncated:
        records["truncated_files"] = [{"path": row["source"], "detail": row["detail"]} for row in truncated]
    summary: dict[str, Any] = {
        "wall_seconds": round(time.monotonic() - started, 3),
        "records": records,
        "clusters": {"written": written["clusters"], "rejected": cluster_rejects},
        "rejects_by_stage": rejects["by_stage"],
        "counters": counters,
        "stats": read_stats(output_dir, "clusters"),
    }
    if sources.get("extract"):
        summary["input_records"] = sources  # where they came from: files read, <img> found on WARC pages
    if "fetch" in counters or "fetch" in rejects["by_stage"]:
        fetch = counters.get("fetch", {})
        summary["fetch"] = {"fetched": fetch.get("fetched", 0), "passed_through": fetch.get("passed_through", 0),
                            "bytes": fetch.get("bytes", 0), "rejected": rejects["by_stage"].get("fetch", {})}
    return summary


def synthesize_summary(phase: Phase, output_dir: str, counters: dict[str, dict[str, int]], inputs: PhaseInputs,
                       config: PipelineConfig, started: float) -> dict[str, Any]:
    """Phase synthesize: the ``clusters`` block (input clusters synthesized, read from the cache or rejected),
    the candidates written and the seconds per cluster."""
    written = synthesis_summary(output_dir)
    rejects = reject_summary(output_dir, "synthesize")
    stage = counters.get("synthesize", {})
    rejected = rejects["rows"]
    n_input = inputs.n_input
    accounted = written["clusters"] + sum(rejected.values())
    clusters = {
        "input": n_input,
        "synthesized": stage.get("clusters_trained", 0),
        "cached": stage.get("clusters_cached", 0),
        "rejected": rejected,
        "written": written["clusters"],
        "reconciled": n_input == accounted and written["clusters"] == stage.get("clusters_trained", 0)
        + stage.get("clusters_cached", 0),
    }
    if n_input != accounted:
        clusters["unaccounted"] = n_input - accounted
    summary = {
        "wall_seconds": round(time.monotonic() - started, 3),
        "inputs": list(inputs.cluster_files),
        "model": config.synth.model.name,
        "clusters": clusters,
        "candidates": written["candidates"],
        "seconds_per_cluster": written["seconds"],
        "counters": counters,
    }
    if "per_cluster_seconds" in written:
        summary["per_cluster_seconds"] = written["per_cluster_seconds"]
    return summary


def assemble_summary(phase: Phase, output_dir: str, counters: dict[str, dict[str, int]], inputs: PhaseInputs,
                     config: PipelineConfig, started: float) -> dict[str, Any]:
    """Phase assemble: the ``candidates`` block (input candidates that became examples or were rejected, per
    reason), the examples written and the target filter's numbers."""
    from transforms.models.clip import model_id  # (loads Beam's RunInference; ``icl-pipeline report`` needs none)

    examples = examples_summary(output_dir)
    rejects = reject_summary(output_dir, "assemble")
    rejected = rejects["rows"]  # one row per candidate
    scored = read_columns(FileSystems.join(output_dir, "scores", "*.parquet"), ["candidate_id"])
    n_input = inputs.n_input
    accounted = examples["examples"] + sum(rejected.values())
    candidates: dict[str, Any] = {
        "input": n_input,
        "scored": 0 if scored is None else scored.num_rows,
        "kept_by_filter": counters.get("target_filter", {}).get("kept", 0),
        "examples": examples["examples"],
        "rejected": rejected,
        "keep_rate": round(examples["examples"] / n_input, 6) if n_input else None,
        "reconciled": n_input == accounted,
    }
    if n_input != accounted:
        candidates["unaccounted"] = n_input - accounted
    return {
        "wall_seconds": round(time.monotonic() - started, 3),
        "inputs": list(inputs.candidate_files),
        "cluster_inputs": list(inputs.cluster_files),
        "clip_model": model_id(config.embed),
        "candidates": candidates,
        "rejects_by_stage": rejects["by_stage"],
        "examples": examples,
        "counters": counters,
        "stats": read_stats(output_dir, "assemble"),
    }


_SUMMARIES = {"clusters": clusters_summary, "synthesize": synthesize_summary, "assemble": assemble_summary}


def summarize(phase: Phase, output_dir: str, counters: dict[str, dict[str, int]], inputs: PhaseInputs,
              config: PipelineConfig, started: float) -> dict[str, Any]:
    """A finished phase's summary, from what it wrote under ``output_dir`` and its Beam ``counters``."""
    return _SUMMARIES[phase.name](phase, output_dir, counters, inputs, config, started)


def whole_cluster_reasons(phase: Phase) -> frozenset[str]:
    """The reasons of a phase whose reject rows stand for a whole cluster (one row, ``n_images`` images)."""
    return frozenset(reason.code for reason in phase.reasons() if reason.whole_cluster)

RECONCILED_BLOCK = {"clusters": "records", "synthesize": "clusters", "assemble": "candidates"}
"""The block of each phase's summary whose counts must reconcile."""

TOP_LEVEL_BLOCKS = {"clusters": ("records", "clusters"), "synthesize": (), "assemble": ("candidates",)}
"""The blocks of a phase's summary that the manifest also holds at its top level."""


def record_phase(manifest: dict[str, Any], phase: str, summary: dict[str, Any]) -> None:
    """Put a finished phase's summary into the manifest and bring its funnel up to date."""
    for block in TOP_LEVEL_BLOCKS[phase]:
        manifest[block] = summary[block]
    manifest["phases"][phase] = {"finished": now(), **summary}
    manifest["funnel"] = funnel(manifest)
    run_cost = cost(manifest)
    if run_cost:
        manifest["cost"] = run_cost


COST_UNIT = ("device-seconds of phase 2 (per cluster: load, latents, prior, train, sample, cleanup), on the device "
             "the synthesis workers had: GPU-seconds on GPU workers; with several worker processes sharing one GPU, "
             "divide by their number")


def cost(manifest: dict[str, Any]) -> dict[str, Any]:
    """What synthesis cost, from the run's own figures: seconds per cluster and per kept example, and the hours
    that N clusters or examples would take -- the numbers a data engineer budgets with. Empty before phase 2."""
    synth = manifest.get("phases", {}).get("synthesize")
    seconds = (synth or {}).get("seconds_per_cluster", {}).get("total") or {}
    if not seconds.get("mean"):
        return {}
    per_cluster, total = float(seconds["mean"]), float(seconds["total"])
    out: dict[str, Any] = {
        "unit": COST_UNIT,
        "device": (manifest.get("config", {}).get("synth", {}).get("model", {}) or {}).get("device"),
        "clusters": synth.get("clusters", {}).get("written"),
        "seconds_per_cluster": round(per_cluster, 3),
        "seconds_total": round(total, 1),
        "hours_per_10000_clusters": round(per_cluster * 10_000 / 3600, 2),
    }
    examples = (manifest.get("candidates") or {}).get("examples")
    if examples:
        per_example = total / examples
        out.update({"examples": examples, "seconds_per_example": round(per_example, 3),
                    "hours_per_100000_examples": round(per_example * 100_000 / 3600, 2)})
    return out


_UNIT = {"clusters": "records", "synthesize": "clusters", "assemble": "candidates"}


def failure(phase: str, summary: dict[str, Any], allow_truncated: bool) -> str | None:
    """Why a finished phase must fail the run (counts that do not reconcile, a truncated input), or ``None``."""
    block = summary[RECONCILED_BLOCK[phase]]
    if not block["reconciled"]:
        what = {"clusters": "counts", "synthesize": "synthesis counts", "assemble": "candidate counts"}[phase]
        return (f"{what} do not reconcile: {block} -- some {_UNIT[phase]} were lost; this is a bug, please report it "
                f"with {MANIFEST}")
    truncated = block.get("truncated_files", []) if phase == "clusters" else []
    if truncated and not allow_truncated:
        listing = "; ".join(f"{t['path']}: {t['detail']}" for t in truncated)
        return (f"{len(truncated)} input file(s) end early, so this run covers only part of them: {listing}. Every "
                f"output is written and consistent for the records that were read; re-fetch the file(s), or accept "
                f"the shortened input with --set read.allow_truncated=true")
    return None


# --- what was written -------------------------------------------------------------------------------------------


def reject_summary(output_dir: str, phase: str) -> dict[str, Any]:
    """Images and rows per reason (and per stage) in ``OUT/rejects/<phase>-*.parquet``."""
    table = read_columns(FileSystems.join(output_dir, "rejects", f"{phase}-*.parquet"),
                         ["stage", "reason", "n_images"])
    images: Counter[str] = Counter()
    rows: Counter[str] = Counter()
    by_stage: dict[str, Counter[str]] = {}
    if table is not None:
        for stage, reason, n in zip(*(table.column(c).to_pylist() for c in ("stage", "reason", "n_images")),
                                    strict=True):
            images[reason] += n
            rows[reason] += 1
            by_stage.setdefault(stage, Counter())[reason] += n
    return {
        "images": dict(sorted(images.items())),
        "rows": dict(sorted(rows.items())),
        "by_stage": {stage: dict(sorted(c.items())) for stage, c in sorted(by_stage.items())},
    }


def reject_rows(output_dir: str, phase: str, reason: str, columns: list[str]) -> list[dict[str, Any]]:
    """The ``columns`` of the rows of ``OUT/rejects/<phase>-*.parquet`` with ``reason``, sorted by the first column."""
    table = read_columns(FileSystems.join(output_dir, "rejects", f"{phase}-*.parquet"), ["reason", *columns])
    if table is None:
        return []
    rows = [row for row in table.to_pylist() if row.pop("reason") == reason]
    return sorted(rows, key=lambda row: str(row[columns[0]]))


def cluster_summary(output_dir: str) -> dict[str, int]:
    """Clusters and images in ``OUT/clusters/*.parquet``."""
    table = read_columns(FileSystems.join(output_dir, "clusters", "*.parquet"), ["stats"])
    if table is None:
        return {"clusters": 0, "images": 0}
    n_images = table.column("stats").combine_chunks().field("n_images").to_pylist()
    return {"clusters": len(n_images), "images": int(sum(n_images))}


def reconcile(n_input: int, kept: int, rejected: dict[str, int]) -> dict[str, Any]:
    """The ``records`` block: ``input == kept + sum(rejected)`` or ``reconciled: false``."""
    total = kept + sum(rejected.values())
    return {
        "input": n_input,
        "kept": kept,
        "rejected": dict(sorted(rejected.items())),
        "reconciled": n_input == total,
        **({} if n_input == total else {"unaccounted": n_input - total}),
    }


def _seconds_summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def quantile(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"total": round(sum(values), 3), "mean": round(sum(values) / len(values), 3), "p50": quantile(0.5),
            "p90": quantile(0.9), "max": round(ordered[-1], 3)}


PER_CLUSTER_SECONDS_LIMIT = 10_000
"""The manifest lists each cluster's seconds up to this many clusters; beyond, only their distribution
(every candidate row of ``candidates/`` carries its cluster's seconds)."""


def synthesis_summary(output_dir: str) -> dict[str, Any]:
    """Clusters, candidates and per-cluster seconds as written in ``OUT/candidates/*.parquet``."""
    table = read_columns(FileSystems.join(output_dir, "candidates", "*.parquet"), ["cluster_id", "seconds"])
    per_cluster: dict[str, dict[str, float]] = {}
    n_candidates = 0
    if table is not None:
        n_candidates = table.num_rows
        for cluster_id, seconds in zip(table.column("cluster_id").to_pylist(), table.column("seconds").to_pylist(),
                                       strict=True):
            if cluster_id not in per_cluster and seconds is not None:
                per_cluster[cluster_id] = {k: round(float(seconds[k]), 3) for k in (*PARTS, "total")}
    summary: dict[str, Any] = {
        "clusters": len(per_cluster),
        "candidates": n_candidates,
        "seconds": {part: _seconds_summary([s[part] for s in per_cluster.values()]) for part in (*PARTS, "total")},
    }
    if len(per_cluster) <= PER_CLUSTER_SECONDS_LIMIT:
        summary["per_cluster_seconds"] = dict(sorted(per_cluster.items()))
    return summary


def examples_summary(output_dir: str) -> dict[str, Any]:
    """Files, examples, row groups and bytes of ``OUT/examples/*.parquet`` (from the footers)."""
    files = matching_files(FileSystems.join(output_dir, "examples", "*.parquet"))
    rows = groups = size = 0
    for path in files:
        metadata = parquet_footer(path)[0]
        rows += metadata.num_rows
        groups += metadata.num_row_groups
        size += FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    return {"files": len(files), "examples": rows, "row_groups": groups, "bytes": size}


# --- the funnel -------------------------------------------------------------------------------------------------


def funnel(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The steps from input records to examples that the manifest knows of, each with its count, its unit and
    what left the pipeline between the previous step and it, by reason.

    Within a unit the counts chain: a step's count is the previous step's minus its ``rejected``. The unit
    changes twice: records become clusters (a cluster holds several images) and clusters become candidates
    (a cluster renders several).
    """
    steps: list[dict[str, Any]] = []
    records = manifest.get("records")
    phases = manifest.get("phases", {})
    if records:
        steps.append({"step": "input records", "unit": "records", "count": records["input"]})
        rejected = records["rejected"]
        if "fetch" in phases.get("clusters", {}):
            # With the fetch stage: what read, extract and fetch refused before any image byte was looked at.
            early = early_rejects(phases["clusters"].get("rejects_by_stage", {}))
            steps.append({"step": "records with image bytes", "unit": "records",
                          "count": records["input"] - sum(early.values()), "rejected": early})
            rejected = {reason: n - early.get(reason, 0) for reason, n in rejected.items()
                        if n - early.get(reason, 0)}
        steps.append({"step": "images kept in clusters", "unit": "records", "count": records["kept"],
                      "rejected": rejected})
    clusters = manifest.get("clusters")
    if clusters:
        steps.append({"step": "clusters written", "unit": "clusters", "count": clusters["written"],
                      "dropped_whole": clusters.get("rejected", {})})
    synth = phases.get("synthesize")
    if synth:
        if not clusters:
            steps.append({"step": "input clusters", "unit": "clusters", "count": synth["clusters"]["input"]})
        steps.append({"step": "clusters synthesized", "unit": "clusters", "count": synth["clusters"]["written"],
                      "rejected": synth["clusters"]["rejected"]})
        steps.append({"step": "candidates rendered", "unit": "candidates", "count": synth["candidates"]})
    candidates = manifest.get("candidates")
    assemble = phases.get("assemble")
    if candidates and assemble:
        by_stage = assemble.get("rejects_by_stage", {})
        if not synth:
            steps.append({"step": "input candidates", "unit": "candidates", "count": candidates["input"]})
        steps.append({"step": "candidates scored", "unit": "candidates", "count": candidates["scored"],
                      "rejected": by_stage.get("score", {})})
        steps.append({"step": "kept by the target filter", "unit": "candidates",
                      "count": candidates["kept_by_filter"], "rejected": by_stage.get("target_filter", {})})
        steps.append({"step": "examples", "unit": "examples", "count": candidates["examples"],
                      "rejected": by_stage.get("assemble", {})})
    return steps


FETCH_STAGES = ("read", "extract", "fetch")
"""The stages up to the fetch stage: what they reject never had image bytes looked at."""


def early_rejects(by_stage: dict[str, dict[str, int]]) -> dict[str, int]:
    """Records the stages up to fetch rejected, by reason (file-level ``truncated_file`` rows count none)."""
    early: Counter[str] = Counter()
    for stage in FETCH_STAGES:
        early.update({reason: n for reason, n in by_stage.get(stage, {}).items() if reason != TRUNCATED_FILE})
    return dict(sorted((reason, n) for reason, n in early.items() if n))


def departures(step: dict[str, Any]) -> dict[str, int]:
    """What left before a :func:`funnel` step, by reason (whole-cluster drops marked as such)."""
    return {**step.get("rejected", {}),
            **{f"{reason} (whole clusters)": n for reason, n in step.get("dropped_whole", {}).items()}}
