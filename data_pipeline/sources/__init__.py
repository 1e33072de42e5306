"""Data sets as wholes: shard sets written and staged, image folders, ``.rec`` data sets."""
