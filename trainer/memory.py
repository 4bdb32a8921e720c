"""Host memory: hand freed tensors back to the system instead of keeping them in malloc's arenas.

glibc serves every allocation below its mmap threshold from arenas that keep what is freed, and
the threshold moves up (to 32 MiB) each time a larger mapped block is freed. After the first
backward nearly every activation of a small model falls under it: resident memory then stays at
the training peak between micro-batches and later peaks stack on the fragments (SmolLM2-135M,
LoRA DPO on CPU: about 1.9 GB resident with the moving threshold, about 1.1 GB with a fixed one,
at the same point of the same run). A fixed threshold maps each tensor of 128 KiB or more on its
own and unmaps it when it is freed. The same as running under ``MALLOC_MMAP_THRESHOLD_=131072``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold; False where the C library is not glibc (nothing changed)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return False
    # glibc only (it alone has gnu_get_libc_version): other C libraries' mallopt differ.
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
