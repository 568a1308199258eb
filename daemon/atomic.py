"""Whole-file replacement that readers and crashes never see half done."""

from __future__ import annotations

import contextlib
import os
import threading
import time


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``."""
    path = os.fspath(path)
    head, name = os.path.split(path)
    # unique per writer: two writers racing in one process must not share a temp file
    tmp = os.path.join(
        head, f".{name}.tmp.{os.getpid()}.{threading.get_ident()}.{time.monotonic_ns()}"
    )
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
