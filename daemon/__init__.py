"""registry-pruned: hard-prunes orphaned blobs from an image registry's storage."""

__version__ = "0.1.0"
