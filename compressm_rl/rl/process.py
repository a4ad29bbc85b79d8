"""Process-wide settings a training process makes once: torch threads and the allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

import torch

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def configure_process(threads: int) -> None:
    """``threads`` torch threads, and freed memory kept for reuse (``keep_freed_memory``)."""
    torch.set_num_threads(threads)
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MiB in the heap for reuse.

    A PPO step allocates and frees the same few hundred tensors of 0.1-1 MB every time.
    By default glibc serves each one with a fresh ``mmap`` and unmaps it on free, so
    every step page-faults its activations in again: 100-600 minor faults a gradient
    step here, 3-15 with this setting, and the update 2% (n = 128) to 11% (n = 25, MLP)
    faster, A/B in one process (``benchmarks/fused.py``, EPYC VM). The heap then holds
    the process's peak use instead of returning it, which a training process reaches
    every step anyway. Returns False where this is not glibc.
    """
    return set_malloc_thresholds(_MMAP_THRESHOLD_MAX, _TRIM_THRESHOLD)


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` (once set, glibc stops adapting
    them). Returns False where this is not glibc (nothing changed there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_bytes) and mallopt(_M_TRIM_THRESHOLD, trim_bytes))


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux's
    ``PR_SET_PDEATHSIG``), so that a data-parallel job never outlives the command that
    launched it (``kill -9`` of the launcher included). ``parent``: the pid expected as
    the parent; if it already died, ``sig`` is raised now. Returns False where this is
    not Linux (nothing set)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent):
        signal.raise_signal(sig)  # the parent died before the request took effect
    return True
