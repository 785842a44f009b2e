"""Process-wide settings, made in one place: `startup()`, the first thing each command does once its arguments
are parsed. Nothing else in the packages changes process-wide state at import or in a constructor, so what a
command runs with reads from its `main`, and a test session makes the same call (tests/conftest.py).

- torch's intra-op threads: importing FFCV sets them to 1 (``ffcv.pipeline.compiler`` does so at import),
  which would make the teacher forward of the cache stage twice as slow on 2 cores. FFCV is imported here,
  between reading torch's count and setting it back. (FFCV's `Loader` still sets its own count, its decoding
  workers, when an epoch starts: the trainer chooses that number.)
- FFCV's decoding threads: its `Compiler.set_num_threads` (called when a loader is built and in its decoding
  thread) also set torch's threads, so the number of decode workers chose the threads of the model's CPU
  arithmetic, and a run or a resume with another `--workers` computed other losses. It is made to set numba's
  decoding threads only; the trainer sets torch's threads itself (recorded as `compute_threads`).
- glibc's allocator (`reuse_freed_memory`): freed large blocks are kept for reuse instead of unmapped. Each
  pageable training batch holds ~80 MB of PATH-B targets in tensors above glibc's mmap threshold, so by
  default every batch is a fresh mmap whose pages the kernel faults in and zeroes, then unmaps when the step
  drops it: that was most of the CPU feed's batch assembly. With large blocks served from the heap and not
  trimmed, the next batch reuses the freed pages; resident memory stays at its peak (a few batches), as it
  would anyway during training. Pinned batches (GPU training) come from torch's caching host allocator and
  do not need it. Linux with glibc only; elsewhere the allocator keeps its defaults.
"""
from __future__ import annotations

import ctypes
import importlib
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_FFCV_COMPILER = "ffcv.pipeline.compiler"


def startup(*, reuse_freed_memory: bool = False) -> None:
    """Set the process-wide state a command runs with (see the module docstring), before anything imports
    FFCV. A later call in the same process (a command run in a test session) changes nothing more."""
    import torch

    if _FFCV_COMPILER not in sys.modules:
        threads = torch.get_num_threads()
        importlib.import_module(_FFCV_COMPILER)  # sets torch's threads to 1
        torch.set_num_threads(threads)
    _decoding_threads_only()
    if reuse_freed_memory:
        _keep_freed_large_blocks()


def _decoding_threads_only() -> None:
    import numba
    from ffcv.pipeline.compiler import Compiler

    from runtime.arguments import usable_cores

    def set_num_threads(cls, count: int) -> None:
        cls.num_threads = count if count >= 1 else usable_cores()
        numba.set_num_threads(cls.num_threads)

    Compiler.set_num_threads = classmethod(set_num_threads)


def _keep_freed_large_blocks() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    limit = 2 ** 32 - 1
    libc.mallopt(_M_MMAP_THRESHOLD, limit)
    libc.mallopt(_M_TRIM_THRESHOLD, limit)
