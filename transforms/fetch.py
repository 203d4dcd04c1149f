"""Stage *fetch*: image bytes for the pairs that came without them (WARC pages, MMC4, OBELICS, URL lists).

It sits between *read* (or *extract*) and *normalize*, so everything after it sees the same ``InputRecord`` s as
before. A record that already has bytes, or has no image URL, passes through untouched (normalize judges it);
the others are fetched by :class:`transforms.web.fetcher.Fetcher` (robots.txt, opt-outs, per-host limits, the
address guard) and come out with their bytes -- same ``record_id``, same ``source`` -- or as one dead letter with
the fetcher's reason.

Hosts and workers: records are grouped by host (``host:port``), so the per-host limits hold for the whole job,
not per worker. A host with more than ``urls_per_shard`` distinct URLs is split into at most
``per_host_concurrency`` shards (by URL, so a URL is fetched once) that go to different workers, each with its
share of the host's concurrency and rate. A worker fetches many shards at once on one event loop
(``max_shards_in_flight``): a slow or rate-limited host occupies only its own request slots, never the worker.

Record ids: a fetched record keeps the id it was read with (``stable_id(page_url, image_url, None)``), so its
fetch reject, its normalize reject or its place in ``clusters/`` all name the same input record; the content of
what was fetched is identified downstream by ``ImageRecord.image_id``. One input record -> one fate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import queue
import threading
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue

from schemas.records import InputRecord
from transforms.common import INTERNAL_ERROR, REJECTS, Progress, Reason, StageOutput, count, reject
from transforms.settings import DEFAULT_USER_AGENT, FetchConfig
from transforms.web import fetcher as web_fetcher
from transforms.web.fetcher import FETCH_INVALID_URL, Fetcher, FetchPolicy, FetchResult, host_key

LOG = logging.getLogger(__name__)

STAGE = "fetch"

REASONS = tuple(Reason(code) for code in (
    web_fetcher.FETCH_INVALID_URL, web_fetcher.FETCH_PRIVATE_ADDRESS, web_fetcher.ROBOTS_DISALLOWED,
    web_fetcher.OPTED_OUT, web_fetcher.FETCH_HTTP_4XX, web_fetcher.FETCH_HTTP_5XX, web_fetcher.FETCH_RATE_LIMITED,
    web_fetcher.FETCH_HTTP_OTHER, web_fetcher.FETCH_TIMEOUT, web_fetcher.FETCH_TOO_LARGE, web_fetcher.FETCH_DNS_ERROR,
    web_fetcher.FETCH_CONNECTION_ERROR, web_fetcher.FETCH_TOO_MANY_REDIRECTS, web_fetcher.NOT_AN_IMAGE,
    INTERNAL_ERROR))
"""Reject reasons (docs/reasons.md), one per record: the fetcher's outcome for its URL."""

def fetch_needed(config: FetchConfig, byteless_inputs: bool) -> bool:
    """Whether the pipeline gets a Fetch stage: ``always``; ``auto`` when an input format carries no bytes."""
    return config.enabled == "always" or (config.enabled == "auto" and byteless_inputs)


def needs_fetch(record: InputRecord) -> bool:
    """A record is fetched when it has no bytes (``None``; empty bytes are a broken download) but an image URL."""
    return record.image is None and bool(record.image_url)


# --- sharding ------------------------------------------------------------------------------------------


def shard_host(host: str, records: list[InputRecord], config: FetchConfig
               ) -> list[tuple[tuple[str, int, int], list[InputRecord]]]:
    """Split one host's records into ``k`` shards, ``k = min(per_host_concurrency, ceil(urls / urls_per_shard))``;
    all records of a URL go to the same shard (distinct URLs dealt round-robin in sorted order)."""
    by_url: dict[str, list[InputRecord]] = {}
    for record in sorted(records, key=lambda r: (r.image_url or "", r.record_id)):
        by_url.setdefault(record.image_url or "", []).append(record)
    k = max(1, min(config.per_host_concurrency, math.ceil(len(by_url) / config.urls_per_shard)))
    shards: list[list[InputRecord]] = [[] for _ in range(k)]
    for index, url_records in enumerate(by_url.values()):
        shards[index % k].extend(url_records)
    return [((host, i, k), shard) for i, shard in enumerate(shards) if shard]


class SplitFn(beam.DoFn):
    """Records to fetch, keyed by host (main); records that pass through (``keep``); bad URLs (``rejects``)."""

    KEEP = "keep"

    def process(self, record: InputRecord) -> Iterator[Any]:
        if not needs_fetch(record):
            count(STAGE, "passed_through")
            yield beam.pvalue.TaggedOutput(self.KEEP, record)
            return
        url = record.image_url or ""
        if not url.lower().startswith(("http://", "https://")) or not host_key(url).split(":", 1)[0]:
            yield reject(STAGE, FETCH_INVALID_URL, f"not an absolute http(s) URL: {url[:200]!r}", record=record)
            return
        yield host_key(url), record


class ShardHostFn(beam.DoFn):
    def __init__(self, config: FetchConfig) -> None:
        self._config = config

    def process(self, element: tuple[str, Any]) -> Iterator[tuple[tuple[str, int, int], list[InputRecord]]]:
        host, records = element
        shards = shard_host(host, list(records), self._config)
        count(STAGE, "hosts")
        count(STAGE, "host_shards", len(shards))
        yield from shards


