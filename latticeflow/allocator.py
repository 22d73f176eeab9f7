"""Host-memory allocator settings for the commands' CPU work (glibc's malloc on Linux).

PyTorch takes every CPU tensor from malloc. glibc serves blocks above its *mmap threshold*
(128 KiB at start, raised dynamically as blocks are freed) with fresh ``mmap`` calls and gives
freed memory at the top of the heap back to the system above its *trim threshold*. A training
step's activations are a few MiB each and are freed every step, so with those defaults a step
can fault its pages in anew, at a cost that varies from step to step (convolutions of one shape
measured 0.5–3.5 ms). :func:`keep_freed_memory` fixes the mmap threshold at 32 MiB and the trim
threshold at 1 GiB, so that freed blocks are reused: the process keeps up to that much freed
memory for itself.

The commands apply it at start (``latticeflow …``); a Python session that imports the library
keeps its allocator unless it calls :func:`keep_freed_memory` itself. ``LATTICEFLOW_MALLOC=system``
leaves glibc's defaults in place. Elsewhere (macOS, Windows, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 2**30
#: Set to ``system`` to keep glibc's default allocator settings.
ENVIRONMENT_VARIABLE = "LATTICEFLOW_MALLOC"


def keep_freed_memory() -> bool:
    """Apply the settings above to this process; returns whether they are in force."""
    if os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower() == "system":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (ValueError, OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
