"""RanDeS core: seeded orthogonal maps, streaming fold / retrieve, the bundle format.

This floor does math and file formats only. It takes explicit arguments (paths,
readers, configs) and reads no environment, no database and no object store:
`storage` and `flows` sit above it.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
