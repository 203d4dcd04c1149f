"""Memory measurements and release, so that "memory does not grow across clusters" is measured.

A synthesis worker runs for hours and thousands of clusters; any per-cluster leak (an adapter left on
the UNet, optimizer state kept alive, the CUDA caching allocator holding freed blocks) ends in an
out-of-memory failure half-way through a job. :func:`snapshot` is what the library records after each
cluster and what the tests and the benchmark compare across clusters.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MemorySnapshot:
    """Process and accelerator memory at one moment, in bytes."""

    rss: int
    """Resident set size of this process now."""
    peak_rss: int
    """Largest resident set size of this process so far."""
    cuda_allocated: int | None = None
    """Bytes held by live CUDA tensors (``torch.cuda.memory_allocated``); ``None`` without CUDA."""
    cuda_reserved: int | None = None
    """Bytes the CUDA caching allocator holds (allocated + cached free blocks)."""
    cuda_peak_allocated: int | None = None
    """Largest ``cuda_allocated`` since the last :func:`reset_peak` (the cluster's peak)."""

    def as_dict(self) -> dict[str, int | None]:
        return {"rss": self.rss, "peak_rss": self.peak_rss, "cuda_allocated": self.cuda_allocated,
                "cuda_reserved": self.cuda_reserved, "cuda_peak_allocated": self.cuda_peak_allocated}


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: fall back to psutil when installed
        try:
            import psutil
        except ImportError:
            return peak_rss_bytes()
        return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _cuda(device: Any) -> Any:
    import torch

    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda
    return None


def snapshot(device: Any = None) -> MemorySnapshot:
    cuda = _cuda(device)
    if cuda is None:
        return MemorySnapshot(rss=rss_bytes(), peak_rss=peak_rss_bytes())
    return MemorySnapshot(rss=rss_bytes(), peak_rss=peak_rss_bytes(),
                          cuda_allocated=int(cuda.memory_allocated(device)),
                          cuda_reserved=int(cuda.memory_reserved(device)),
                          cuda_peak_allocated=int(cuda.max_memory_allocated(device)))


def reset_peak(device: Any = None) -> None:
    cuda = _cuda(device)
    if cuda is not None:
        cuda.reset_peak_memory_stats(device)


def _malloc_trim() -> None:
    # glibc keeps freed heap pages in its arenas; a long-lived worker that frees a cluster's tensors
    # should hand them back to the system, or its RSS creeps up with fragmentation.
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release(device: Any = None) -> None:
    """Free what the last cluster left: unreachable objects, cached CUDA blocks, free heap pages."""
    gc.collect()
    cuda = _cuda(device)
    if cuda is not None:
        cuda.synchronize(device)
        cuda.empty_cache()
    _malloc_trim()
