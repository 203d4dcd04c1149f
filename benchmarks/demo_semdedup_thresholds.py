"""Measurement: which semantic-dedup thresholds keep the demo meaningful with its tiny random CLIP model.

The demo profile embeds with ``tiny-random`` (a two-layer open_clip model with random weights), whose cosine
similarities say little about content. This script runs phase 1 of the demo profile on the bundled sample with
semantic dedup off, then, on the clusters the cluster filter keeps (what the stage would see):

* the similarities of **distinct photos** (the sample's ``note`` column names each photo's DreamBench file: the same
  subject, or another subject) and of the clusters' mean embeddings;
* the similarities of **copies** of those photos made the way crawlers find them (re-encoded and resized, mirrored,
  re-cropped, recoloured) to their originals, embedded by the same model;
* for each candidate threshold, what the stage's own greedy rule (:func:`transforms.semantic_dedup.greedy_duplicates`
  on the items it builds) would drop: images (distinct photos, every one a wrong decision here: the sample's copies
  are gone after the perceptual-hash stages) and clusters.

    python benchmarks/demo_semdedup_thresholds.py --output benchmarks/results/semdedup_demo.json
"""

from __future__ import annotations

import argparse
import glob
import io
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402

from benchmarks.common import header, write_results  # noqa: E402

THRESHOLDS = (0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999)


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def copies(photo: bytes) -> dict[str, bytes]:
    image = Image.open(io.BytesIO(photo)).convert("RGB")
    w, h = image.size
    return {
        "reencoded_q70_400px": jpeg(image.resize((400, 400), Image.Resampling.LANCZOS), 70),
        "reencoded_q90": jpeg(image, 90),
        "mirrored": jpeg(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 85),
        "recropped": jpeg(image.crop((w // 10, h // 10, w - w // 20, h - h // 20)).resize((w, h)), 90),
        "recoloured": jpeg(ImageEnhance.Color(image).enhance(0.4), 88),
    }


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"n": len(values), **{f"p{q:02d}": round(float(np.percentile(values, q)), 5) for q in (0, 10, 50, 90, 99)},
            "max": round(float(max(values)), 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "semdedup_demo.json"))
    args = parser.parse_args()

    import torch

    from pipeline.config import build_config
    from pipeline.run import run
    from schemas.parquet import cluster_from_row
    from transforms.models.clip import decode_image, image_transform, load_image_encoder
    from transforms.semantic_dedup import cluster_item, greedy_duplicates, image_items

    sample = REPO / "sample" / "crawl.parquet"
    notes = {row["image_url"]: row["note"] or "" for row in pq.read_table(sample).to_pylist()}
    with tempfile.TemporaryDirectory() as out:
        run(["--input", str(sample), "--output", out, "--phases", "clusters", "--profile", "demo",
             "--set", "semantic_dedup.enabled=false", "--set", "detector.enabled=false"])
        clusters = [cluster_from_row(row) for path in sorted(glob.glob(f"{out}/clusters/*.parquet"))
                    for row in pq.read_table(path).to_pylist()]

    def source(image_url: str | None) -> str | None:
        found = re.search(r"DreamBench (\S+)", notes.get(image_url or "", ""))
        return found.group(1) if found else None

    images = [(image, source(image.image_url)) for cluster in clusters for image in cluster.images]
    vectors = np.stack([image.embedding for image, _ in images]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = vectors @ vectors.T
    same_file, same_subject, other_subject = [], [], []
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            a, b = images[i][1], images[j][1]
            if a is None or b is None:
                continue
            (same_file if a == b else same_subject if a.split("/")[0] == b.split("/")[0] else other_subject).append(
                float(sims[i, j]))
    cluster_vectors = np.stack([item.vector for c in clusters for item in cluster_item(c)])
    cluster_sims = cluster_vectors @ cluster_vectors.T
    cluster_pairs = [float(cluster_sims[i, j]) for i in range(len(clusters)) for j in range(i + 1, len(clusters))]

    config = build_config("demo").embed
    encoder, transform = load_image_encoder(config), image_transform(config)

    def embed(datas: list[bytes]) -> np.ndarray:
        return encoder.embed(torch.stack([transform(decode_image(d)) for d in datas]))

    photos = [image.image for image, _ in images]
    originals = embed(photos)
    made = [copies(photo) for photo in photos]
    copy_sims = {kind: summary([float(v) for v in (originals * embed([m[kind] for m in made])).sum(axis=1)])
                 for kind in made[0]}

    items = [item for cluster in clusters for item in image_items(cluster)]
    cluster_items = [item for cluster in clusters for item in cluster_item(cluster)]
    by_threshold: dict[str, Any] = {}
    for threshold in THRESHOLDS:
        lost_images = greedy_duplicates(items, threshold)
        lost_clusters = greedy_duplicates(cluster_items, threshold)
        by_threshold[str(threshold)] = {"distinct_images_dropped": len(lost_images),
                                        "clusters_dropped": len(lost_clusters),
                                        "clusters_kept": len(clusters) - len(lost_clusters)}
    results = {
        **header("demo_semdedup_thresholds"),
        "model": "tiny-random (demo profile)",
        "input": "sample/crawl.parquet, phase 1 of the demo profile, clusters after the cluster filter and "
                 "cross-page dedupe (semantic dedup and the detector off)",
        "clusters": len(clusters),
        "images": len(images),
        "distinct_photo_pairs": {"same_dreambench_file": summary(same_file), "same_subject": summary(same_subject),
                                 "other_subject": summary(other_subject)},
        "cluster_mean_pairs": summary(cluster_pairs),
        "copies_to_their_original": copy_sims,
        "greedy_decisions_by_threshold": by_threshold,
    }
    write_results(args.output, results)


if __name__ == "__main__":
    main()
