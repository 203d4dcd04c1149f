"""Stage *semantic dedup*: duplicates across the whole dataset, found by CLIP embeddings (SemDeDup-style).

Perceptual hashes miss the same product photographed again, re-cropped or recoloured, or put on a new
background, and boilerplate detection only removes images seen on more than ``dedupe.boilerplate_max_pages``
pages. This stage compares the stored CLIP embeddings (``ImageRecord.embedding``, from the embed stage) at two
levels:

* **clusters** -- a cluster is represented by the normalized mean of its images' embeddings; two clusters whose
  representatives have a cosine similarity of at least ``semantic_dedup.cluster_threshold`` show the same
  subject (two shops selling one product): the lower-ranked one leaves whole as ``semantic_duplicate_cluster``;
* **images** -- two images (of any clusters, the same one included) with a cosine similarity of at least
  ``image_threshold`` are one picture (re-encoded, re-cropped, recoloured): the lower-ranked copy leaves as
  ``semantic_duplicate_image``, and a cluster left with fewer than ``group.min_images`` images leaves as
  ``cluster_too_small``. Images are compared after the cluster decision, among the clusters that stay, so an
  image is never dropped in favour of a copy in a cluster that is itself dropped.

**Which one stays** (content only, never input order): clusters rank by more images, then higher mean CLIP
similarity (``stats.mean_sim``), then the smaller cluster id -- the rule of the cross-page stage. An image's copies
rank by their cluster's rank (the copy stays where its cluster is strongest), then more source pixels, then the
smaller image id. Within a bucket (below) items are taken best-ranked first, and an item leaves when it is a
duplicate of one already kept (greedy, as the within-page dedupe): the best-ranked item of every group stays; in
a chain A~B~C where A and C are not duplicates, A and C stay.

**Scale** (as SemDeDup, Abbas et al. 2023): comparing every pair is quadratic, so items are bucketed by k-means
and compared only within their bucket. ``k = ceil(items / bucket_size)`` (at most ``max_centroids``) spherical
k-means centroids are fitted (scikit-learn) on a deterministic sample -- the ``k x sample_per_centroid`` items
with the smallest id hashes, at most ``max_sample`` -- each item goes to its nearest centroid, and a bucket of
``m`` items costs ``m^2`` dot products: with buckets of a bounded mean size the whole costs ``O(items x
bucket_size)`` (``benchmarks/bench_semdedup.py``). SemDeDup assigns each item to its nearest centroid only, and a
pair of duplicates on either side of a boundary is never compared (about 5% of the duplicates in the benchmark);
here each item is compared in the buckets of its ``assignments`` (2) nearest centroids, for four times the
comparisons (each bucket holds twice the items), and an item that leaves in several buckets is one verdict, the
one naming the best-ranked winner. Every item that leaves has a better-ranked duplicate that some bucket kept, so
the best-ranked item of every group of duplicates stays. CLIP-like embeddings crowd in a cone, and k-means fitted
on a sample leaves some buckets far over the mean (20,000 items of 100,000 in the benchmark): a bucket over
``max_bucket_items`` is split again the same way, on a sample of its own items (``semantic_dedup/split_buckets``),
so the work per item stays bounded -- each item goes to one part only (two at every level would compare it
2^levels times), so pairs on the boundary of a split are missed there; after three splits what is left is compared
in chunks of that size, in the order of the items' similarity to the bucket's mean (``semantic_dedup/hot_buckets``).

**No image bytes in the global steps.** Both levels work on small :class:`Item`s -- ids, rank, one embedding
(3 KB at 768 dimensions) -- never on clusters. The centroids reach the assignment as a singleton side input
(``k x D`` float32: 12 MB at 4096 x 768), the sample is one element of at most ``max_sample`` float16 vectors
(48 MB at 32768 x 768), no key holds more than one bucket. The decisions -- ids and details -- are joined back to
the clusters with a ``CoGroupByKey`` on the cluster id, so memory per key is one cluster and its verdicts at any
scale (a side input of the losers would have to fit every worker's memory).

Counters (namespace ``semantic_dedup``): ``cluster_items``, ``image_items``, ``centroids_cluster``,
``centroids_image``, ``buckets_*``, ``hot_buckets``, ``pairs_compared``, ``duplicate_groups_cluster`` /
``duplicate_groups_image`` (groups with at least one duplicate left), ``images_without_embedding`` (not compared,
kept), and one per reject reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np

from schemas.records import Cluster, ImageRecord, with_images
from transforms.common import REJECTS, Reason, StageOutput, count, internal_error, reject
from transforms.settings import SemanticDedupConfig

STAGE = "semantic_dedup"

SEMANTIC_DUPLICATE_IMAGE = "semantic_duplicate_image"
SEMANTIC_DUPLICATE_CLUSTER = "semantic_duplicate_cluster"
CLUSTER_TOO_SMALL = "cluster_too_small"

REASONS = (Reason(SEMANTIC_DUPLICATE_IMAGE), Reason(SEMANTIC_DUPLICATE_CLUSTER, whole_cluster=True),
           Reason(CLUSTER_TOO_SMALL, whole_cluster=True))

CLUSTER_LEVEL = "cluster"
IMAGE_LEVEL = "image"


# --- items -----------------------------------------------------------------------------------------------


class Item(NamedTuple):
    """What the global steps know of a cluster or an image: ids, rank, one unit embedding. No image bytes."""

    key: str
    """Unique: the cluster id (cluster level), ``cluster_id/image_id`` (image level)."""
    cluster_id: str
    image_id: str | None
    page_url: str
    n_images: int
    rank: tuple
    """Sort key; the smallest of a group of duplicates stays."""
    vector: np.ndarray
    """float32 unit vector."""


def cluster_rank(cluster: Cluster) -> tuple[int, float, str]:
    """More images, then more coherent, then the smaller id (as :func:`transforms.cross_page.rank`)."""
    mean_sim = cluster.stats.mean_sim
    return -len(cluster.images), -(mean_sim if mean_sim is not None else -2.0), cluster.cluster_id


def image_rank(cluster: Cluster, image: ImageRecord) -> tuple:
    """The copy in the best-ranked cluster, then the one with more source pixels, then the smaller image id."""
    return (*cluster_rank(cluster), -(image.source_width * image.source_height), image.image_id)


def unit(vector: Any) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def cluster_item(cluster: Cluster) -> Iterator[Item]:
    """The cluster's item: the normalized mean of its images' unit embeddings (none if an image has none)."""
    if not cluster.images or any(image.embedding is None for image in cluster.images):
        return
    mean = np.mean([unit(image.embedding) for image in cluster.images], axis=0)
    count(STAGE, "cluster_items")
    yield Item(cluster.cluster_id, cluster.cluster_id, None, cluster.page_url, len(cluster.images),
               cluster_rank(cluster), unit(mean))


def image_items(cluster: Cluster) -> Iterator[Item]:
    for image in cluster.images:
        if image.embedding is None:
            count(STAGE, "images_without_embedding")
            continue
        count(STAGE, "image_items")
        yield Item(f"{cluster.cluster_id}/{image.image_id}", cluster.cluster_id, image.image_id, cluster.page_url,
                   len(cluster.images), image_rank(cluster, image), unit(image.embedding))


def sample_hash(key: str) -> int:
    """A deterministic pseudo-random order of items (keys are content hashes; hashing again spreads any key)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


