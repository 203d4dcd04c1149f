"""Image bytes set aside in pack files while stages that do not read them run, and read back where needed.

Most of phase 1 decides on images without reading their bytes: grouping by page and boilerplate (pHash),
duplicates (ids, hashes), the coherence threshold, cross-page and semantic duplicates, decontamination
(embeddings), the subject and its scene prompts (captions). Yet many of those steps move records between
workers, and on a portable runner -- and in the DirectRunner's multi-process mode, where the launching process
relays every element of every shuffle -- moving photos costs far more than deciding. So the phase builder
(``pipeline/phases.py``) runs those stages (``Stage.light``) on *light* records (the claim-check pattern):

1. :class:`SetAsideImages` (fused with the step before) appends each image's bytes to a pack file under a
   temporary folder of the phase's output (``OUT/clusters/.tmp-images-*``, through Beam's ``FileSystems``, so
   ``gs://`` and ``s3://`` work), and sends the record on with its bytes emptied and :attr:`ImageRecord.stored`
   saying where they are. The records a pack holds leave when it is closed (at :data:`PACK_BYTES`, or at the end
   of the bundle), so a reader never sees a pack that is still being written, and a worker holds at most one
   pack's records. An image whose bytes are already stored under its id is not written again (a blurred image,
   whose id changed, is).
2. The light stages decide; only ids, hashes, embeddings and texts cross the network.
3. :class:`RestoreImages`, before a stage that reads the bytes (``Safety``, ``Embed``, a VLM ``Caption``), reads
   them back -- one open per pack file and cluster -- and checks each against its image id (the content hash of
   those bytes). The clusters writer reads them the same way, as it writes each row group
   (``transforms/outputs.py``), so the photos are never shuffled at all. A cluster whose bytes cannot be read
   back whole (never expected: a pack deleted or cut during the run) leaves as ``internal_error`` rejects, one
   per image, so nothing vanishes.

The run deletes the folder when the phase has finished (``pipeline/run.py``), or failed.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.utils.windowed_value import WindowedValue

from schemas.ids import content_id
from schemas.records import Cluster, ImageRecord, StoredImage
from transforms.common import REJECTS, StageOutput, count, internal_error

STAGE = "images"

PACK_BYTES = 64 * 1024 * 1024
"""A pack is closed, and the records it holds let go, once it holds this many bytes: a worker holds at most one
pack's records, however large its bundle."""

STORE_PREFIX = ".tmp-images-"
"""Name of the pack folder under the phase's first output folder (a temporary folder: ``outputs.TEMP_PREFIXES``)."""


class StoredImageError(RuntimeError):
    """Stored image bytes could not be read back whole."""


def store_folder(output_dir: str, folder: str) -> str:
    """A new pack folder for one phase run under ``OUT/<folder>``."""
    return FileSystems.join(output_dir, folder, f"{STORE_PREFIX}{uuid.uuid4().hex}")


def is_stored(image: ImageRecord) -> bool:
    """Whether ``image``'s bytes are in a pack under its current id."""
    return image.stored is not None and image.stored.image_id == image.image_id


def is_set_aside(image: ImageRecord) -> bool:
    """Whether ``image`` is light: its bytes emptied, to be read back from :attr:`ImageRecord.stored`."""
    return not image.image and image.stored is not None


def stored_bytes(cluster: Cluster) -> int:
    """Bytes of ``cluster``'s images that are set aside (what the writer will read back for its row)."""
    return sum(image.stored.length for image in cluster.images if is_set_aside(image))


def _images(element: ImageRecord | Cluster) -> Sequence[ImageRecord]:
    return element.images if isinstance(element, Cluster) else (element,)


def _with_images(element: ImageRecord | Cluster, images: Iterable[ImageRecord]) -> ImageRecord | Cluster:
    """``element`` with ``images`` in place of :func:`_images` (for a record: the one image)."""
    images = tuple(images)
    return element.replace(images=images) if isinstance(element, Cluster) else images[0]


