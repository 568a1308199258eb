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

    def __reduce__(self) -> tuple[type[Entry], tuple[str, int | None, float | None]]:
        # as a plain tuple: a frozen slotted dataclass pickles through its state, 5x slower
        return Entry, (self.key, self.size, self.mtime)


@dataclass(frozen=True, slots=True)
class BlobEntry:
    """A blob found in one ``blobs/sha256/<xx>/`` shard."""

    hex: str
    size: int | None = None
    mtime: float | None = None
    #: the blob's directory (or its shard) is a symbolic link: read through, never deleted
    linked: bool = False

    def __reduce__(self) -> tuple[type[BlobEntry], tuple[str, int | None, float | None, bool]]:
        # as a plain tuple: reader processes send back every blob outside the in-use set
        # (39,800 of 49,450 in an untagged check), and the default pickling of a frozen
        # slotted dataclass cost ~20 us a blob between both processes
        return BlobEntry, (self.hex, self.size, self.mtime, self.linked)

    @classmethod
    def with_data(cls, hexdigest: str, data: Entry | None, linked: bool = False) -> BlobEntry:
        """The blob with its data's size and mtime; none where it has no data (being written)."""
        if data is None:
            return cls(hexdigest, linked=linked)
        return cls(hexdigest, data.size, data.mtime, linked)


@dataclass(frozen=True, slots=True)
class DeleteFailure:
    key: str
    reason: str
    #: refused on purpose, not failed: the path is reached through a symbolic link, and a
    #: delete through it would remove what the link points to (kept, and reported)
    kept: bool = False
