"""How glibc's allocator treats a training step's large, short-lived tensors.

By default glibc serves blocks above an adaptive threshold (at most 32 MiB) with fresh
memory mappings and gives freed memory at the top of its heap back to the system. A CPU
training step allocates and frees the same large tensors every step (activations, the LM
head's [vocab, hidden] gradient, logits chunks), so each step pays page faults to touch
fresh pages again: on the bench's SmolLM2 student about a tenth of the step.

Two settings, each for the whole process and not undone afterwards (glibc has no way back
to its adaptive default), which is why the training loop applies them and importing
stillhouse does not:
- `keep_freed_memory` (the loop's default, `allocator: reuse`): blocks up to 512 MiB come
  from the heap and up to 1 GiB of freed memory stays there for the next step. Faster (no
  page faults on reused tensors; measured once by hand, no bench keeps the comparison) at the
  same peak; the process keeps that memory after training, until it exits.
- `return_freed_memory` (`low_memory`): small blocks from the heap, everything larger
  mapped and unmapped, freed memory returned at once. The lowest steady footprint, at the
  price of the page faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MiB = 1024 * 1024


def _mallopt(settings: dict[int, int]) -> bool:
    """Apply mallopt settings; False where the C library is not glibc (nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(bool(mallopt(param, value)) for param, value in settings.items())


def keep_freed_memory() -> bool:
    return _mallopt({_M_MMAP_THRESHOLD: 512 * MiB, _M_TRIM_THRESHOLD: 1024 * MiB})


def return_freed_memory() -> bool:
    return _mallopt({_M_MMAP_THRESHOLD: MiB // 4, _M_TRIM_THRESHOLD: MiB})


def trim() -> bool:
    """Give the heap's free pages back to the system now (glibc's malloc_trim also releases
    free chunks in the middle of the heap, which its automatic trimming never does)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
