"""Benchmark: phase 3 (score -> target filter -> assemble -> examples/) through Beam against a plain loop doing the
same work in one process, in the same run.

Inputs, built once: phase 1 on the bundled sample (demo profile: real clusters with stored tiny-random
embeddings), and ``--per-cluster`` candidates per cluster whose renders are real sample photos of *other* clusters
resized to 512 px PNGs (the size and encoding of SD 1.5 renders).

* **Beam**: ``pipeline.phases.build_assemble_pipeline`` on the in-memory DirectRunner: read, join, RunInference,
  calibration with side inputs, assembly, byte-sized shards -- the phase as it runs, start-up and model load
  included (they are also in the loop's time).
* **plain loop**: the project's plain functions called directly: read both files with pyarrow, per cluster
  decode + heuristics + hash + eval transform, one image and one text forward pass per cluster, the same scores,
  exact quantiles and the same calibration, demos, rows, and one pyarrow file written the same way.

Both sides also run on the candidates of one cluster: the difference gives each side's *marginal* rate
(candidates per second once started), which leaves out fixed costs -- Beam's graph construction and runner
start-up, both sides' model load -- that do not grow with the data.

CPU: ``tiny-random`` (decoding dominates) and ``ViT-B-32`` with random weights (the model dominates; nothing is
downloaded). Each side runs ``--repeats`` times, interleaved; the best run of each counts.

    python benchmarks/bench_assemble.py --output benchmarks/results/assemble.json
"""

from __future__ import annotations

import argparse
import datetime
import io
import itertools
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import apache_beam as beam  # noqa: E402
import imagehash  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import PipelineConfig, build_config, config_hash  # noqa: E402
from pipeline.phases import build_assemble_pipeline  # noqa: E402
from pipeline.run import run  # noqa: E402
from schemas.ids import hamming, stable_id  # noqa: E402
from schemas.parquet import (  # noqa: E402
    CANDIDATES_SCHEMA,
    EXAMPLES_SCHEMA,
    candidate_from_row,
    candidate_to_row,
    cluster_from_row,
    example_to_row,
)
from schemas.records import Candidate, SampleSettings, ScoredCandidate, SynthSeconds, TrainSettings  # noqa: E402
from transforms.assemble import RunProvenance, choose_demos, make_example  # noqa: E402
from transforms.models.clip import decode_image, image_transform, load_image_encoder, model_id  # noqa: E402
from transforms.outputs import cut_row_groups, row_bytes  # noqa: E402
from transforms.score import image_quality, nearest_image, target_prompt, target_scores  # noqa: E402
from transforms.target_filter import Bounds, calibrate, failures, level_of  # noqa: E402

LOG = logging.getLogger("bench_assemble")


