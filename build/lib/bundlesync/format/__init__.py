"""The bundle file: container (preamble, manifest, zstd payload, summary, signed footer),
the manifest's fields, and the record-line codec. Knows bytes, not databases or keys."""
