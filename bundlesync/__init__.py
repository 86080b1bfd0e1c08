"""bundlesync: signed, file-based sync of partitioned SQLite data (see README.md).

The library does the work; :mod:`bundlesync.cli` only parses and prints. The
curated API is re-exported here.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
