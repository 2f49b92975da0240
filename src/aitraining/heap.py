"""The C heap under a run (glibc): blocks kept for reuse within a step, handed back to the system between steps.

Note [Heap growth]
~~~~~~~~~~~~~~~~~~
PyTorch's CPU tensors come from malloc. glibc serves a block below its mmap threshold from the heap and keeps it
for reuse after a free; a block above it gets a memory map of its own, faulted in page by page on first touch and
unmapped on free. Neither of glibc's two behaviours suits a training step:

- left to itself, glibc raises the threshold to the size of the largest block freed (up to 32 MiB), so after the
  first steps every activation, logits chunk and gradient buffer comes from the heap, and batches of varying
  shapes leave holes the heap never gives back: resident memory climbed 1.5 -> 3.4 GB in 22 steps (commit 311ae33);
- a fixed low threshold (64 KiB, this project's choice until 2026-12-06) bounds memory but maps and faults in
  every block of 64 KiB and more afresh, again and again: a step of the 8-layer student on 8 rows of ~130 tokens
  took 13 million page faults an epoch, 37 s of kernel time in a 58 s run.

So (`steady_heap`) the threshold is fixed at 32 MiB, which also stops glibc's adjustment, and free() no longer
shrinks the heap from its top (it would at 128 KiB, unmapping and faulting in a step's last blocks again and
again): within a step, freed blocks are reused at no cost; and after each optimizer step
(`return_freed_memory`, malloc_trim) every free page of the heap goes back to the system, so the holes a step
leaves do not pile up. Measured on 64 steps of that
student (8 epochs of 64 rows; 2026-12-06): 18.5 million page faults instead of 69.8, training 199 -> 135 s and the
teacher's scoring 16.9 -> 10.8 s, the same loss bit for bit (the allocator changes no arithmetic), at a peak of
3.08 GB instead of 2.61 (what a step frees stays for the step's own reuse). Over 200 steps the resident memory
after each trim levelled off at 2.1 GB by step 60, as it does with the 64 KiB threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
STEADY_MMAP_THRESHOLD = 32 << 20
KEEP_ON_TOP = 1 << 30  # free() never shrinks the heap itself: the trim between steps does


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None where there is none (not Linux, or another C library without these calls)."""
    name = ctypes.util.find_library("c")
    if not name or os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist (musl has neither)
    except (OSError, AttributeError):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def steady_heap(threshold: int = STEADY_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes, and let free() keep the top of the heap (Note [Heap
    growth]); False where there is no glibc."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, threshold)
                and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_ON_TOP))


def return_freed_memory() -> bool:
    """Hand every free page of the heap back to the system (malloc_trim); False where there is no glibc.

    Called between training steps (Note [Heap growth]); the benchmarks call it before they take a baseline, so that
    memory a setup freed is not counted as the code under test's."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
