"""File formats, one module each: tar shards, the manifest, RecordIO, JPEG, verification ``.bin``."""
