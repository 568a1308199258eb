"""Storage drivers behind one small async interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.storage.base import Storage

if TYPE_CHECKING:  # reader processes import this package: keep it light
    from daemon.config import StorageSettings


def open_storage(settings: StorageSettings, concurrency: int) -> Storage:
    """The driver the registry's config names."""
    if settings.driver == "s3":
        from daemon.storage import s3

        return s3.create(settings, concurrency)
    from daemon.storage.filesystem import FilesystemStorage

    return FilesystemStorage(settings.rootdirectory, concurrency)
