"""What drivers and their callers exchange: entries and errors (no asyncio: reader
processes import this)."""

from __future__ import annotations

from dataclasses import dataclass


class StorageError(Exception):
    """A storage operation failed (after the driver's own retries)."""


class NotFound(StorageError):
    """The key does not exist."""


class Conflict(StorageError):
    """A conditional write found the key not as the caller expected (taken or changed)."""


class TooLarge(StorageError):
    """An object is larger than the caller's read limit."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A file/object. Size and mtime are None when the listing did not provide them."""

    key: str
    size: int | None = None
    mtime: float | None = None  # seconds since the epoch (file mtime, S3 LastModified)


@dataclass(frozen=True, slots=True)
class BlobEntry:
    """A blob found in one ``blobs/sha256/<xx>/`` shard."""

    hex: str
    size: int | None = None
    mtime: float | None = None

    @classmethod
    def with_data(cls, hexdigest: str, data: Entry | None) -> BlobEntry:
        """The blob with its data's size and mtime; none where it has no data (being written)."""
        return cls(hexdigest) if data is None else cls(hexdigest, data.size, data.mtime)


@dataclass(frozen=True, slots=True)
class DeleteFailure:
    key: str
    reason: str
