"""Assembly: demos (distinct, deterministic, never the target's source), examples, byte-sized shards."""

from __future__ import annotations

import collections
import dataclasses
import glob
import math
import os

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import ConfigError, build_config
from schemas.parquet import EXAMPLES_SCHEMA, check_schema_version, example_to_row, image_bytes
from schemas.reader import iter_examples, list_shards
from tests.clusters import CreateFromFile, beam_counters, sample_clusters
from tests.phase3_helpers import as_png, scored, units_of
from transforms.assemble import (
    Assemble,
    AssembleConfig,
    RunProvenance,
    choose_demos,
    make_example,
)
from transforms.outputs import examples_output, row_bytes, write_examples

RUN = RunProvenance("0.1.0", "cafe", "open_clip:tiny-random/random(seed=0)")


@pytest.fixture(scope="module")
def clusters(sample_rows) -> list:
    return sample_clusters(sample_rows, ["/products/backpack", "/products/teapot", "/products/duck-toy"])


def _scored_of(cluster, source_index: int, tag: str, render: bytes = b"png"):
    """A kept target of ``cluster`` nearest to its image ``source_index``."""
    s = scored(tag=tag, cluster_id=cluster.cluster_id, source=cluster.images[source_index].image_id)
    return dataclasses.replace(s, candidate=dataclasses.replace(s.candidate, image=render))


def test_demos_are_distinct_deterministic_and_never_the_source(clusters) -> None:
    backpack = clusters[0]  # 6 images
    ids = [im.image_id for im in backpack.images]
    demo_sets = set()
    for i in range(60):
        source = ids[i % len(ids)]
        demos = choose_demos(backpack, source, f"candidate-{i}", 3)
        chosen = [d.image_id for d in demos]
        assert len(chosen) == 3 == len(set(chosen)) and source not in chosen and set(chosen) <= set(ids)
        assert [d.image_id for d in choose_demos(backpack, source, f"candidate-{i}", 3)] == chosen  # deterministic
        demo_sets.add(frozenset(chosen))
    assert len(demo_sets) > 5  # the targets of one cluster do not all get the same three photos
    # The choice depends on the images, not on their order in the cluster.
    shuffled = backpack.replace(images=tuple(reversed(backpack.images)))
    assert choose_demos(shuffled, ids[0], "c", 3) == choose_demos(backpack, ids[0], "c", 3)


def test_too_few_images_besides_the_source(clusters) -> None:
    duck = clusters[2]  # 4 images: 3 besides the source
    assert len(duck.images) == 4
    assert len(choose_demos(duck, duck.images[0].image_id, "c", 3)) == 3
    assert choose_demos(duck, duck.images[0].image_id, "c", 4) is None
    assert len(choose_demos(duck, duck.images[0].image_id, "c", 4, min_n=2)) == 3
    assert len(choose_demos(duck, "not-in-the-cluster", "c", 4)) == 4


def test_stage_makes_examples_and_rejects_targets_without_enough_demos(clusters) -> None:
    backpack, _, duck = clusters
    small = duck.replace(images=duck.images[:3])  # min_images 3: a cluster phase 1 may write
    kept = [_scored_of(backpack, i, f"b{i}") for i in range(4)]
    starved = _scored_of(small, 0, "s0")
    config = AssembleConfig()
    p = TestPipeline()
    examples, rejects = p | beam.Create([units_of(kept, backpack), units_of([starved], small)]) | Assemble(config, RUN)
    check = examples | beam.Map(lambda e: (e.target.candidate.candidate_id, len(e.demos),
                                           e.target.source_image_id in {d.image_id for d in e.demos},
                                           len({d.image_id for d in e.demos}), e.provenance.clip_model))
    assert_that(check, equal_to([(s.candidate.candidate_id, 3, False, 3, RUN.clip_model) for s in kept]),
                label="Examples")
    assert_that(rejects | beam.Map(lambda r: (r.id, r.stage, r.reason, r.cluster_id)),
                equal_to([(starved.candidate.candidate_id, "assemble", "too_few_demos", small.cluster_id)]),
                label="Rejects")
    result = p.run()
    result.wait_until_finish()
    assert beam_counters(result, "assemble") == {"examples": 4, "too_few_demos": 1,
                                            "demos_without_caption": 4}  # these clusters were never captioned


