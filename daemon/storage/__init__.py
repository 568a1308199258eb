"""Storage drivers behind one small async interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # reader processes import this package: keep it light (no asyncio)
    from daemon.config import StorageSettings
    from daemon.storage.base import Storage


def open_storage(settings: StorageSettings, concurrency: int) -> Storage:
    """The driver the registry's config names."""
    if settings.driver == "s3":
        from daemon.storage import s3

        return s3.create(settings, concurrency)
    if settings.driver == "azure":
        from daemon.storage import azure

        return azure.AzureStorage(settings, concurrency)
    if settings.driver == "gcs":
        from daemon.storage import gcs

        return gcs.GCSStorage(settings, concurrency)
    from daemon.storage.filesystem import FilesystemStorage

    return FilesystemStorage(settings.rootdirectory, concurrency)
