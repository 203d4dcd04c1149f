"""Benchmark: the cost of semantic dedup against the number of clusters (10^3 -> 10^4 -> 10^5), bucketed by k-means
as the stage does, against comparing all pairs, in the same run.

Synthetic cluster embeddings (768 dimensions, the default ViT-L-14's) shaped like a CLIP space: a direction shared
by everything, ``n / 100`` categories, one product per cluster (``~0.5`` to other products of its category), and
10% of the clusters planted as near copies (cosine ``~0.97``) of another cluster -- the duplicates to find.

* **bucketed**: the stage's own functions, in one process: the deterministic sample (smallest id hashes), the
  k-means fit (``fit_centroids``, scikit-learn), assignment to the two nearest centroids, grouping, and
  ``compare_bucket`` within each bucket (hot buckets split again) -- what the Beam steps run, without the runner;
  also with SemDeDup's single assignment (``assignments: 1``);
* **all pairs**: ``greedy_duplicates`` on all items at once (one bucket: ``n^2`` comparisons), the plain baseline
  and the reference for recall (10^3 and 10^4 only: 10^5 would take ~100x the 10^4 time);
* **Beam**: the ``FindDuplicates`` transform on the in-memory DirectRunner (10^3 and 10^4 by default), start-up
  included.

The growth exponent between two sizes is ``log(t2 / t1) / log(n2 / n1)``: 1 is linear, 2 quadratic; the pairs
actually compared (``pairs_compared``, hot buckets split included) show the same without timing noise. Recall is
the share of the planted duplicates found (in one group of duplicates).

    python benchmarks/bench_semdedup.py --output benchmarks/results/semdedup.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
from apache_beam.testing.test_pipeline import TestPipeline  # noqa: E402

from benchmarks.common import header, write_results  # noqa: E402
from transforms import semantic_dedup  # noqa: E402
from transforms.semantic_dedup import (  # noqa: E402
    FindDuplicates,
    Item,
    SemanticDedupConfig,
    best_winner,
    compare_bucket,
    fit_centroids,
    greedy_duplicates,
    nearest_centroids,
    sample_hash,
    sample_size,
)

DIM = 768
THRESHOLD = 0.95


def _unit(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=-1, keepdims=True)).astype(np.float32)


def make_items(n: int, seed: int = 0) -> tuple[list[Item], set[tuple[str, str]]]:
    """``n`` cluster items and the planted ``(copy key, original key)`` pairs."""
    rng = np.random.default_rng(seed)
    common = _unit(rng.normal(size=DIM))
    categories = _unit(np.sqrt(0.5) * common + np.sqrt(0.5) * _unit(rng.normal(size=(max(1, n // 100), DIM))))
    category = rng.integers(0, len(categories), size=n)
    vectors = _unit(np.sqrt(0.6) * categories[category] + np.sqrt(0.4) * _unit(rng.normal(size=(n, DIM))))
    planted = set()
    copies = rng.choice(n, size=n // 10, replace=False)
    originals = rng.integers(0, n, size=len(copies))
    for c, o in zip(copies, originals, strict=True):
        if c != o:
            vectors[c] = _unit(np.sqrt(0.97) * vectors[o] + np.sqrt(0.03) * _unit(rng.normal(size=DIM)))
    keys = [f"{i:08d}" for i in range(n)]
    items = [Item(keys[i], keys[i], None, f"https://shop.example/{i}", 4, (-4, -float(i % 7) / 10, keys[i]),
                  vectors[i]) for i in range(n)]
    for c, o in zip(copies, originals, strict=True):
        if c != o:
            planted.add(tuple(sorted((keys[c], keys[o]))))
    return items, planted


def recall(duplicates: list, planted: set[tuple[str, str]]) -> float:
    """Share of the planted pairs whose two items end in one group of duplicates (union of the verdicts)."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.get(key, key) != key:
            key = parent[key]
        return key

    for d in duplicates:
        parent[root(d.loser.key)] = root(d.winner.key)
    return round(sum(1 for a, b in planted if root(a) == root(b)) / max(1, len(planted)), 4)


COMPARED = [0]
"""Pairs compared by ``greedy_duplicates`` (counted by the wrapper below: the stage counts them in a Beam counter,
which is not collected outside a pipeline)."""


def _counting_greedy(items, threshold, *args, **kwargs):
    COMPARED[0] += len(items) * (len(items) - 1) // 2
    return greedy_duplicates(items, threshold, *args, **kwargs)


semantic_dedup.greedy_duplicates = _counting_greedy  # what compare_bucket calls