def test_example_rows_carry_demos_target_scores_and_provenance(clusters) -> None:
    backpack = clusters[0]
    s = _scored_of(backpack, 2, "x")
    demos = choose_demos(backpack, s.source_image_id, s.candidate.candidate_id, 3)
    row = example_to_row(make_example(backpack, s, demos, RUN))
    assert [d["image_id"] for d in row["demos"]] == [d.image_id for d in demos]
    assert image_bytes(row["demos"][0]["image"]) == demos[0].image and row["demos"][0]["caption"] == demos[0].caption
    target = row["target"]
    assert target["prompt"] == "a red teapot on a beach" and target["rendered_prompt"] == "a sks teapot on a beach"
    assert target["prompt_template"] == "a {subject} on a beach" and target["source_image_id"] == s.source_image_id
    assert row["scores"]["text_sim"] == s.scores.text_sim
    assert row["provenance"]["synth_model"] == "tiny-random" and row["provenance"]["config_hash"] == "cafe"
    assert set(row) == set(EXAMPLES_SCHEMA.names)


SHARD_SIZES = [(4096, 1024), (300, 100), (60, 20)]
"""(shard kB, row group kB): one shard, a few, and many of a few rows each."""


@pytest.mark.slow
def test_shards_are_sized_by_bytes_and_read_back_whole(clusters, tmp_path) -> None:
    backpack, teapot, _ = clusters
    renders = [as_png(im.image, 256) for im in teapot.images]
    kept = [_scored_of(backpack, i % 6, f"k{i}", renders[i % len(renders)]) for i in range(24)]
    examples = [make_example(backpack, s, choose_demos(backpack, s.source_image_id, s.candidate.candidate_id, 3),
                             RUN) for s in kept]
    total = sum(row_bytes(example_to_row(e)) for e in examples)
    p = TestPipeline()
    created = p | CreateFromFile(examples, tmp_path / "in")  # megabytes of photos, for the three writers
    for shard_kb, group_kb in SHARD_SIZES:
        config = AssembleConfig(shard_bytes=shard_kb * 1024, row_group_bytes=group_kb * 1024)
        written = created | f"Write{shard_kb}" >> write_examples(str(tmp_path / f"out{shard_kb}"),
                                                                 examples_output(config, "zstd"))
        assert_that(written | f"Rows{shard_kb}" >> beam.Map(lambda w: w["rows"])
                    | f"Sum{shard_kb}" >> beam.CombineGlobally(sum), equal_to([24]), label=f"Count{shard_kb}")
    p.run().wait_until_finish()

    for shard_kb, group_kb in SHARD_SIZES:
        _check_shards(tmp_path / f"out{shard_kb}", AssembleConfig(shard_bytes=shard_kb * 1024,
                                                                  row_group_bytes=group_kb * 1024), examples, total)


def _check_shards(out, config: AssembleConfig, examples: list, total: int) -> None:
    files = sorted(glob.glob(str(out / "examples" / "*.parquet")))
    n_shards = math.ceil(total / config.shard_bytes)
    assert len(files) <= n_shards and os.path.basename(files[0]).endswith(f"-of-{n_shards:05d}.parquet")
    # Temporaries renamed into place and deleted; their folder is left empty for the launcher to remove.
    assert not [p for p in glob.glob(str(out / "examples" / ".tmp-*" / "*"))]
    rows_per_file = []
    for path in files:
        parquet = pq.ParquetFile(path)
        check_schema_version(parquet.schema_arrow, "examples", path)
        ids = parquet.read(columns=["example_id"]).column("example_id").to_pylist()
        assert ids == sorted(ids)  # rows in id order: reruns write the same files
        rows_per_file.append(len(ids))
        for i in range(parquet.num_row_groups):
            group = parquet.read_row_group(i).to_pylist()
            assert len(group) == 1 or sum(row_bytes(r) for r in group) <= config.row_group_bytes
    if n_shards > 1:
        assert len(files) > 1 and max(rows_per_file) < 24
    read = [e["example_id"] for e in iter_examples(list_shards(str(out / "examples" / "*.parquet")), decode="bytes")]
    assert sorted(read) == sorted(e.example_id for e in examples) and len(set(read)) == 24
    assert collections.Counter(len(e["demos"]) for e in iter_examples(str(out / "examples" / "*.parquet"),
                                                                      decode="bytes")) == {3: 24}


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="min_demos must be within 1..demos"):
        build_config("demo", overrides=["assemble.min_demos=4"])
    with pytest.raises(ConfigError, match="row_group_bytes .* must not exceed shard_bytes"):
        build_config("demo", overrides=["assemble.shard_bytes=1000", "assemble.row_group_bytes=2000"])
    config = build_config("demo", overrides=["assemble.demos=4", "assemble.min_demos=2"]).assemble
    assert (config.demos, config.min_demos) == (4, 2)