class _Pack:
    """One pack file being written: images' bytes one after the other."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._handle = FileSystems.create(path, mime_type="application/octet-stream",
                                          compression_type=CompressionTypes.UNCOMPRESSED)
        self._offset = 0

    @property
    def size(self) -> int:
        return self._offset

    def put(self, image: ImageRecord) -> ImageRecord:
        self._handle.write(image.image)
        stored = StoredImage(image.image_id, self.path, self._offset, len(image.image))
        self._offset += len(image.image)
        return image.replace(image=b"", stored=stored)

    def close(self) -> int:
        self._handle.close()
        return self._offset


class SetAsideFn(beam.DoFn):
    """``ImageRecord`` or ``Cluster`` -> the same with every image's bytes emptied and stored in a pack.

    Records whose bytes went into the open pack are held until it is closed: when it reaches ``pack_bytes``, or
    at the end of the bundle. Records whose bytes were all stored already pass through at once.
    """

    def __init__(self, folder: str, pack_bytes: int = PACK_BYTES) -> None:
        self._folder = folder
        self._pack_bytes = pack_bytes
        self._pack: _Pack | None = None
        self._held: list[WindowedValue] = []
        self._written = 0

    def start_bundle(self) -> None:
        self._pack = None
        self._held = []
        self._written = 0

    def _aside(self, image: ImageRecord) -> ImageRecord:
        if not image.image:
            return image
        if is_stored(image):
            return image.replace(image=b"")
        if self._pack is None:
            self._pack = _Pack(FileSystems.join(self._folder, f"{uuid.uuid4().hex}.pack"))
        self._written += 1
        return self._pack.put(image)

    def process(self, element: ImageRecord | Cluster, timestamp: Any = beam.DoFn.TimestampParam,
                window: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        written = self._written
        result = _with_images(element, (self._aside(image) for image in _images(element)))
        if self._written == written:
            yield result  # nothing of it is in the open pack
            return
        self._held.append(WindowedValue(result, timestamp, (window,)))
        if self._pack is not None and self._pack.size >= self._pack_bytes:
            yield from self._close()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        yield from self._close()

    def _close(self) -> list[WindowedValue]:
        """Close the open pack; the records it holds can go."""
        if self._pack is not None:
            count(STAGE, "packs_written")
            count(STAGE, "bytes_set_aside", self._pack.close())
            count(STAGE, "images_set_aside", self._written)
        held, self._held, self._pack, self._written = self._held, [], None, 0
        return held


class SetAsideImages(beam.PTransform):
    """``ImageRecord`` s or ``Cluster`` s -> the same, light (bytes in packs under ``folder``)."""

    def __init__(self, folder: str, pack_bytes: int = PACK_BYTES) -> None:
        super().__init__()
        self._folder = folder
        self._pack_bytes = pack_bytes

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return records | "SetAside" >> beam.ParDo(SetAsideFn(self._folder, self._pack_bytes))


def read_stored(refs: Iterable[StoredImage]) -> dict[StoredImage, bytes]:
    """The bytes of ``refs``, one open per pack; raises :class:`StoredImageError` for a missing or cut pack or
    bytes that are not the image's."""
    by_pack: dict[str, list[StoredImage]] = defaultdict(list)
    for ref in refs:
        by_pack[ref.path].append(ref)
    found: dict[StoredImage, bytes] = {}
    for path, wanted in by_pack.items():
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                for ref in sorted(wanted, key=lambda r: r.offset):
                    handle.seek(ref.offset)
                    found[ref] = handle.read(ref.length)
        except Exception as error:  # noqa: BLE001 - any filesystem's error: the pack is unreadable
            raise StoredImageError(f"image pack {path} cannot be read: {type(error).__name__}: {error}") from error
    for ref, data in found.items():
        if len(data) != ref.length or content_id(data) != ref.image_id:
            raise StoredImageError(f"image {ref.image_id}: {len(data)} of {ref.length} bytes read back from "
                                   f"{ref.path} at {ref.offset}, and they are not that image's")
    return found


def restore(element: ImageRecord | Cluster) -> ImageRecord | Cluster:
    """``element`` with its images' bytes read back; :class:`StoredImageError` when one cannot be."""
    return restore_all([element])[0]


def restore_all(elements: Sequence[ImageRecord | Cluster]) -> list[ImageRecord | Cluster]:
    """``elements`` with their images' bytes read back together: one open per pack for all of them, not per element
    (the clusters writer calls it once per row group: on an object store, one ranged read of each pack per row
    group). :class:`StoredImageError` when one cannot be read back."""
    refs = [image.stored for element in elements for image in _images(element) if is_set_aside(image)]
    found = read_stored(refs) if refs else {}
    return [_with_images(element, (image.replace(image=found[image.stored]) if is_set_aside(image) else image
                                   for image in _images(element))) for element in elements]


class RestoreFn(beam.DoFn):
    """``ImageRecord`` or ``Cluster`` -> the same with its images' bytes read back; a cluster (or record) whose
    bytes cannot be read back leaves as ``internal_error`` rejects, one per image."""

    def process(self, element: ImageRecord | Cluster) -> Iterator[Any]:
        try:
            restored = restore(element)
        except StoredImageError as error:
            cluster_id = element.cluster_id if isinstance(element, Cluster) else None
            for image in _images(element):
                yield internal_error(STAGE, error, record=image, cluster_id=cluster_id)
            return
        yield restored


class RestoreImages(beam.PTransform):
    """Light ``ImageRecord`` s or ``Cluster`` s -> the same with their images' bytes, and dead letters."""

    def expand(self, records: beam.PCollection) -> StageOutput:
        restored = records | "Restore" >> beam.ParDo(RestoreFn()).with_outputs(REJECTS, main="records")
        return StageOutput(restored.records, restored[REJECTS])
