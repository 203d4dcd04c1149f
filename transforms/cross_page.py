"""Stage *cross-page duplicates*: the same product sold on many sites makes near-identical clusters.

Two clusters are duplicates when at least ``cross_page.min_shared_fraction`` of the images of either
one have a near duplicate (perceptual-hash distance at most ``cross_page.max_distance``) in the other.
Of a duplicate pair the lower-ranked cluster leaves as ``duplicate_cluster``; the rank prefers more
images, then a higher mean CLIP similarity (when the cluster filter scored it), then the smaller
cluster id -- content only, so the choice does not depend on input order. Because every drop goes
from a lower to a higher rank, the best-ranked cluster of each group of duplicates is always kept (in a
chain A~B~C where A and C share nothing, both A and B go; keeping A too would need another pass and
the rare case is not worth it).

Finding the pairs without comparing every pair of clusters (a keyed join, as for boilerplate):

1. each cluster becomes a small :class:`ClusterSketch` (id, rank, 64-bit hashes; no image bytes), keyed
   by every *band* of its images' hashes -- ``(band index, band bits)`` for ``cross_page.bands`` slices
   of the 64 bits. Two hashes within ``max_distance`` bits agree on at least ``bands - max_distance``
   bands (at least one band for ``bands > max_distance``), and a cluster pair needs only one of its
   near-duplicate image pairs to meet, so pairs are found with very high probability even with fewer
   bands (see docs/defaults.md);
2. sketches meeting in a band bucket form candidate pairs, made distinct, and each candidate is verified
   exactly (all image pairs of the two clusters, at most ``max_images_per_page``²);
3. the losers' verdicts ``(cluster_id, detail)`` are joined back to the clusters by id (``CoGroupByKey``):
   every global step before it carries sketches and ids only, never image bytes.

A band bucket holding more than ``cross_page.max_bucket_clusters`` clusters (a hash band shared by
thousands of pages: flat or near-blank images) is skipped and counted (``cross_page/hot_buckets``)
rather than exploding into millions of candidate pairs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam

from schemas.records import Cluster
from transforms.common import REJECTS, Reason, StageOutput, count, reject
from transforms.settings import CrossPageConfig

STAGE = "cross_page"

DUPLICATE_CLUSTER = "duplicate_cluster"

REASONS = (Reason(DUPLICATE_CLUSTER, whole_cluster=True),)


class ClusterSketch(NamedTuple):
    """What duplicate detection needs of a cluster: no image bytes."""

    cluster_id: str
    page_url: str
    n_images: int
    mean_sim: float | None
    hashes: tuple[int, ...]
    """64-bit perceptual hashes of the cluster's images."""


def sketch(cluster: Cluster) -> ClusterSketch:
    return ClusterSketch(cluster.cluster_id, cluster.page_url, len(cluster.images), cluster.stats.mean_sim,
                         tuple(int(image.phash, 16) for image in cluster.images))


def rank(s: ClusterSketch) -> tuple[int, float, str]:
    """Sort key of a sketch: the smallest is the cluster to keep."""
    return -s.n_images, -(s.mean_sim if s.mean_sim is not None else -2.0), s.cluster_id


def band_slices(bands: int) -> list[tuple[int, int]]:
    """``(shift, mask)`` of each band: 64 bits cut into ``bands`` slices as even as possible."""
    edges = [round(i * 64 / bands) for i in range(bands + 1)]
    return [(lo, (1 << (hi - lo)) - 1) for lo, hi in itertools.pairwise(edges)]


def band_keys(hashes: Iterable[int], bands: int) -> set[tuple[int, int]]:
    """Distinct ``(band index, band bits)`` keys of a cluster's image hashes."""
    slices = band_slices(bands)
    return {(i, (h >> shift) & mask) for h in hashes for i, (shift, mask) in enumerate(slices)}


def shared_images(hashes: Iterable[int], others: tuple[int, ...], max_distance: int) -> int:
    """How many of ``hashes`` have a near duplicate among ``others``."""
    return sum(1 for h in hashes if any((h ^ o).bit_count() <= max_distance for o in others))


def duplicate_verdict(a: ClusterSketch, b: ClusterSketch, config: CrossPageConfig) -> tuple[str, str, str] | None:
    """``(loser id, winner id, detail)`` when ``a`` and ``b`` are duplicates, else ``None``."""
    shared_a = shared_images(a.hashes, b.hashes, config.max_distance)
    if not shared_a:
        return None
    shared_b = shared_images(b.hashes, a.hashes, config.max_distance)
    if max(shared_a / a.n_images, shared_b / b.n_images) < config.min_shared_fraction:
        return None
    winner, loser = sorted((a, b), key=rank)
    shared_loser = shared_a if loser is a else shared_b
    detail = (f"{shared_loser} of its {loser.n_images} images are near duplicates (perceptual-hash distance <= "
              f"{config.max_distance}) of images of cluster {winner.cluster_id} ({winner.n_images} images, "
              f"{winner.page_url}), which is kept")
    return loser.cluster_id, winner.cluster_id, detail


