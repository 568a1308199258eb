"""Reference sources: what decides which blobs are in use."""
