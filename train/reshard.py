"""Saving and restoring classifier shards, re-slicing them for another world size.

A checkpoint stores every rank's classifier shard in its own file, with its class range
``[class_start, class_start + num_local)`` and its row-aligned tensors (weight, bias and
the row optimiser's state, each ``[num_local, ...]``).  Resuming with W' ranks, rank r'
needs the rows ``partial_fc.sharding.class_range(C, r', W')``: they are cut from the
saved files whose ranges overlap, in class order, so a class keeps its weight and its
momentum / Adam moments whatever the world size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from partial_fc.generator_state import portable_state, restore_state

from .checkpoint import rank_file

# Every row-aligned tensor of a shard file lives under this key, by name.
ROWS = "rows"


def shard_rows(weight: torch.Tensor, bias: Optional[torch.Tensor], state_rows: dict[str, torch.Tensor]) -> dict:
    """The row-aligned tensors of one classifier shard, by name (``weight``, ``bias``, ``opt.<name>``)."""
    rows = {"weight": weight}
    if bias is not None:
        rows["bias"] = bias
    rows.update({f"opt.{k}": v for k, v in state_rows.items()})
    n = weight.shape[0]
    for name, t in rows.items():
        if t.shape[0] != n:
            raise ValueError(f"classifier row tensor {name!r} has {t.shape[0]} rows, the weight has {n}")
    return rows


def overlapping(ranges: list[tuple[int, int]], start: int, count: int) -> list[int]:
    """Indices of the saved ranges ``(start, count)`` that share a class with ``[start, start+count)``."""
    end = start + count
    return [i for i, (s, n) in enumerate(ranges) if s < end and s + n > start]


def check_ranges(ranges: list[tuple[int, int]], num_classes: int) -> None:
    """Raise unless the saved ranges tile ``[0, num_classes)`` in order."""
    expected = 0
    for i, (s, n) in enumerate(ranges):
        if s != expected or n < 0:
            raise ValueError(f"saved classifier shard {i} covers [{s}, {s + n}) but the previous ends at "
                             f"{expected}: the checkpoint is incomplete or from another dataset")
        expected = s + n
    if expected != num_classes:
        raise ValueError(f"saved classifier shards cover {expected} classes, the run has {num_classes}: "
                         "is this checkpoint from the same dataset?")


def gather_rows(ranges: list[tuple[int, int]], read_rows: Callable[[int], dict[str, torch.Tensor]],
                start: int, count: int) -> dict[str, torch.Tensor]:
    """Rows ``[start, start + count)`` of every row tensor, cut from the saved shards that hold them.

    ``read_rows(i)`` returns saved shard i's row tensors (called only for overlapping shards).
    """
    end = start + count
    pieces: dict[str, list[torch.Tensor]] = {}
    names: Optional[set] = None
    for i in overlapping(ranges, start, count):
        s, n = ranges[i]
        rows = read_rows(i)
        if names is None:
            names = set(rows)
        elif set(rows) != names:
            raise ValueError(f"saved classifier shard {i} has tensors {sorted(rows)}, shard 0 has "
                             f"{sorted(names)}: the shards come from different runs")
        lo, hi = max(start, s) - s, min(end, s + n) - s
        for name, t in rows.items():
            pieces.setdefault(name, []).append(t[lo:hi])
    out = {name: torch.cat(parts).clone() for name, parts in pieces.items()}
    for name, t in out.items():
        if t.shape[0] != count:
            raise ValueError(f"re-slicing gave {t.shape[0]} rows of {name!r} for classes [{start}, {end}), "
                             f"expected {count}: the saved ranges do not cover them")
    return out


def read_shard_file(path: Path) -> dict[str, torch.Tensor]:
    """The row tensors of a saved shard file, memory-mapped so that only the used rows are read."""
    payload = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return payload["classifier"][ROWS]


def _metric_rows(metric: Optional[torch.nn.Module], head: torch.nn.Module) -> tuple[dict, dict]:
    """(row-aligned, other) state tensors of a metric loss sharded like the classifier (center loss)."""
    if metric is None:
        return {}, {}
    sharded = getattr(metric, "class_start", None) == head.class_start and \
        getattr(metric, "num_local", None) == head.num_local
    rows, other = {}, {}
    for name, t in metric.state_dict().items():
        if sharded and torch.is_tensor(t) and t.dim() >= 1 and t.shape[0] == head.num_local:
            rows[f"metric.{name}"] = t
        else:
            other[name] = t
    return rows, other


def classifier_state(head: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     metric: Optional[torch.nn.Module] = None) -> dict:
    """What a checkpoint stores of this rank's classifier shard (tensors copied to the CPU).

    A metric loss whose state is split by class like the classifier (the center loss's
    centres) travels with the shard and is re-sliced with it.
    """
    rows = shard_rows(head.weight.detach(), head.bias.detach() if head.bias is not None else None,
                      optimizer.state_rows())
    metric_rows, metric_other = _metric_rows(metric, head)
    rows.update(metric_rows)
    # The margin's running state (λ schedule step, CurricularFace t, AdaFace statistics,
    # ElasticFace draws) is the same on every rank and independent of the world size.
    extra = {"head": head.get_extra_state(), "metric": metric_other,
             "margin": {k: v.cpu() if torch.is_tensor(v) else v for k, v in head.margin.state_dict().items()}}
    round_gen = getattr(optimizer, "rounding_generator", None)  # bf16 stochastic rounding stream
    if round_gen is not None:
        extra["round_gen"] = portable_state(round_gen)  # with its device kind: see partial_fc.generator_state
    return {"class_start": head.class_start, "num_local": head.num_local, "num_classes": head.num_classes,
            ROWS: {k: v.detach().cpu().clone() for k, v in rows.items()}, "extra": extra,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]}


@torch.no_grad()
def restore_classifier(head: torch.nn.Module, optimizer: torch.optim.Optimizer, rows: dict[str, torch.Tensor],
                       extra: Optional[dict] = None, metric: Optional[torch.nn.Module] = None) -> None:
    """Load row tensors (this rank's range) into the shard and its optimiser; ``extra`` only at the same layout."""
    n = head.num_local
    if rows["weight"].shape != head.weight.shape:
        raise ValueError(f"checkpoint classifier rows have shape {tuple(rows['weight'].shape)}, this shard "
                         f"(classes [{head.class_start}, {head.class_start + n})) needs "
                         f"{tuple(head.weight.shape)}: embedding size or margin centres differ")
    head.weight.copy_(rows["weight"])
    if head.bias is not None:
        if "bias" not in rows:
            raise ValueError("the checkpoint has no classifier bias but this margin uses one")
        head.bias.copy_(rows["bias"])
    device = head.weight.device
    optimizer.load_state_rows({k[len("opt."):]: v.to(device) for k, v in rows.items() if k.startswith("opt.")})
    if metric is not None:
        state = {k[len("metric."):]: v for k, v in rows.items() if k.startswith("metric.")}
        own_rows, own_other = _metric_rows(metric, head)
        if set(state) != {k[len("metric."):] for k in own_rows}:
            raise ValueError(f"the checkpoint's metric-loss state {sorted(state)} does not match "
                             f"loss.metric_loss={type(metric).__name__} ({sorted(own_rows)})")
        state.update((extra or {}).get("metric", {}) or own_other)
        metric.load_state_dict(state)
    if extra and "margin" in extra:
        head.margin.load_state_dict(extra["margin"])
    if extra and "head" in extra:
        head.set_extra_state(extra["head"])
        round_gen = getattr(optimizer, "rounding_generator", None)
        if round_gen is not None and "round_gen" in extra:
            restore_state(round_gen, extra["round_gen"])  # exact on the same device kind, else re-seeded


def load_classifier(head: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path, shared: dict,
                    local: Optional[dict], metric: Optional[torch.nn.Module] = None) -> bool:
    """Restore this rank's classifier shard from checkpoint ``folder``; True when re-sliced.

    At the saved world size the shard (and its sampling generator) comes from this rank's
    own file ``local``; otherwise the rows are cut from the saved files that overlap, and
    the sampling generators start afresh (there is no per-class equivalent of them).
    """
    ranges = [tuple(r) for r in shared["class_ranges"]]
    check_ranges(ranges, head.num_classes)
    same = local is not None and (local["classifier"]["class_start"], local["classifier"]["num_local"]) == \
        (head.class_start, head.num_local) and len(ranges) == head.world_size
    if same and local is not None:
        restore_classifier(head, optimizer, local["classifier"][ROWS], local["classifier"]["extra"], metric)
        return False
    rows = gather_rows(ranges, lambda i: read_shard_file(Path(folder) / rank_file(i)),
                       head.class_start, head.num_local)
    # Per-rank generators have no equivalent at another world size; the margin state does.
    first = torch.load(Path(folder) / rank_file(0), map_location="cpu", mmap=True, weights_only=False)
    margin_state = first["classifier"]["extra"].get("margin")
    restore_classifier(head, optimizer, rows, {"margin": margin_state} if margin_state else None, metric)
    return True
