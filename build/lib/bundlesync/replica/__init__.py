"""The replica inside the app database: bundlesync's tables, change tracking, the store of
versions, knowledge (FSIC) and the merge rule."""
