"""Write crawl rows in the pipeline's other input formats (JSONL, img2dataset-style WebDataset tar).

Used by the tests to feed the same bundled sample through every reader.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import tarfile
from collections.abc import Iterable


def write_jsonl(rows: Iterable[dict], path: str, image_mode: str = "b64", gz: bool = False) -> str:
    """``image_mode``: ``b64`` (``image_b64``) or ``path`` (``image_path`` files next to the JSONL)."""
    directory = os.path.dirname(path)
    lines = []
    for i, row in enumerate(rows):
        obj = {"page_url": row["page_url"], "image_url": row["image_url"], "text": row["text"]}
        image = row["image"]
        if image is None:
            obj["image_b64"] = None
        elif image_mode == "b64":
            obj["image_b64"] = base64.b64encode(image).decode()
        else:
            relative = os.path.join("images", f"{i:05d}.bin")
            os.makedirs(os.path.join(directory, "images"), exist_ok=True)
            with open(os.path.join(directory, relative), "wb") as f:
                f.write(image)
            obj["image_path"] = relative
        lines.append(json.dumps(obj, ensure_ascii=False))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if gz:
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(rows: Iterable[dict], path: str) -> str:
    """An img2dataset-style shard: ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` (with ``url``, ``page_url``).

    Rows without image bytes get no image member (img2dataset writes only what it downloaded), so
    they reach the pipeline with a missing image.
    """
    with tarfile.open(path, "w") as tar:
        for i, row in enumerate(rows):
            key = f"{i:09d}"
            if row["image"]:
                _add(tar, f"{key}.jpg", row["image"])
            if row["text"] is not None:
                _add(tar, f"{key}.txt", row["text"].encode("utf-8"))
            metadata = {"url": row["image_url"], "key": key, "status": "success", "page_url": row["page_url"],
                        "caption": row["text"]}
            _add(tar, f"{key}.json", json.dumps(metadata).encode("utf-8"))
    return path
