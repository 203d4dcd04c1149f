#!/usr/bin/env python3
"""Record the real detector's outputs on the test photos, for the tests of the safety decisions.

    python scripts/record_detections.py            # writes tests/data/detector_outputs.json

The repository holds no explicit material, so the NSFW and people decisions are tested on what the real
detector (NudeNet 320n from the nudenet wheel, faces confirmed by OpenCV's Haar cascades, the default
``detector`` settings) says about real photos: the scikit-image portraits and coffee cup in
``tests/data/photos/`` and the photos of the bundled sample (``sample/crawl.parquet``) on which the detector's
NSFW classes score highest (benign false alarms: dogs, plush toys, a teapot). Nothing in the file is written by
hand; ``tests/test_safety.py::test_recorded_outputs_are_current`` re-runs the detector and compares.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transforms.models.detectors import LABELS, DetectorConfig, load_detector  # noqa: E402

PHOTOS = ("astronaut.jpg", "camera.jpg", "coffee.jpg")
NSFW_CLASSES = ("FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "BUTTOCKS_EXPOSED",
                "ANUS_EXPOSED")
SAMPLE_TOP = 6
"""How many sample photos to record: those with the highest NSFW-class score."""


def rgb(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image.convert("RGB"))


def record(detections) -> dict:
    return {"width": detections.width, "height": detections.height,
            "faces": [face._asdict() for face in detections.faces],
            "class_scores": {label: detections.class_scores[label] for label in LABELS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(REPO / "tests" / "data" / "detector_outputs.json"))
    args = parser.parse_args()
    config = DetectorConfig()
    detector = load_detector(config)
    entries = []
    for name in PHOTOS:
        data = (REPO / "tests" / "data" / "photos" / name).read_bytes()
        entries.append({"source": f"tests/data/photos/{name}", **record(detector.detect([rgb(data)])[0])})
    sample = []
    for row in pq.read_table(REPO / "sample" / "crawl.parquet").to_pylist():
        if row["expected"] not in ("kept", "gallery"):
            continue
        found = record(detector.detect([rgb(row["image"])])[0])
        top = max(found["class_scores"][label] for label in NSFW_CLASSES)
        sample.append((-top, row["image_url"], {"source": f"sample/crawl.parquet image_url={row['image_url']}",
                                                 **found}))
    entries += [entry for _, _, entry in sorted(sample, key=lambda t: t[:2])[:SAMPLE_TOP]]
    document = {"detector": detector.model_id, "config": {"resolution": config.resolution,
                                                          "face_confirmation": config.face_confirmation},
                "entries": entries}
    Path(args.output).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(f"{len(entries)} detector outputs written to {args.output}")


if __name__ == "__main__":
    main()