# --- the DoFns ------------------------------------------------------------------------------------------


class CandidatePairsFn(beam.DoFn):
    """``(band key, sketches)`` -> ``((id_a, id_b), (a, b))`` for every pair of clusters in the bucket."""

    def __init__(self, max_bucket_clusters: int) -> None:
        self._max = max_bucket_clusters

    def process(self, element: tuple[Any, Iterable[ClusterSketch]]) -> Iterator[tuple[tuple[str, str], Any]]:
        _, sketches = element
        bucket: list[ClusterSketch] = []
        for s in sketches:
            bucket.append(s)
            if len(bucket) > self._max:
                count(STAGE, "hot_buckets")
                return
        if len(bucket) < 2:
            return
        bucket.sort(key=lambda s: s.cluster_id)
        for a, b in itertools.combinations(bucket, 2):
            count(STAGE, "candidate_pairs")
            yield (a.cluster_id, b.cluster_id), (a, b)


class VerifyPairFn(beam.DoFn):
    """``((id_a, id_b), (a, b))`` -> ``(loser id, (winner rank, detail))`` for duplicate pairs."""

    def __init__(self, config: CrossPageConfig) -> None:
        self._config = config

    def process(self, element: tuple[tuple[str, str], tuple[ClusterSketch, ClusterSketch]]) -> Iterator[Any]:
        _, (a, b) = element
        verdict = duplicate_verdict(a, b, self._config)
        if verdict is None:
            return
        loser, winner, detail = verdict
        count(STAGE, "duplicate_pairs")
        yield loser, (rank(a if winner == a.cluster_id else b), detail)


def first(values: Iterable[Any]) -> Any:
    """Any one of ``values``; for a pair met in several band buckets, whose sketches are identical."""
    return next(iter(values))


def best_winner(verdicts: Iterable[tuple[Any, str]]) -> tuple[Any, str]:
    """Of the duplicate verdicts of one loser, the one naming the best-ranked winner (deterministic)."""
    return min(verdicts)


class DropDuplicatesFn(beam.DoFn):
    """``(cluster_id, {"cluster": [cluster], "lost": [verdict...]})`` -> the cluster, kept, or a
    ``duplicate_cluster`` reject when it lost a duplicate pair (at most one verdict per loser)."""

    def process(self, element: tuple[str, dict[str, Iterable[Any]]]) -> Iterator[Any]:
        _, joined = element
        verdicts = list(joined["lost"])
        for cluster in joined["cluster"]:
            if verdicts:
                count(STAGE, f"{DUPLICATE_CLUSTER}_clusters")
                yield reject(STAGE, DUPLICATE_CLUSTER, best_winner(verdicts)[1], cluster=cluster)
                continue
            count(STAGE, "clusters")
            yield cluster


class CrossPageDedupe(beam.PTransform):
    """``Cluster``s -> the same without clusters that duplicate a better-ranked cluster of another page."""

    def __init__(self, config: CrossPageConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, clusters: beam.PCollection) -> StageOutput:
        bands = self._config.bands
        losers = (
            clusters
            | "Sketch" >> beam.Map(sketch)
            | "KeyByHashBands" >> beam.FlatMap(lambda s: ((key, s) for key in sorted(band_keys(s.hashes, bands))))
            | "GroupByBand" >> beam.GroupByKey()
            | "CandidatePairs" >> beam.ParDo(CandidatePairsFn(self._config.max_bucket_clusters))
            | "DistinctPairs" >> beam.CombinePerKey(first)
            | "VerifyPairs" >> beam.ParDo(VerifyPairFn(self._config))
            | "BestWinnerPerLoser" >> beam.CombinePerKey(best_winner)
        )
        keyed = clusters | "KeyById" >> beam.Map(lambda cluster: (cluster.cluster_id, cluster))
        result = (
            {"cluster": keyed, "lost": losers}
            | "JoinVerdicts" >> beam.CoGroupByKey()
            | "DropDuplicateClusters" >> beam.ParDo(DropDuplicatesFn()).with_outputs(REJECTS, main="kept")
        )
        return StageOutput(result.kept, result[REJECTS])