def bucketed(items: list[Item], config: SemanticDedupConfig) -> tuple[list, dict[str, Any]]:
    COMPARED[0] = 0
    started = time.perf_counter()
    n = len(items)
    sample = sorted(((sample_hash(it.key), it.vector.astype(np.float16)) for it in items),
                    key=lambda pair: pair[0])[:config.max_sample]
    t_sample = time.perf_counter()
    centroids = fit_centroids(sample, n, config)
    t_fit = time.perf_counter()
    buckets: dict[int, list[Item]] = defaultdict(list)
    for it in items:
        for k in nearest_centroids(it.vector, centroids, config.assignments):
            buckets[k].append(it)
    t_assign = time.perf_counter()
    by_loser: dict[str, list] = defaultdict(list)
    pairs = 0
    for members in buckets.values():
        pairs += len(members) * (len(members) - 1) // 2
        for duplicate in compare_bucket(members, THRESHOLD, config):
            by_loser[duplicate.loser.key].append(duplicate)
    duplicates = [best_winner(verdicts) for verdicts in by_loser.values()]
    done = time.perf_counter()
    sizes = [len(m) for m in buckets.values()]
    return duplicates, {"seconds": round(done - started, 3), "sample_seconds": round(t_sample - started, 3),
                        "fit_seconds": round(t_fit - t_sample, 3), "assign_seconds": round(t_assign - t_fit, 3),
                        "compare_seconds": round(done - t_assign, 3), "centroids": len(centroids),
                        "sample": sample_size(n, config), "pairs_compared": COMPARED[0],
                        "pairs_compared_per_item": round(COMPARED[0] / n, 1), "all_pairs": n * (n - 1) // 2,
                        "pairs_in_first_level_buckets": pairs,
                        "largest_first_level_bucket": max(sizes),
                        "mean_bucket": round(n / len(sizes), 1)}


def beam_run(items: list[Item], config: SemanticDedupConfig) -> float:
    started = time.perf_counter()
    with TestPipeline() as p:
        _ = p | beam.Create(items) | FindDuplicates(THRESHOLD, config, "cluster") | beam.combiners.Count.Globally()
    return round(time.perf_counter() - started, 3)


def exponent(rows: list[dict], key: str) -> list[dict]:
    out = []
    for a, b in zip(rows, rows[1:], strict=False):
        if a.get(key) and b.get(key):
            out.append({"from": a["clusters"], "to": b["clusters"],
                        "exponent": round(math.log(b[key] / a[key]) / math.log(b["clusters"] / a["clusters"]), 2)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--all-pairs-max", type=int, default=10000)
    parser.add_argument("--beam-max", type=int, default=10000)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "semdedup.json"))
    args = parser.parse_args()
    config = SemanticDedupConfig()
    single = SemanticDedupConfig(assignments=1)
    bucketed(make_items(1000, seed=1)[0], config)  # warm-up: imports scikit-learn, starts its thread pools
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        items, planted = make_items(n)
        duplicates, stats = bucketed(items, config)
        row: dict[str, Any] = {"clusters": n, "planted_duplicates": len(planted), "bucketed": stats,
                               "bucketed_seconds": stats["seconds"], "bucketed_recall": recall(duplicates, planted)}
        duplicates_1, stats_1 = bucketed(items, single)
        row.update({"single_assignment": stats_1, "single_assignment_seconds": stats_1["seconds"],
                    "single_assignment_recall": recall(duplicates_1, planted)})
        if n <= args.all_pairs_max:
            started = time.perf_counter()
            reference = greedy_duplicates(items, THRESHOLD)
            row["all_pairs_seconds"] = round(time.perf_counter() - started, 3)
            row["all_pairs_recall"] = recall(reference, planted)
        if n <= args.beam_max:
            row["beam_seconds"] = beam_run(items, config)
        print(row, flush=True)
        rows.append(row)
    results = {**header("semdedup"), "dimensions": DIM, "threshold": THRESHOLD,
               "config": {"bucket_size": config.bucket_size, "assignments": config.assignments,
                          "sample_per_centroid": config.sample_per_centroid,
                          "max_centroids": config.max_centroids, "kmeans_iterations": config.kmeans_iterations},
               "rows": rows,
               "growth_exponent": {"bucketed": exponent(rows, "bucketed_seconds"),
                                   "bucketed_pairs_compared": exponent(
                                       [{**r, "pairs": r["bucketed"]["pairs_compared"]} for r in rows], "pairs"),
                                   "single_assignment": exponent(rows, "single_assignment_seconds"),
                                   "all_pairs": exponent(rows, "all_pairs_seconds"),
                                   "beam": exponent(rows, "beam_seconds")}}
    write_results(args.output, results)


if __name__ == "__main__":
    main()
