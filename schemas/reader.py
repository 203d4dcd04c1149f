"""Read ``examples/*.parquet`` in a trainer: streaming, decoded, split across ranks and workers.

Needs only pyarrow and Pillow (torch for the ``IterableDataset`` and tensors; fsspec for remote
paths when Apache Beam is not installed)::

    from schemas.reader import ExamplesDataset, iter_examples

    for example in iter_examples("gs://bucket/icl/run1/examples/*.parquet"):   # dicts, PIL images
        demos, target = example["demos"], example["target"]

    dataset = ExamplesDataset("out/examples/*.parquet", decode="tensor")
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=3)

Files are read one row group at a time (the writer sizes row groups for this), so memory stays at one
row group per worker. :class:`ExamplesDataset` splits the (file, row group) units of all shards among
``world_size`` distributed ranks, then each rank's share among its ``num_workers`` DataLoader workers,
so that each example is read exactly once per epoch: no duplicates, no gaps. The shards are plain Parquet: Hugging Face
``datasets.load_dataset("parquet", data_files=...)`` and any Parquet reader open them as they are.
"""

from __future__ import annotations

import glob
import io
import os
import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import pyarrow.parquet as pq

from schemas.parquet import check_schema_version, image_bytes

try:  # torch is optional: only ExamplesDataset and decode="tensor" need it
    from torch.utils.data import IterableDataset as _DatasetBase
except ImportError:  # pragma: no cover - exercised only without torch
    _DatasetBase = object  # type: ignore[assignment,misc]

Decode = Literal["pil", "tensor", "bytes"]

_IMAGE_PATHS = (("demos", "image"), ("target", "image"))


# --- files ------------------------------------------------------------------------------------------

def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def list_shards(patterns: str | Sequence[str]) -> list[str]:
    """The files matching one or more globs, sorted (local paths, ``gs://``, ``s3://``, ...)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    paths: set[str] = set()
    for pattern in patterns:
        if _is_remote(pattern):
            paths.update(_remote_glob(pattern))
        else:
            paths.update(glob.glob(pattern.removeprefix("file://")))
    if not paths:
        raise FileNotFoundError(f"no example shards match {patterns}")
    return sorted(paths)


def _remote_glob(pattern: str) -> list[str]:
    try:
        import fsspec

        fs, _, _ = fsspec.get_fs_token_paths(pattern)
        protocol = pattern.split("://", 1)[0]
        return [p if "://" in p else f"{protocol}://{p}" for p in fs.glob(pattern)]
    except ImportError:
        from apache_beam.io.filesystems import FileSystems

        return [m.path for m in FileSystems.match([pattern])[0].metadata_list]


def open_binary(path: str) -> BinaryIO:
    """A seekable binary handle: local, fsspec (gcsfs, s3fs, ...) or Apache Beam ``FileSystems``."""
    if not _is_remote(path):
        return open(path.removeprefix("file://"), "rb")
    try:
        import fsspec

        return fsspec.open(path, "rb").open()
    except ImportError:
        from apache_beam.io.filesystems import FileSystems

        return FileSystems.open(path)


@dataclass(frozen=True, order=True)
class ShardUnit:
    """One row group of one shard: the unit of work split among readers."""

    path: str
    row_group: int
    num_rows: int


def shard_units(paths: Sequence[str]) -> list[ShardUnit]:
    """Every (shard, row group) of ``paths``, from the Parquet footers (checks the schema version)."""
    units = []
    for path in paths:
        with open_binary(path) as handle:
            parquet = pq.ParquetFile(handle)
            check_schema_version(parquet.schema_arrow, "examples", path)
            units.extend(ShardUnit(path, i, parquet.metadata.row_group(i).num_rows)
                         for i in range(parquet.num_row_groups))
    return units


# --- decoding ----------------------------------------------------------------------------------------

def decode_image(data: Any, decode: Decode) -> Any:
    """An image column's value (``{bytes, path}``) as encoded bytes, a PIL image or a uint8 tensor."""
    data = image_bytes(data)
    if decode == "bytes":
        return data
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    if decode == "pil":
        return image
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # uint8, C x H x W