# --- k-means ---------------------------------------------------------------------------------------------


def centroid_count(n_items: int, config: SemanticDedupConfig) -> int:
    return max(1, min(config.max_centroids, math.ceil(n_items / config.bucket_size)))


def sample_size(n_items: int, config: SemanticDedupConfig) -> int:
    return min(n_items, config.max_sample, centroid_count(n_items, config) * config.sample_per_centroid)


def fit_centroids(sample: Sequence[tuple[int, np.ndarray]], n_items: int, config: SemanticDedupConfig) -> np.ndarray:
    """Spherical k-means centroids (``float32 [k, D]``, unit rows) of the sample ``(hash, vector)`` pairs.

    The sample arrives as the ``max_sample`` smallest hashes; the first ``sample_size(n_items)`` of them in hash
    order are used, so the fit depends on the content only. ``k`` never exceeds the sample's distinct points.
    """
    ordered = sorted(sample, key=lambda pair: pair[0])[:max(1, sample_size(n_items, config))]
    if not ordered:
        return np.zeros((0, 0), np.float32)
    points = np.stack([unit(vector) for _, vector in ordered]).astype(np.float32)
    k = min(centroid_count(n_items, config), len(np.unique(points.round(4), axis=0)))
    if k <= 1:
        return unit(points.mean(axis=0))[None, :]
    from sklearn.cluster import KMeans

    # Random initialization from the sample: scikit-learn's k-means++ takes ~20 s for 200 centroids of 1,600
    # 768-d points on one core, and buckets need balance more than an optimal fit (hot ones are split again).
    model = KMeans(n_clusters=k, n_init=1, init="random", max_iter=config.kmeans_iterations,
                   random_state=config.seed)
    model.fit(points)
    centroids = model.cluster_centers_.astype(np.float32)
    return centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)


