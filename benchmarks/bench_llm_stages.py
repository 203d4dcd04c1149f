#!/usr/bin/env python3
"""Throughput of the caption / subject / prompt stages against plain loops, in the same run.

    python benchmarks/bench_llm_stages.py --output benchmarks/results/llm_stages.json

Two sets, both on the bundled sample's real product clusters (repeated ``--repeat`` times):

* ``vllm_caption``: the ``Caption`` stage with the ``vllm`` backend on the DirectRunner (in memory, one
  worker) against the loopback stand-in server (``tests/fake_openai_server.py``) made to answer every
  request after ``--latency`` seconds, like a GPU server under load; the plain contender sends the very
  same requests one after another with the same client. The ratio shows what bounded concurrency
  (``llm.max_concurrency``) buys when the model, not the pipeline, is the bottleneck.
* ``offline``: the three stages with their offline backends (``alt_text``, ``offline``, ``templates``)
  chained in one Beam pipeline, against a plain loop calling the same three functions per cluster:
  the cost of RunInference, batching and the policy step per cluster.

Both contenders read the clusters from the same Parquet file (``clusters/`` layout, written first):
Beam with ``ReadFromParquet``, the plain loops with pyarrow. (``beam.Create`` of a few thousand
clusters would measure Create's own cost -- tens of seconds -- not the stages.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.common import header, write_results  # noqa: E402
from schemas.parquet import CLUSTERS_SCHEMA, cluster_from_row, cluster_to_row  # noqa: E402
from tests.clusters import sample_clusters  # noqa: E402
from tests.llm_server import VL_MODEL, FakeOpenAIServer  # noqa: E402
from transforms.caption import (  # noqa: E402
    Caption,
    CaptionConfig,
    caption_messages,
    clean_alt_text,
    validate_caption,
)
from transforms.models.llm_client import ChatClient  # noqa: E402
from transforms.prompt_files import load_prompt  # noqa: E402
from transforms.prompts import PromptsConfig, ScenePrompts, cluster_template_prompts  # noqa: E402
from transforms.settings import LLMConfig  # noqa: E402
from transforms.subject import Subject, SubjectConfig, offline_result  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample", "crawl.parquet")


def _options() -> PipelineOptions:
    return PipelineOptions(["--direct_running_mode", "in_memory", "--direct_num_workers", "1"])


def write_clusters(clusters: list, path: str) -> str:
    pq.write_table(pa.Table.from_pylist([cluster_to_row(c) for c in clusters], CLUSTERS_SCHEMA), path,
                   row_group_size=64)
    return path


def read_clusters(path: str) -> list:
    return [cluster_from_row(row) for row in pq.read_table(path).to_pylist()]


def _beam_source(p: beam.Pipeline, path: str) -> beam.PCollection:
    return p | beam.io.ReadFromParquet(path) | "ToClusters" >> beam.Map(cluster_from_row)


def beam_caption(path: str, config: CaptionConfig, llm: LLMConfig) -> int:
    with beam.Pipeline(options=_options()) as p:
        out, _ = _beam_source(p, path) | Caption(config, llm)
        out | beam.combiners.Count.Globally()
    counters = {c.key.metric.name: c.committed for c in p.result.metrics().query()["counters"]
                if c.key.metric.namespace == "caption"}
    assert not counters.get("failed_clusters"), counters
    return sum(len(c.images) for c in read_clusters(path))


def plain_caption(path: str, config: CaptionConfig, llm: LLMConfig) -> int:
    client = ChatClient.from_config(config.endpoint, llm)
    prompt = load_prompt(config.prompt).text
    done = 0
    for cluster in read_clusters(path):
        for image in cluster.images:
            response = client.chat(config.model, caption_messages(prompt, image.image), max_tokens=config.max_tokens,
                                   temperature=config.temperature)
            validate_caption(response, config.min_chars, config.max_chars)
            done += 1
    return done


def beam_offline(path: str) -> int:
    llm = LLMConfig()
    with beam.Pipeline(options=_options()) as p:
        out, _ = _beam_source(p, path) | "Caption" >> Caption(CaptionConfig(backend="alt_text"), llm)
        out, _ = out | "Subject" >> Subject(SubjectConfig(backend="offline"), llm)
        out, _ = out | "Prompts" >> ScenePrompts(PromptsConfig(backend="templates"), llm)
        out | beam.combiners.Count.Globally()
    return {c.key.metric.name: c.committed for c in p.result.metrics().query()["counters"]
            if c.key.metric.namespace == "prompts"}["clusters"]


def plain_offline(path: str) -> int:
    config = PromptsConfig(backend="templates")
    clusters = read_clusters(path)
    for cluster in clusters:
        cluster = cluster.replace(images=tuple(im.replace(caption=clean_alt_text(im.text)) for im in cluster.images))
        result = offline_result(cluster, 2)
        cluster = cluster.replace(subject=result.subject, class_noun=result.class_noun, is_live=result.is_live)
        cluster_template_prompts(cluster, config)
    return len(clusters)


def measure(fn, rounds: int, *args: Any) -> tuple[int, float]:
    best, done = float("inf"), 0
    for _ in range(rounds):
        start = time.perf_counter()
        done = fn(*args)
        best = min(best, time.perf_counter() - start)
    return done, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="benchmarks/results/llm_stages.json")
    parser.add_argument("--repeat", type=int, default=2, help="copies of the sample's clusters (default 2)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per request")
    parser.add_argument("--concurrency", type=int, default=16, help="llm.max_concurrency (default 16)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds; the best is kept (default 2)")
    args = parser.parse_args()

    rows = pq.read_table(SAMPLE).to_pylist()
    clusters = [c for c in sample_clusters(rows) if "gallery" not in c.page_url] * args.repeat
    n_images = sum(len(c.images) for c in clusters)
    workdir = tempfile.mkdtemp(prefix="bench_llm_stages_")
    path = write_clusters(clusters, os.path.join(workdir, "clusters.parquet"))
    results: dict[str, Any] = {
        **header("llm_stages"),
        "clusters": len(clusters), "images": n_images, "sets": {}}

    server = FakeOpenAIServer(VL_MODEL)
    try:
        server.faults({"match": "", "fault": f"slow:{args.latency}", "times": None})
        config = CaptionConfig(backend="vllm", endpoint=server.url, model=VL_MODEL, batch_size=8)
        llm = LLMConfig(max_concurrency=args.concurrency)
        done_plain, plain_s = measure(plain_caption, 1, path, config, llm)  # the slow one: one round
        done_beam, beam_s = measure(beam_caption, args.rounds, path, config, llm)
        assert done_plain == done_beam == n_images
        results["sets"]["vllm_caption"] = {
            "server_latency_s": args.latency, "max_concurrency": args.concurrency,
            "plain_loop": {"images_per_s": round(n_images / plain_s, 2), "seconds": round(plain_s, 2)},
            "beam_stage": {"images_per_s": round(n_images / beam_s, 2), "seconds": round(beam_s, 2)},
            "ratio_beam_to_plain": round(plain_s / beam_s, 2)}
    finally:
        server.stop()

    many = clusters * 10
    many_path = write_clusters(many, os.path.join(workdir, "many.parquet"))
    done_plain, plain_s = measure(plain_offline, args.rounds, many_path)
    done_beam, beam_s = measure(beam_offline, args.rounds, many_path)
    assert done_plain == done_beam == len(many), (done_plain, done_beam)
    results["sets"]["offline"] = {
        "clusters": len(many),
        "plain_loop": {"clusters_per_s": round(len(many) / plain_s, 1), "seconds": round(plain_s, 2)},
        "beam_stages": {"clusters_per_s": round(len(many) / beam_s, 1), "seconds": round(beam_s, 2)},
        "ratio_beam_to_plain": round(plain_s / beam_s, 3)}

    for name, result in results["sets"].items():
        print(name, json.dumps(result))
    write_results(args.output, results)


if __name__ == "__main__":
    main()
