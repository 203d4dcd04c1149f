"""The trainers' reader: streaming examples, exact splits across ranks x workers, HF datasets."""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from schemas.parquet import EXAMPLES_SCHEMA, SchemaVersionError, image_cell
from schemas.reader import ExamplesDataset, iter_examples, list_shards, shard_units, split_units

SHARD_ROWS = (10, 7, 5)   # three shards of unequal length
ROW_GROUP = 4             # rows per row group: 3 + 2 + 2 = 7 units


def _row(i: int, photos: list[bytes]) -> dict:
    return {
        "example_id": f"ex{i:03d}",
        "cluster_id": f"c{i // 4}",
        "page_url": "https://shop.example.com/p",
        "subject": "teapot",
        "class_noun": "teapot",
        "demos": [{"image_id": f"d{k}", "image": image_cell(photos[(i + k) % len(photos)]),
                   "caption": f"demo {k}",
                   "width": 288, "height": 288} for k in range(3)],
        "target": {"candidate_id": f"t{i}", "image": image_cell(photos[(i + 5) % len(photos)]),
                   "prompt": "a teapot on a beach",
                   "prompt_template": "a {subject} on a beach", "rendered_prompt": "a sks teapot on a beach",
                   "skill": "recontextualization", "seed": i, "k": 0, "width": 288, "height": 288,
                   "source_image_id": "d9"},
        "scores": {"subject_sim": 0.5, "subject_sim_max": 0.75, "text_sim": 0.25, "copy_distance": 20,
                   "brightness": 0.5, "contrast": 0.25, "sharpness": 100.0},
        "provenance": {"pipeline_version": "0.1.0", "config_hash": "abc", "clip_model": "tiny-random",
                       "synth_model": "tiny-random", "synth_config_hash": "def", "caption_backend": "alt_text",
                       "subject_backend": "offline", "prompts_backend": "templates",
                       "prompts_prompt": "scene_templates_v1.json@4b7f4665958c", "fallbacks": []},
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory, product_photos: list[bytes]) -> tuple[str, list[dict]]:
    directory = tmp_path_factory.mktemp("examples")
    rows, start = [], 0
    for shard, n in enumerate(SHARD_ROWS):
        part = [_row(i, product_photos) for i in range(start, start + n)]
        pq.write_table(pa.Table.from_pylist(part, schema=EXAMPLES_SCHEMA), directory / f"part-{shard:05d}.parquet",
                       row_group_size=ROW_GROUP)
        rows += part
        start += n
    return str(directory / "*.parquet"), rows


def test_iter_examples_streams_every_row_decoded(shards) -> None:
    pattern, rows = shards
    examples = list(iter_examples(pattern))
    assert [e["example_id"] for e in examples] == [r["example_id"] for r in rows]
    first = examples[0]
    assert isinstance(first["target"]["image"], Image.Image) and first["target"]["image"].size == (288, 288)
    assert len(first["demos"]) == 3 and all(isinstance(d["image"], Image.Image) for d in first["demos"])
    original = Image.open(io.BytesIO(rows[0]["demos"][0]["image"]["bytes"])).convert("RGB")
    assert first["demos"][0]["image"].tobytes() == original.tobytes()
    raw = next(iter_examples(pattern, decode="bytes", columns=["example_id", "target"]))
    assert set(raw) == {"example_id", "target"} and raw["target"]["image"] == rows[0]["target"]["image"]["bytes"]


def test_units_come_from_the_footers(shards) -> None:
    units = shard_units(list_shards(shards[0]))
    assert len(units) == 7
    assert sum(u.num_rows for u in units) == sum(SHARD_ROWS)


@pytest.mark.parametrize("seed", [None, 7])
def test_split_is_disjoint_and_covering(shards, seed) -> None:
    units = shard_units(list_shards(shards[0]))
    for readers in (1, 2, 5, 7, 9):
        parts = [split_units(units, r, readers, seed=seed, epoch=3) for r in range(readers)]
        flat = [u for part in parts for u in part]
        assert sorted(flat) == sorted(units) and len(flat) == len(set(flat))
    if seed is not None:
        assert split_units(units, 0, 2, seed=seed, epoch=0) != split_units(units, 0, 2, seed=seed, epoch=1)


@pytest.mark.parametrize("seed", [None, 11])
def test_two_ranks_times_three_workers_read_each_example_once(shards, seed) -> None:
    pattern, rows = shards
    seen = []
    for rank in range(2):
        dataset = ExamplesDataset(pattern, rank=rank, world_size=2, seed=seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=3,
                                             multiprocessing_context="fork")
        ids = []
        for example in loader:
            assert example["target"]["image"].dtype == torch.uint8
            assert tuple(example["target"]["image"].shape) == (3, 288, 288)
            ids.append(example["example_id"])
        assert len(ids) == len(dataset)
        seen += ids
    assert sorted(seen) == sorted(r["example_id"] for r in rows)
    assert len(seen) == len(set(seen))


def test_ranks_come_from_the_environment(shards, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    dataset = ExamplesDataset(shards[0])
    assert (dataset.rank, dataset.world_size) == (1, 4)


def test_hugging_face_datasets_loads_the_shards(shards, tmp_path) -> None:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    pattern, rows = shards
    loaded = datasets.load_dataset("parquet", data_files=sorted(list_shards(pattern)), split="train",
                                   cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == len(rows)
    # Image columns are datasets' Image feature: PIL images, the same pixels as the stored bytes.
    assert isinstance(loaded.features["target"]["image"], datasets.Image)
    assert isinstance(loaded.features["demos"].feature["image"], datasets.Image)
    first = loaded[0]
    assert first["example_id"] == "ex000" and isinstance(first["target"]["image"], Image.Image)
    original = Image.open(io.BytesIO(rows[0]["target"]["image"]["bytes"])).convert("RGB")
    assert first["target"]["image"].convert("RGB").tobytes() == original.tobytes()
    assert all(isinstance(d["image"], Image.Image) for d in first["demos"])
    assert loaded[3]["demos"][2]["caption"] == "demo 2"


def test_foreign_files_are_refused(tmp_path) -> None:
    pq.write_table(pa.table({"a": [1]}), tmp_path / "x.parquet")
    with pytest.raises(SchemaVersionError):
        list(iter_examples(str(tmp_path / "*.parquet")))
    with pytest.raises(FileNotFoundError):
        list_shards(str(tmp_path / "none-*.parquet"))
