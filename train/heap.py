"""Hand the C heap's free pages back to the OS between steps (glibc only).

Training on the CPU allocates tensors of a new shape every batch (rows differ in length). glibc's
malloc serves them from its heap and, once a large block has been freed, raises its mmap threshold (up
to 32 MiB), so freed space stays mapped and the process grows with each new shape: a plain run of the
shipped recipe held 12.3 GB at step 34 and was still growing by about 0.2 GB a step, on a 24 GB
machine where an earlier run was killed for memory. Forcing every large block through mmap instead
(`MALLOC_MMAP_THRESHOLD_`) bounds the size but more than halved the step rate here (24.8 s a step
against 10.7 s; each allocation then costs a mmap, its page faults and a munmap). `malloc_trim(0)`
every few batches hands the free pages back and keeps most of the heap's speed (12.5 s a step every 4
batches, 13.2 s every batch; docs/results.md section 2). Elsewhere (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """The C library's malloc_trim from the symbols the process already has loaded, or None."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # TypeError: Windows has no "this process" library
        return None


def trim_freed_memory() -> bool:
    """Return the C heap's free pages to the OS; False where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
