"""Volumes, snapshots and their engine: catalog, cache, flusher, publication and checks."""
