"""The FUSE layer: pyfuse3 Operations over the engine."""
