"""Real clusters for stage tests: the bundled sample's product pages, normalized as the pipeline does."""

from __future__ import annotations

import collections
import pickle
from pathlib import Path
from typing import Any

import apache_beam as beam

from schemas.ids import cluster_id
from schemas.records import Cluster, ClusterStats, ImageRecord
from transforms.normalize import NormalizeConfig, normalize_image, url_host


def sample_clusters(sample_rows: list[dict[str, Any]], pages: list[str] | None = None) -> list[Cluster]:
    """One cluster per product page of the sample (rows planted as ``kept``), images sorted by id.

    ``pages``: page-URL suffixes to keep (``["/products/teapot", ...]``), in that order; all when ``None``.
    """
    config = NormalizeConfig()
    by_page: dict[str, list[ImageRecord]] = collections.defaultdict(list)
    for i, row in enumerate(sample_rows):
        if row["expected"] != "kept":
            continue
        page = row["expected_page"]
        if pages is not None and not any(page.endswith(p) for p in pages):
            continue
        n = normalize_image(row["image"], config)
        by_page[page].append(ImageRecord(
            image_id=n.image_id, record_id=f"r{i}", source=f"sample:{i}", page_url=page, domain=url_host(page),
            image_url=row["image_url"], text=row["text"], image=n.image, width=n.width, height=n.height,
            phash=n.phash, source_width=n.source_width, source_height=n.source_height,
            source_format=n.source_format))
    order = list(by_page) if pages is None else [p for s in pages for p in by_page if p.endswith(s)]
    missing = [s for s in pages or () if not any(p.endswith(s) for p in by_page)]
    assert not missing, f"no product page of the sample ends with {missing}"
    clusters = []
    for page in order:
        images = tuple(sorted(by_page[page], key=lambda im: im.image_id))
        clusters.append(Cluster(cluster_id=cluster_id(page, [im.image_id for im in images]), page_url=page,
                                domain=url_host(page), images=images,
                                stats=ClusterStats(n_images=len(images), n_page_images=len(images))))
    return clusters


def beam_counters(result: Any, namespace: str) -> dict[str, int]:
    return {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]
            if c.key.metric.namespace == namespace}


class CreateFromFile(beam.PTransform):
    """``beam.Create(values)`` for values that weigh megabytes (photos, pixels): Beam pickles ``Create``'s values into
    the pipeline and compresses them with bz2 at each pass over its graph (seconds for a few MB); these go through a
    pickle file under ``folder`` instead, read by whichever process runs the read (a local path: the tests' runners
    all run on this machine)."""

    def __init__(self, values: list[Any], folder: Path) -> None:
        super().__init__()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"create-{len(list(folder.glob('create-*')))}.pkl"
        path.write_bytes(pickle.dumps(list(values)))
        self.path = str(path)

    def expand(self, pbegin: Any) -> Any:
        return pbegin | beam.Create([self.path]) | beam.FlatMap(_load_pickle)


def _load_pickle(path: str) -> list[Any]:
    return pickle.loads(Path(path).read_bytes())


def save_to(path: Path, key: Any = None):
    """An ``assert_that`` matcher that hands the elements to the test through a file, sorted by ``key`` (the runner
    pickles functions, so appending to a list of the test would not reach it); read back with :func:`load`."""
    def save(actual: list) -> None:
        path.write_bytes(pickle.dumps(sorted(actual, key=key)))
    return save


def load(path: Path) -> Any:
    return pickle.loads(path.read_bytes())