def nearest_centroid(vector: np.ndarray, centroids: np.ndarray) -> int:
    return int(np.argmax(centroids @ vector))


def nearest_centroids(vector: np.ndarray, centroids: np.ndarray, n: int) -> list[int]:
    """The ``n`` nearest centroids, nearest first (ties to the smaller index)."""
    sims = centroids @ vector
    if n == 1 or len(sims) == 1:
        return [int(np.argmax(sims))]
    return [int(i) for i in np.lexsort((np.arange(len(sims)), -sims))[:n]]


# --- within a bucket ---------------------------------------------------------------------------------------


class Duplicate(NamedTuple):
    loser: Item
    winner: Item
    similarity: float


def greedy_duplicates(items: Sequence[Item], threshold: float, block: int = 512) -> list[Duplicate]:
    """Items taken best-ranked first; one leaves when its similarity to an item already kept reaches
    ``threshold``, naming the best-ranked such item. ``O(m^2 D)`` time, ``O(block x m)`` memory."""
    ordered = sorted(items, key=lambda it: it.rank)
    if len(ordered) < 2:
        return []
    vectors = np.stack([it.vector for it in ordered]).astype(np.float32)
    kept = np.zeros(len(ordered), dtype=bool)
    found: list[Duplicate] = []
    for start in range(0, len(ordered), block):
        stop = min(len(ordered), start + block)
        sims = vectors[start:stop] @ vectors[:stop].T
        for i in range(start, stop):
            row = sims[i - start, :i]
            hits = np.flatnonzero(kept[:i] & (row >= threshold))
            if hits.size:
                j = int(hits[0])  # ordered by rank: the best-ranked kept item
                found.append(Duplicate(ordered[i], ordered[j], float(row[j])))
            else:
                kept[i] = True
    return found


MAX_SPLITS = 3
"""How many times a hot bucket is split by k-means again before it is compared in chunks."""


