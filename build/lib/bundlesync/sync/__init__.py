"""The sync pipelines: export and import stage by stage, merging into the store, writing app
rows, purges, and the device's status."""