def decode_example(row: dict[str, Any], decode: Decode) -> dict[str, Any]:
    """Decode the demo and target images of one example row in place."""
    for demo in row.get("demos") or ():
        demo["image"] = decode_image(demo["image"], decode)
    if row.get("target"):
        row["target"]["image"] = decode_image(row["target"]["image"], decode)
    return row


def read_unit(unit: ShardUnit, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    with open_binary(unit.path) as handle:
        table = pq.ParquetFile(handle).read_row_group(unit.row_group, columns=list(columns) if columns else None)
    return table.to_pylist()


def iter_examples(patterns: str | Sequence[str], *, decode: Decode = "pil", columns: Sequence[str] | None = None,
                  units: Sequence[ShardUnit] | None = None) -> Iterator[dict[str, Any]]:
    """Every example of the shards matching ``patterns``, in file and row order, one row group in memory."""
    for unit in units if units is not None else shard_units(list_shards(patterns)):
        for row in read_unit(unit, columns):
            yield decode_example(row, decode)


# --- PyTorch -------------------------------------------------------------------------------------------

def _distributed() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def split_units(units: Sequence[ShardUnit], reader: int, readers: int, *, seed: int | None = None,
                epoch: int = 0) -> list[ShardUnit]:
    """The units reader ``reader`` of ``readers`` reads: a disjoint, covering split (round robin).

    With a ``seed`` every reader applies the same permutation first (changing with ``epoch``), so the
    split stays disjoint and covering while the order changes from epoch to epoch.
    """
    if not 0 <= reader < readers:
        raise ValueError(f"reader {reader} not in 0..{readers - 1}")
    ordered = sorted(units)
    if seed is not None:
        random.Random(seed * 1_000_003 + epoch).shuffle(ordered)
    return ordered[reader::readers]


class ExamplesDataset(_DatasetBase):  # type: ignore[misc,valid-type]
    """A PyTorch ``IterableDataset`` over example shards, split across ranks and DataLoader workers.

    Args:
        patterns: glob(s) of ``examples/*.parquet`` shards.
        decode: ``"tensor"`` (uint8 C x H x W), ``"pil"`` or ``"bytes"``.
        rank, world_size: this process's place among distributed ranks; by default from
            ``torch.distributed`` when initialized, else the ``RANK`` / ``WORLD_SIZE`` variables.
        seed: shuffle row groups (same permutation on every rank) and rows within them; call
            :meth:`set_epoch` each epoch to change the order.
        columns: read only these columns (e.g. without ``provenance``).
    """

    def __init__(self, patterns: str | Sequence[str], *, decode: Decode = "tensor", rank: int | None = None,
                 world_size: int | None = None, seed: int | None = None,
                 columns: Sequence[str] | None = None) -> None:
        if _DatasetBase is object:  # pragma: no cover
            raise ImportError("ExamplesDataset needs torch")
        super().__init__()
        default_rank, default_world = _distributed()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.decode = decode
        self.seed = seed
        self.columns = columns
        self.epoch = 0
        self.units = shard_units(list_shards(patterns))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Examples read by this rank over all its workers."""
        return sum(u.num_rows for u in split_units(self.units, self.rank, self.world_size, seed=self.seed,
                                                   epoch=self.epoch))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Ranks first, then this rank's share among its workers: a rank reads the same units whatever
        # its number of workers, so len() holds and every unit is read once overall.
        mine = split_units(self.units, self.rank, self.world_size, seed=self.seed, epoch=self.epoch)
        for unit in mine[worker::workers]:
            rows = read_unit(unit, self.columns)
            if self.seed is not None:
                key = f"{self.seed}:{self.epoch}:{unit.path}:{unit.row_group}".encode()
                random.Random(zlib.crc32(key)).shuffle(rows)
            for row in rows:
                yield decode_example(row, self.decode)