def compare_bucket(items: list[Item], threshold: float, config: SemanticDedupConfig,
                   depth: int = 0) -> Iterator[Duplicate]:
    """Duplicates within a bucket. A bucket over ``max_bucket_items`` is split like the whole: k-means on a
    sample of its items (``ceil(m / bucket_size)`` centroids), each item to its nearest, each part compared (split
    again if still too big); after :data:`MAX_SPLITS` splits, in chunks (:func:`bucket_chunks`)."""
    if len(items) > config.max_bucket_items and depth < MAX_SPLITS:
        ordered = sorted(items, key=lambda it: sample_hash(it.key))
        sample = [(sample_hash(it.key), it.vector) for it in ordered[:sample_size(len(items), config)]]
        centroids = fit_centroids(sample, len(items), config)
        if len(centroids) > 1:
            count(STAGE, "split_buckets")
            parts: dict[int, list[Item]] = {}
            # One part per item: with ``assignments`` parts at every level an item would be compared 2^levels
            # times; the pairs a split separates are the price of bounded work (docs/defaults.md).
            for it in items:
                parts.setdefault(nearest_centroid(it.vector, centroids), []).append(it)
            if max(len(part) for part in parts.values()) < len(items):  # the split made progress
                for k in sorted(parts):
                    yield from compare_bucket(parts[k], threshold, config, depth + 1)
                return
    chunks = bucket_chunks(items, config.max_bucket_items)
    if len(chunks) > 1:
        count(STAGE, "hot_buckets")
    for chunk in chunks:
        count(STAGE, "pairs_compared", len(chunk) * (len(chunk) - 1) // 2)
        yield from greedy_duplicates(chunk, threshold)


def bucket_chunks(items: list[Item], max_items: int) -> list[list[Item]]:
    """A bucket as it is compared: whole, or -- over ``max_items`` -- in chunks of similar items (ordered by the
    similarity to the bucket's mean)."""
    if len(items) <= max_items:
        return [items]
    mean = unit(np.mean([it.vector for it in items], axis=0))
    ordered = sorted(items, key=lambda it: (-float(it.vector @ mean), it.key))
    return [ordered[i:i + max_items] for i in range(0, len(ordered), max_items)]


class BucketDuplicatesFn(beam.DoFn):
    """``(centroid, items)`` -> :class:`Duplicate` for every item that leaves (:func:`compare_bucket`)."""

    def __init__(self, threshold: float, config: SemanticDedupConfig, level: str) -> None:
        self._threshold = threshold
        self._config = config
        self._level = level

    def process(self, element: tuple[int, Iterable[Item]]) -> Iterator[Duplicate]:
        _, items = element
        count(STAGE, f"buckets_{self._level}")
        yield from compare_bucket(list(items), self._threshold, self._config)


def best_winner(duplicates: Iterable[Duplicate]) -> Duplicate:
    """Of the verdicts on one item (from each bucket it was compared in), the one naming the best-ranked winner."""
    return min(duplicates, key=lambda d: (d.winner.rank, d.winner.key))


class FindDuplicates(beam.PTransform):
    """``Item``s -> :class:`Duplicate`s: k-means on a sample, assignment, comparison within buckets."""

    def __init__(self, threshold: float, config: SemanticDedupConfig, level: str) -> None:
        super().__init__()
        self._threshold = threshold
        self._config = config
        self._level = level

    def expand(self, items: beam.PCollection) -> beam.PCollection:
        config, level = self._config, self._level
        n_items = items | "CountItems" >> beam.combiners.Count.Globally()
        sample = (
            items
            | "SampleKeys" >> beam.Map(lambda it: (sample_hash(it.key), it.vector.astype(np.float16)))
            | "Sample" >> beam.combiners.Top.Of(config.max_sample, key=lambda pair: pair[0], reverse=True)
        )
        centroids = sample | "FitCentroids" >> beam.Map(_fit_and_count, beam.pvalue.AsSingleton(n_items), config,
                                                         level)
        assignments = config.assignments
        duplicates = (
            items
            | "AssignCentroids" >> beam.FlatMap(lambda it, c: ((k, it) for k in nearest_centroids(it.vector, c,
                                                                                                  assignments)),
                                                beam.pvalue.AsSingleton(centroids))
            | "GroupByCentroid" >> beam.GroupByKey()
            | "CompareInBuckets" >> beam.ParDo(BucketDuplicatesFn(self._threshold, config, level))
            | "KeyByLoser" >> beam.Map(lambda d: (d.loser.key, d))
            | "BestWinnerPerLoser" >> beam.CombinePerKey(best_winner)
            | "Duplicates" >> beam.Values()
        )
        _ = (duplicates
             | "Winners" >> beam.Map(lambda d: d.winner.key)
             | "DistinctWinners" >> beam.Distinct()
             | "CountGroups" >> beam.Map(lambda _key: count(STAGE, f"duplicate_groups_{level}")))
        return duplicates


def _fit_and_count(sample: Sequence[tuple[int, np.ndarray]], n_items: int, config: SemanticDedupConfig,
                   level: str) -> np.ndarray:
    centroids = fit_centroids(sample, n_items, config)
    count(STAGE, f"centroids_{level}", len(centroids))
    return centroids


# --- applying the decisions -------------------------------------------------------------------------------


def cluster_verdict(duplicate: Duplicate, threshold: float) -> tuple[str, tuple[tuple, str]]:
    """``(loser cluster id, (winner rank, detail))``."""
    winner = duplicate.winner
    return duplicate.loser.cluster_id, (winner.rank, (
        f"mean CLIP embedding cosine similarity {duplicate.similarity:.4f} >= cluster_threshold {threshold} to "
        f"cluster {winner.cluster_id} ({winner.n_images} images, {winner.page_url}), which is kept"))


def image_verdict(duplicate: Duplicate, threshold: float) -> tuple[str, tuple[str, str]]:
    """``(cluster id of the loser, (loser image id, detail))``."""
    winner = duplicate.winner
    where = "the same cluster" if winner.cluster_id == duplicate.loser.cluster_id else (
        f"cluster {winner.cluster_id} ({winner.page_url})")
    return duplicate.loser.cluster_id, (duplicate.loser.image_id, (
        f"CLIP cosine similarity {duplicate.similarity:.4f} >= image_threshold {threshold} to image "
        f"{winner.image_id} of {where}, which is kept"))


def live_items(element: tuple[str, dict[str, list[Any]]]) -> Iterator[Item]:
    """Image items of the clusters that the cluster level keeps."""
    _, grouped = element
    if grouped["lost"]:
        return
    yield from grouped["items"]


class ApplyDecisionsFn(beam.DoFn):
    """``(cluster id, {clusters, cluster_lost, images_lost})`` -> the cluster as it goes on, and rejects."""

    def __init__(self, min_images: int) -> None:
        self._min_images = min_images

    def process(self, element: tuple[str, dict[str, list[Any]]]) -> Iterator[Any]:
        _, grouped = element
        for cluster in grouped["clusters"]:
            try:
                yield from self._decide(cluster, grouped["cluster_lost"], grouped["images_lost"])
            except Exception as error:  # noqa: BLE001
                for image in cluster.images:
                    yield internal_error(STAGE, error, record=image, cluster_id=cluster.cluster_id)

    def _decide(self, cluster: Cluster, cluster_lost: list[tuple[tuple, str]],
                images_lost: list[tuple[str, str]]) -> Iterator[Any]:
        if cluster_lost:
            count(STAGE, f"{SEMANTIC_DUPLICATE_CLUSTER}_clusters")
            yield reject(STAGE, SEMANTIC_DUPLICATE_CLUSTER, min(cluster_lost)[1], cluster=cluster)
            return
        lost = dict(sorted(images_lost))
        kept = [image for image in cluster.images if image.image_id not in lost]
        for image in cluster.images:
            if image.image_id in lost:
                yield reject(STAGE, SEMANTIC_DUPLICATE_IMAGE, lost[image.image_id], record=image,
                             cluster_id=cluster.cluster_id)
        if len(kept) < len(cluster.images):
            cluster = with_images(cluster, kept)
        if len(kept) < self._min_images:
            if kept:
                yield reject(STAGE, CLUSTER_TOO_SMALL, f"{len(kept)} images left after {len(lost)} semantic "
                             f"duplicates left < min_images {self._min_images}", cluster=cluster)
            return
        count(STAGE, "clusters")
        yield cluster


class SemanticDedup(beam.PTransform):
    """``Cluster``s with embeddings -> the same without semantic duplicates of clusters and of images."""

    def __init__(self, config: SemanticDedupConfig, min_images: int) -> None:
        super().__init__()
        self._config = config
        self._min_images = min_images

    def expand(self, clusters: beam.PCollection) -> StageOutput:
        config = self._config
        keyed = clusters | "KeyClusters" >> beam.Map(lambda c: (c.cluster_id, c))
        if config.cluster_threshold is not None:
            threshold = config.cluster_threshold
            cluster_lost = (
                clusters
                | "ClusterItems" >> beam.FlatMap(cluster_item)
                | "ClusterLevel" >> FindDuplicates(threshold, config, CLUSTER_LEVEL)
                | "ClusterVerdicts" >> beam.Map(cluster_verdict, threshold)
            )
        else:
            cluster_lost = clusters.pipeline | "NoClusterLevel" >> beam.Create([])
        if config.image_threshold is not None:
            threshold = config.image_threshold
            items = clusters | "ImageItems" >> beam.FlatMap(image_items) | "KeyItems" >> beam.Map(
                lambda it: (it.cluster_id, it))
            images_lost = (
                {"items": items, "lost": cluster_lost}
                | "JoinLostClusters" >> beam.CoGroupByKey()
                | "ItemsOfKeptClusters" >> beam.FlatMap(live_items)
                | "ImageLevel" >> FindDuplicates(threshold, config, IMAGE_LEVEL)
                | "ImageVerdicts" >> beam.Map(image_verdict, threshold)
            )
        else:
            images_lost = clusters.pipeline | "NoImageLevel" >> beam.Create([])
        result = (
            {"clusters": keyed, "cluster_lost": cluster_lost, "images_lost": images_lost}
            | "JoinDecisions" >> beam.CoGroupByKey()
            | "ApplyDecisions" >> beam.ParDo(ApplyDecisionsFn(self._min_images)).with_outputs(REJECTS, main="kept")
        )
        return StageOutput(result.kept, result[REJECTS])
