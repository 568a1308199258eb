"""Process-wide memory settings, made once at start-up, before any thread exists."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def one_malloc_arena() -> bool:
    """Have glibc's malloc serve every thread from one arena; whether it was set.

    Each thread that allocates gets an arena of its own otherwise (up to 8 a core): the
    filesystem driver's threads (scans, link reads) and the reader pool's result thread
    allocated lists and buffers there, and what they freed stayed mapped apart from the main
    arena's free space: 8.5 MB more on average at the peak of a 1M-blob filesystem check
    (four runs each; runs vary by about 6 MB; issue 19, bench/README.md). Python code holds
    the GIL while it allocates, so one arena costs no contention worth measuring.
    MALLOC_ARENA_MAX in the environment is left to decide."""
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        return bool(libc.mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt): its allocator decides


def give_back() -> None:
    """Return the free pages inside glibc's heap to the system (``malloc_trim``): after a
    phase whose transients freed memory in holes that later, larger buffers cannot use."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc
