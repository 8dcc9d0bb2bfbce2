"""snapfs: block volumes as sparse files, with O(1) copy-on-write snapshots in an object store."""

__version__ = "0.1.0"