def make_inputs(folder: str, per_cluster: int) -> tuple[str, list[str], int]:
    """Phase 1 on the sample, and a candidates file of ``per_cluster`` renders per cluster."""
    out = os.path.join(folder, "phase1")
    run(["--input", str(REPO / "sample" / "crawl.parquet"), "--output", out, "--profile", "demo",
         "--phases", "clusters"])
    cluster_files = sorted(str(p) for p in Path(out, "clusters").glob("*.parquet"))
    clusters = [cluster_from_row(r) for f in cluster_files for r in pq.read_table(f).to_pylist()]
    photos = [im.image for c in clusters for im in c.images]
    renders = []
    for photo in photos[::3]:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(photo)).convert("RGB").resize((512, 512), Image.Resampling.LANCZOS).save(buffer, "PNG")
        renders.append(buffer.getvalue())
    train = TrainSettings("tiny-random", "lora", 30, 0.01, 4, False, 1, 512, False, None, "float32", 1,
                          "a photo of sks object")
    sample = SampleSettings("dpm++", 25, 7.5, "", per_cluster)
    seconds = SynthSeconds(0, 0, 0, 0, 0, 0, 0)
    rows = []
    for n, cluster in enumerate(clusters):
        prompts = cluster.prompts or ()
        for k in range(per_cluster):
            template = prompts[k % len(prompts)].prompt if prompts else "a {subject} on a beach"
            noun = cluster.class_noun or "object"
            rows.append(candidate_to_row(Candidate(
                candidate_id=stable_id("bench", cluster.cluster_id, k), cluster_id=cluster.cluster_id,
                page_url=cluster.page_url, prompt=template.replace("{subject}", f"sks {noun}"),
                prompt_template=template, skill="recontextualization", subject=cluster.subject, class_noun=noun,
                identifier="sks", k=k, seed=k, image=renders[(n * 7 + k) % len(renders)], width=512, height=512,
                nsfw=None, train=train, sample=sample, final_loss=0.5, n_train_images=len(cluster.images),
                seconds=seconds, synth_config_hash="bench")))
    path = os.path.join(folder, "candidates.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=CANDIDATES_SCHEMA), path)
    small = os.path.join(folder, "candidates-one-cluster.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:per_cluster], schema=CANDIDATES_SCHEMA), small)
    return path, cluster_files, len(rows)


def beam_side(config: PipelineConfig, candidates: str, clusters: list[str], out: str) -> float:
    options = PipelineOptions(["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    started = time.perf_counter()
    p = beam.Pipeline(options=options)
    build_assemble_pipeline(p, config, [candidates], clusters, out)
    p.run().wait_until_finish()
    return time.perf_counter() - started


def _exact_quantiles(values: list[float], m: int = 1001) -> list[float]:
    ordered = sorted(values)
    return [ordered[round(i * (len(ordered) - 1) / (m - 1))] for i in range(m)] if ordered else []


def plain_loop(config: PipelineConfig, candidates_path: str, cluster_files: list[str], out: str) -> tuple[float, int]:
    """Seconds of the same work without Beam, and the examples written."""
    started = time.perf_counter()
    clusters = {c.cluster_id: c for f in cluster_files for c in map(cluster_from_row, pq.read_table(f).to_pylist())}
    groups: dict[str, list[Candidate]] = {}
    for row in pq.read_table(candidates_path).to_pylist():
        candidate = candidate_from_row(row)
        groups.setdefault(candidate.cluster_id, []).append(candidate)
    encoder = load_image_encoder(config.embed, text=True)
    transform = image_transform(config.embed)
    scoring_model = model_id(config.embed)
    scored: list[tuple[Any, ScoredCandidate]] = []
    for cluster_id, candidates in sorted(groups.items()):
        cluster = clusters[cluster_id]
        images = [decode_image(c.image) for c in candidates]
        qualities = [image_quality(im, config.score.sharpness_side) for im in images]
        hashes = [str(imagehash.phash(im)) for im in images]
        pixels = [transform(im) for im in images]
        if cluster.provenance.embed_model == scoring_model and all(im.embedding is not None for im in cluster.images):
            references = np.stack([im.embedding for im in cluster.images])
            references /= np.linalg.norm(references, axis=1, keepdims=True)
        else:
            references = encoder.embed(torch.stack([transform(decode_image(im.image)) for im in cluster.images]))
        targets = np.concatenate([encoder.embed(torch.stack(pixels[i:i + config.embed.batch_size]))
                                  for i in range(0, len(pixels), config.embed.batch_size)])
        texts = encoder.embed_texts([target_prompt(c) for c in candidates])
        ids = [im.image_id for im in cluster.images]
        for i, candidate in enumerate(candidates):
            distances = [hamming(hashes[i], im.phash) for im in cluster.images]
            sims = references.astype(np.float64) @ targets[i].astype(np.float64)
            scores = target_scores(sims, float(targets[i] @ texts[i]), qualities[i], distances)
            scored.append((cluster, ScoredCandidate(candidate, target_prompt(candidate), scores,
                                                    ids[nearest_image(sims, distances, ids)])))
    filter_config = config.target_filter
    eligible = [s for _, s in scored if not failures(s, filter_config, None)]
    q_subject = _exact_quantiles([s.scores.subject_sim for s in eligible])
    q_text = _exact_quantiles([s.scores.text_sim for s in eligible])
    histogram = [0] * 1001
    for s in eligible:
        histogram[level_of(s.scores.subject_sim, s.scores.text_sim, q_subject, q_text)] += 1
    calibration = calibrate(histogram, q_subject, q_text, len(scored), filter_config.target_keep_rate)
    bounds = Bounds(calibration["min_subject_sim"], calibration["min_text_sim"])
    provenance = RunProvenance("bench", config_hash(config), scoring_model)
    rows = []
    for cluster, s in scored:
        if failures(s, filter_config, bounds):
            continue
        demos = choose_demos(cluster, s.source_image_id, s.candidate.candidate_id, config.assemble.demos)
        if demos is not None:
            rows.append(example_to_row(make_example(cluster, s, demos, provenance)))
    os.makedirs(out, exist_ok=True)
    write_plain(os.path.join(out, "part-00000-of-00001.parquet"), rows, config.assemble.row_group_bytes,
                config.output.codec)
    return time.perf_counter() - started, len(rows)


def write_plain(path: str, rows: list[dict[str, Any]], row_group_bytes: int, codec: str) -> None:
    """One examples file as the phase writes it (rows in id order, row groups of about ``row_group_bytes``), by one
    process with pyarrow."""
    rows = sorted(rows, key=lambda row: row["example_id"])
    group_of = dict(cut_row_groups(((row["example_id"], row_bytes(row)) for row in rows), row_group_bytes))
    with pq.ParquetWriter(path, EXAMPLES_SCHEMA, compression=codec) as writer:
        for _, group in itertools.groupby(rows, key=lambda row: group_of[row["example_id"]]):
            batch = list(group)
            writer.write_table(pa.Table.from_pylist(batch, schema=EXAMPLES_SCHEMA), row_group_size=len(batch))


def bench_model(model: str, folder: str, candidates: str, clusters: list[str], n: int,
                repeats: int) -> dict[str, Any]:
    overrides = [f"embed.model={model}", "embed.pretrained=null", "embed.batch_size=64", "report.enabled=false",
                 "card.enabled=false", "target_filter.min_side=256"]
    config = build_config("demo", overrides=overrides)
    small = candidates.replace("candidates.parquet", "candidates-one-cluster.parquet")
    n_small = pq.ParquetFile(small).metadata.num_rows
    loops, beams, small_loops, small_beams, examples = [], [], [], [], 0
    for attempt in range(repeats):
        seconds, examples = plain_loop(config, candidates, clusters, os.path.join(folder, f"loop-{model}-{attempt}"))
        loops.append(seconds)
        beams.append(beam_side(config, candidates, clusters, os.path.join(folder, f"beam-{model}-{attempt}")))
        small_loops.append(plain_loop(config, small, clusters, os.path.join(folder, f"sloop-{model}-{attempt}"))[0])
        small_beams.append(beam_side(config, small, clusters, os.path.join(folder, f"sbeam-{model}-{attempt}")))
        LOG.info("%s run %d: plain loop %.1f s, beam %.1f s (%d candidates); one cluster: %.1f s, %.1f s", model,
                 attempt + 1, loops[-1], beams[-1], n, small_loops[-1], small_beams[-1])
    beam_examples = sum(pq.ParquetFile(p).metadata.num_rows
                        for p in Path(folder, f"beam-{model}-0", "examples").glob("*.parquet"))
    loop_s, beam_s = min(loops), min(beams)
    loop_marginal = (n - n_small) / max(loop_s - min(small_loops), 1e-9)
    beam_marginal = (n - n_small) / max(beam_s - min(small_beams), 1e-9)
    return {
        "model": model,
        "candidates": n,
        "examples": {"plain_loop": examples, "beam": beam_examples},
        "repeats": repeats,
        "plain_loop_candidates_per_s": round(n / loop_s, 2),
        "beam_candidates_per_s": round(n / beam_s, 2),
        "ratio": round(loop_s / beam_s, 3),
        "one_cluster_s": {"plain_loop": round(min(small_loops), 2), "beam": round(min(small_beams), 2)},
        "plain_loop_marginal_candidates_per_s": round(loop_marginal, 2),
        "beam_marginal_candidates_per_s": round(beam_marginal, 2),
        "ratio_marginal": round(beam_marginal / loop_marginal, 3),
        "all_runs_s": {"plain_loop": [round(s, 2) for s in loops], "beam": [round(s, 2) for s in beams],
                       "plain_loop_one_cluster": [round(s, 2) for s in small_loops],
                       "beam_one_cluster": [round(s, 2) for s in small_beams]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "assemble.json"))
    parser.add_argument("--per-cluster", type=int, default=32, help="Candidates per cluster (8 prompts x K=4).")
    parser.add_argument("--vit-per-cluster", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-assemble-") as folder:
        for model, per_cluster in (("tiny-random", args.per_cluster), ("ViT-B-32", args.vit_per_cluster)):
            sub = os.path.join(folder, model)
            os.makedirs(sub)
            candidates, clusters, n = make_inputs(sub, per_cluster)
            results.append(bench_model(model, sub, candidates, clusters, n, args.repeats))

    report = {
        "benchmark": "assemble",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "what": "candidates/s of phase 3 end to end (read, join, score with CLIP, calibrate, filter, assemble, write "
                "examples/): the Beam pipeline on the in-memory DirectRunner vs a plain loop calling the same "
                "functions in one process; both include model load; ratio = beam rate / loop rate; marginal: "
                "(all - one cluster) candidates over (all - one cluster) seconds, fixed costs left out",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "apache_beam": beam.__version__, "python": platform.python_version()},
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(f"{r['model']:12} {r['candidates']:5} candidates: loop {r['plain_loop_candidates_per_s']:7.1f}/s   beam "
              f"{r['beam_candidates_per_s']:7.1f}/s   ratio {r['ratio']:.3f} (marginal, without start-up: "
              f"{r['ratio_marginal']:.3f})   examples {r['examples']}")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
