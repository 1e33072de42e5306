"""How the C classes are split over W ranks."""
from __future__ import annotations


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first class, number of classes) held by ``rank``: an even split, the first
    ``num_classes % world_size`` ranks hold one class more."""
    if num_classes < world_size:
        raise ValueError(f"num_classes={num_classes} is smaller than the world size {world_size}: "
                         "every rank must hold at least one class")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)
