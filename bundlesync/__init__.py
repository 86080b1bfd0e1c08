"""bundlesync: signed, file-based sync of partitioned SQLite data (see README.md)."""
