"""The shared storage the library writes caches to, as a small protocol the caller injects.

The class images of prior preservation are rendered once per class noun and reused by every cluster of
that class, on every worker: they live in storage all workers see (a bucket on Dataflow, a directory on
one machine). The library does not choose the file system: it takes a :class:`SharedStorage`.
:class:`LocalStorage` is the plain-directory implementation; the Beam stage passes one backed by Beam
``FileSystems`` (``transforms.synthesize.BeamStorage``), so ``gs://`` and ``s3://`` work.
"""

from __future__ import annotations

import os
import tempfile
from typing import Protocol, runtime_checkable


@runtime_checkable
class SharedStorage(Protocol):
    """Whole-file access to a shared directory tree, with atomic writes.

    ``write_atomic`` must never leave a partial file under ``path``: readers on other workers see the
    old state or the complete new file (temporary file + rename).
    """

    def join(self, base: str, *parts: str) -> str: ...

    def exists(self, path: str) -> bool: ...

    def read(self, path: str) -> bytes: ...

    def write_atomic(self, path: str, data: bytes) -> None: ...


class LocalStorage:
    """:class:`SharedStorage` on a local (or network-mounted) file system."""

    def join(self, base: str, *parts: str) -> str:
        return os.path.join(base, *parts)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def read(self, path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    def write_atomic(self, path: str, data: bytes) -> None:
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)  # atomic on POSIX: readers see the old file or the whole new one
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