# --- the fetching DoFn ---------------------------------------------------------------------------------


class _LoopThread:
    """An asyncio event loop on its own daemon thread, with one :class:`Fetcher` living in it."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fetch-loop", daemon=True)
        self.thread.start()
        self.fetcher = Fetcher(policy)
        self.run(self.fetcher.start())

    def run(self, coroutine: Any, timeout: float | None = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def submit(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        try:
            self.run(self.fetcher.close(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()


class FetchShardsFn(beam.DoFn):
    """Fetches host shards concurrently on a per-process event loop; emits fetched records and dead letters.

    ``process`` hands a shard to the loop and returns at once with whatever records finished meanwhile (waiting
    only while ``max_shards_in_flight`` shards are running); ``finish_bundle`` waits for the rest. Beam counters
    and dead letters are made on the DoFn's thread, never on the loop's.
    """

    def __init__(self, config: FetchConfig) -> None:
        self._config = config

    def setup(self) -> None:
        self._loop = _LoopThread(self._config.policy())
        self._progress = Progress(STAGE, "images fetched")

    def start_bundle(self) -> None:
        self._results: queue.Queue[tuple[InputRecord, FetchResult, Any, Any]] = queue.Queue()
        self._pending: set[Any] = set()
        self._lock = threading.Lock()

    def process(self, element: tuple[tuple[str, int, int], list[InputRecord]], window: Any = beam.DoFn.WindowParam,
                timestamp: Any = beam.DoFn.TimestampParam) -> Iterator[Any]:
        (_host, _index, shards), records = element
        future = self._loop.submit(self._fetch_shard(list(records), shards, window, timestamp))
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)
        yield from self._drain(block=False)
        while self._in_flight() >= self._config.max_shards_in_flight:
            yield from self._drain(block=True)

    def finish_bundle(self) -> Iterator[Any]:
        while self._in_flight() or not self._results.empty():
            yield from self._drain(block=True)

    def teardown(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.close()

    def _done(self, future: Any) -> None:
        with self._lock:
            self._pending.discard(future)
        if future.exception() is not None:  # a bug in _fetch_shard itself: fail loudly, not silently short
            LOG.error("fetch: a shard task failed: %r", future.exception())

    def _in_flight(self) -> int:
        with self._lock:
            failed = [f for f in self._pending if f.done() and f.exception() is not None]
            if failed:
                raise RuntimeError("fetch: a shard task failed") from failed[0].exception()
            return len(self._pending)

    async def _fetch_shard(self, records: list[InputRecord], shards: int, window: Any, timestamp: Any) -> None:
        fetcher = self._loop.fetcher
        policy = fetcher.policy
        if records:
            fetcher.limit_host(records[0].image_url, max(1, policy.per_host_concurrency // shards),
                               policy.per_host_rate / shards)
        by_url: dict[str, list[InputRecord]] = {}
        for record in records:
            by_url.setdefault(record.image_url, []).append(record)

        async def one(url: str, url_records: list[InputRecord]) -> None:
            try:
                result = await fetcher.fetch(url)
            except Exception as error:  # noqa: BLE001 -- a bug must become a dead letter, not a lost record
                result = FetchResult(url, INTERNAL_ERROR, f"{type(error).__name__}: {error}")
            for record in url_records:
                self._results.put((record, result, window, timestamp))

        await asyncio.gather(*(one(url, url_records) for url, url_records in by_url.items()))

    def _drain(self, block: bool) -> Iterator[Any]:
        try:
            item = self._results.get(timeout=0.05) if block else self._results.get_nowait()
        except queue.Empty:
            return
        while True:
            yield from self._emit(*item)
            try:
                item = self._results.get_nowait()
            except queue.Empty:
                return

    def _emit(self, record: InputRecord, result: FetchResult, window: Any, timestamp: Any) -> Iterator[Any]:
        if result.ok:
            count(STAGE, "fetched")
            count(STAGE, "bytes", len(result.body or b""))
            self._progress.add()
            yield WindowedValue(dataclasses.replace(record, image=result.body), timestamp, (window,))
            return
        dead = reject(STAGE, result.reason, result.detail, record=record)
        yield beam.pvalue.TaggedOutput(dead.tag, WindowedValue(dead.value, timestamp, (window,)))


class Fetch(beam.PTransform):
    """``InputRecord`` s -> the same records, those without bytes fetched (see the module docstring)."""

    def __init__(self, config: FetchConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, records: beam.PCollection) -> StageOutput:
        split = records | "SplitByBytes" >> beam.ParDo(SplitFn()).with_outputs(SplitFn.KEEP, REJECTS, main="fetch")
        fetched = (
            split.fetch
            | "GroupByHost" >> beam.GroupByKey()
            | "ShardHosts" >> beam.ParDo(ShardHostFn(self._config))
            | "SpreadShards" >> beam.Reshuffle()
            | "FetchShards" >> beam.ParDo(FetchShardsFn(self._config)).with_outputs(REJECTS, main="records")
        )
        output = (split[SplitFn.KEEP], fetched.records) | "MergeFetched" >> beam.Flatten()
        rejects = (split[REJECTS], fetched[REJECTS]) | "CollectFetchRejects" >> beam.Flatten()
        return StageOutput(output, rejects)


__all__ = ["DEFAULT_USER_AGENT", "REASONS", "STAGE", "Fetch", "FetchConfig", "fetch_needed", "needs_fetch",
           "shard_host"]
