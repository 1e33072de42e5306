"""The sharded margin-softmax classifier (Partial FC).

Each rank holds the rows of its classes (``partial_fc.sharding.class_range``).  A step:

1. all-gather the local batches' features (with gradient) and labels: the global batch,
   in one ``all_gather_into_tensor`` (labels ride as extra columns; one reduce-scatter in
   the backward);
2. choose this rank's class rows for the step: every class that is a positive in the
   global batch, plus uniformly sampled negatives up to ``num_sample`` rows;
3. cosine of every global feature with every chosen row (GEMMs in ``compute_dtype``), the
   margin's logits, and the softmax cross-entropy across ranks (``partial_fc.softmax``, two
   all-reduces, the accuracy packed into them when asked for).

A forward reads nothing on the host when the global batch fits in ``num_sample`` rows (the
sampled rows then have a static count), ``sizes`` are passed (or the batches are equal and
``equal_batches`` is set) and ``check_inputs`` is deferred or off.  See docs/performance.md.

Only the chosen rows get a gradient, and they get it as a small ``[rows, D]`` tensor,
never as a dense gradient of the whole shard (unless ``sample_rate == 1``, where every row
is chosen and ``weight.grad`` is the ordinary dense gradient).  The optimiser in
``partial_fc.optim`` reads those row gradients and updates only those rows and their
state, so a class that is not sampled does not move (and, unless the optimiser's
``row_decay`` is ``"lazy_dense"``, does not decay either: :mod:`partial_fc.row_decay`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from . import native
from .block_threads import BlockThreads
from .checks import check_global_batch, check_mode, input_report
from .comm import ProcessGroup, gather_batch, gather_sizes, rank_and_world
from .cosine import RowCorrection, SoftmaxHandoff, cosine_logits, row_norms
from .filtering import filter_similar_negatives
from .generator_state import portable_state, restore_state
from .guard import tag_row_gradient_params
from .margin_softmax import margin_cross_entropy
from .margins.base import Margin, MarginInput
from .row_decay import LazyRowDecay
from .rows import Workspace, blocks, core_block_elements, gather_rows
from .sharding import class_range
from .softmax import sharded_cross_entropy, sharded_cross_entropy_and_accuracy

# Rows are initialised chunk by chunk from a generator seeded with the chunk number, so the
# initial weight of class j is the same whatever the world size.
_INIT_CHUNK = 4096
_NORM_EPS = 1e-12


def _top_rows(score: torch.Tensor, k: int) -> torch.Tensor:
    """The sorted indices of the ``k`` largest ``score``s (non-negative): the C select on the
    CPU where it is built (:func:`partial_fc.native.top_rows`), topk and a sort elsewhere."""
    index = native.top_rows(score, k)
    return index if index is not None else torch.topk(score, k, sorted=False).indices.sort().values


@dataclass
class _Chosen:
    """Rows used by one forward: their shard-local index (None = all) and gradient leaves."""

    index: Optional[torch.Tensor]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    correction: Optional[RowCorrection] = None
    """The gradient the backward left to be made (None: ``weight.grad`` is all of it)."""
    norms: Optional[torch.Tensor] = None
    """‖w‖ of the rows, computed by the gather (None: not yet computed)."""

    @property
    def has_grad(self) -> bool:
        """A backward reached these rows (their gradient may still be pending)."""
        return self.weight.grad is not None or (self.correction is not None and self.correction.pending)

    @property
    def deferred(self) -> Optional[RowCorrection]:
        """The pending gradient when it is all the gradient these rows have (one backward)."""
        c = self.correction
        return c if c is not None and c.pending and self.weight.grad is None else None


class PartialFC(nn.Module):
    """Sharded classifier + margin + distributed softmax; returns the global-batch mean loss.

    Args:
        embedding_size: feature width D.
        num_classes: total number of classes C over all ranks.
        margin: a :class:`partial_fc.margins.base.Margin`.
        sample_rate: fraction r in (0, 1] of this rank's classes used per step.
        group: process group the classes are split over (None: default group, or one process).
        seed: seeds the initial weight and the negative sampling.
        param_dtype: storage dtype of the weight (float32 or bfloat16).
        check_inputs: label range and finiteness checks: "strict" (or True; raise at once, one
            host read per forward), "deferred" (device flags collected by
            :meth:`take_input_reports`, read by the training step with its one host read) or
            "off" (or False).
        compute_dtype: dtype of the three cosine GEMMs, forward and backward (float32,
            bfloat16 or float16 — float16 needs CUDA); sums are float32, and margins, softmax
            and row updates stay float32.
        tf32: float32 GEMMs may use TF32 tensor cores (CUDA; ``compute_dtype`` float32 only).
        min_sample: at least this many rows per step (the training run passes its global
            batch, so that the positives always fit in a static number of rows).
        interclass_filtering_threshold: a negative whose cosine with the sample exceeds it is
            filtered from the sample's softmax (cosine set to 0, no gradient; see
            :mod:`partial_fc.filtering`); 0 turns filtering off.

    ``accuracy`` (after a forward with ``accuracy=True``) ranks the logits the loss uses
    (margin included at the target) over the columns of the step: the classes sampled on
    all ranks, every class when ``sample_rate == 1``.
    """

    def __init__(self, embedding_size: int, num_classes: int, margin: Margin,
                 sample_rate: float = 1.0, group: ProcessGroup = None, seed: int = 0,
                 param_dtype: torch.dtype = torch.float32, check_inputs="strict",
                 init_std: float = 0.01, compute_dtype: torch.dtype = torch.float32, tf32: bool = False,
                 min_sample: int = 0, interclass_filtering_threshold: float = 0.0):
        super().__init__()
        if not isinstance(margin, Margin):
            raise TypeError(f"margin must be a partial_fc.margins.Margin, got {type(margin).__name__}")
        if not (isinstance(sample_rate, (int, float)) and 0.0 < sample_rate <= 1.0):
            raise ValueError(f"sample_rate={sample_rate!r} is outside (0, 1]: it is the fraction of "
                             "each rank's classes sampled per step (1.0 = all)")
        if embedding_size <= 0:
            raise ValueError(f"embedding_size={embedding_size} must be positive")
        if param_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"param_dtype={param_dtype} is not supported: use torch.float32 or torch.bfloat16")
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype={compute_dtype} is not supported: use torch.float32, torch.bfloat16 "
                             "or torch.float16")
        if tf32 and compute_dtype != torch.float32:
            raise ValueError(f"tf32=True needs compute_dtype=torch.float32, got {compute_dtype}")
        if not (isinstance(interclass_filtering_threshold, (int, float))
                and 0.0 <= interclass_filtering_threshold <= 1.0):
            raise ValueError(f"interclass_filtering_threshold={interclass_filtering_threshold!r} is outside "
                             "[0, 1]: it is a cosine (0.4 in insightface's WebFace12M recipe; 0 = off)")
        self.rank, self.world_size = rank_and_world(group)
        self.group = group
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.class_start, self.num_local = class_range(num_classes, self.rank, self.world_size)
        self.margin = margin
        self.num_centers = int(getattr(margin, "num_centers", 1))
        self.sample_rate = float(sample_rate)
        self.num_sample = min(self.num_local, max(math.ceil(self.sample_rate * self.num_local), int(min_sample)))
        self.seed = seed
        self.check_inputs = check_mode(check_inputs)
        self.compute_dtype, self.tf32 = compute_dtype, bool(tf32)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.weight = nn.Parameter(self._initial_rows(init_std, param_dtype))
        self.bias = nn.Parameter(torch.zeros(self.num_local, dtype=param_dtype)) if margin.uses_bias else None
        self._sampler: Optional[torch.Generator] = None
        self.lazy_decay: Optional[LazyRowDecay] = None
        """Set by a row optimiser with ``row_decay="lazy_dense"``: the decay each row owes,
        applied to the chosen rows when they are gathered (see :mod:`partial_fc.row_decay`)."""
        if self.num_sample < self.num_local or param_dtype != torch.float32:
            # Gradients arrive as rows, not in .grad: a torch optimiser over these would do nothing.
            tag_row_gradient_params([self.weight] + ([self.bias] if self.bias is not None else []))
        self._chosen: list[_Chosen] = []
        self.accuracy = torch.zeros(())
        self._reports: list[tuple[torch.Tensor, tuple[int, ...]]] = []

    # ------------------------------------------------------------------ construction
    def _initial_rows(self, std: float, dtype: torch.dtype) -> torch.Tensor:
        width = self.num_centers * self.embedding_size
        first, last = self.class_start, self.class_start + self.num_local
        # Filled chunk by chunk in place: the peak is the shard plus one chunk, never two shards.
        out = torch.empty(self.num_local, width, dtype=dtype)
        for chunk in range(first // _INIT_CHUNK, (last - 1) // _INIT_CHUNK + 1):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk)
            rows = torch.randn(_INIT_CHUNK, width, generator=gen).mul_(std)
            lo = max(first, chunk * _INIT_CHUNK)
            hi = min(last, (chunk + 1) * _INIT_CHUNK)
            out[lo - first:hi - first] = rows[lo - chunk * _INIT_CHUNK:hi - chunk * _INIT_CHUNK]
        return out

    def sampler(self) -> torch.Generator:
        """The generator of negative sampling (per rank, seeded; its state is checkpointed)."""
        if self._sampler is None or self._sampler.device != self.weight.device:
            self._sampler = torch.Generator(device=self.weight.device)
            self._sampler.manual_seed(self.seed * 7919 + self.rank + 1)
        return self._sampler

    def get_extra_state(self) -> dict:
        """Sampling generator state, so a resumed run samples the same negatives.

        Stored with the kind of device it came from (``partial_fc.generator_state``): a CPU
        generator's state cannot be set into a CUDA generator, nor the other way round.
        """
        return {"sampler": portable_state(self.sampler())}

    def set_extra_state(self, state: dict) -> None:
        """Restore the sampling generator: exactly on the same kind of device, else re-seeded from it.

        Across kinds (a CPU checkpoint resumed on a GPU, or back) the negatives of the resumed
        run are drawn from a generator seeded by a hash of the saved state: deterministic,
        but not the stream the saving run would have drawn next.
        """
        if state and "sampler" in state:
            restore_state(self.sampler(), state["sampler"])

    # ------------------------------------------------------------------ forward
    def _check(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings have shape {tuple(embeddings.shape)}, expected [batch, "
                             f"{self.embedding_size}] (embedding_size of this PartialFC)")
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected [{embeddings.shape[0]}] "
                             "(one label per embedding)")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")

    @torch.no_grad()
    def _choose_rows(self, labels: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(sorted shard-local row index or None for all rows, target column per sample or -1)."""
        local = labels - self.class_start
        here = (local >= 0) & (local < self.num_local)
        if self.num_sample >= self.num_local:
            return None, torch.where(here, local, torch.full_like(local, -1))
        clamped = local.clamp(0, self.num_local - 1)
        if labels.shape[0] <= self.num_sample:
            # The positives (at most N) always fit: a static number of rows, no host read.
            # A positive's score becomes 2, above any uniform draw in [0, 1), by an amax
            # scatter (a sample held elsewhere scatters 0, which changes nothing).
            score = torch.rand(self.num_local, generator=self.sampler(), device=self.weight.device)
            mark = torch.where(here, 2.0, 0.0).to(score.dtype)
            score.scatter_reduce_(0, clamped, mark, reduce="amax")
            index = _top_rows(score, self.num_sample)
        else:
            # More samples than rows: the positives may not fit, and their count decides the
            # rows (unique, one host read).  The training run avoids this path (min_sample).
            positives = torch.unique(local[here])
            if positives.numel() >= self.num_sample:
                index = positives
            else:
                score = torch.rand(self.num_local, generator=self.sampler(), device=self.weight.device)
                score[positives] = 2.0  # above any uniform draw: positives are always kept
                index = _top_rows(score, self.num_sample)
        column = torch.searchsorted(index, clamped)
        return index, torch.where(here, column, torch.full_like(local, -1))

    def _leaves(self, index: Optional[torch.Tensor]) -> _Chosen:
        dense_param = index is None and self.weight.dtype == torch.float32
        if dense_param:
            return _Chosen(None, self.weight, self.bias)
        # A detached float32 copy of the chosen rows is the leaf that collects their gradient.
        # The first training forward of a step copies into a buffer kept between steps (a
        # fresh [rows, D] tensor costs more in page faults than the copy), and the row
        # optimiser reuses that copy instead of gathering the weight a second time.
        # Later forwards of the step (gradient accumulation) or others (evaluation while a
        # step is pending) must not overwrite it: they get fresh tensors.
        first = self.training and torch.is_grad_enabled() and not self._chosen
        weight = self.weight.detach()
        shape = (weight.shape[0] if index is None else index.numel(),) + tuple(weight.shape[1:])
        workspace = self._row_workspace()
        out = (workspace.get("rows", shape, torch.float32, weight.device) if first
               else torch.empty(shape, dtype=torch.float32, device=weight.device))
        # One centre per class: the row norms come out of the gather, block by block.
        norms = torch.empty(shape[0], dtype=torch.float32, device=weight.device) if self.num_centers == 1 else None
        w = self._gather(weight, index, out, workspace, norms)
        # Rows that missed steps under lazy_dense decay: bring the copy up to date first, so
        # that the cosine and the gradient see the row dense SGD would hold.
        owed = self.lazy_decay.factors(index) if self.lazy_decay is not None and index is not None else None
        if owed is not None:
            w.mul_(owed.view((-1,) + (1,) * (w.dim() - 1)))
            norms = None  # computed again from the decayed rows
        w = w.detach().requires_grad_(self.training)
        self._gathered = (w, self.weight._version) if first else None
        b = None
        if self.bias is not None:
            b = self.bias.detach() if index is None else self.bias.detach()[index]
            b = b.float()
            if owed is not None:
                b = b * owed
            b = b.requires_grad_(self.training)
        return _Chosen(index, w, b, norms=None if norms is None else norms.clamp_min_(_NORM_EPS))

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                sizes: Optional[Sequence[int]] = None, accuracy: bool = True) -> torch.Tensor:
        """Loss of the global batch (same value on every rank); see the class docstring.

        ``sizes``: every rank's local batch size when the caller knows them (the training
        step: equal batches, or the loader's announced last batch); None exchanges them
        (one all-gather and one host read).  ``accuracy``: also compute ``self.accuracy``
        (packed into the softmax's all-reduces; NaN otherwise).
        """
        self._check(local_embeddings, local_labels)
        if self.compute_dtype == torch.float16 and local_embeddings.device.type != "cuda":
            raise ValueError(f"compute_dtype=float16 needs a CUDA device, the features are on "
                             f"{local_embeddings.device}: use bfloat16 or float32 there")
        if sizes is None:
            sizes = gather_sizes(local_embeddings.shape[0], local_embeddings.device, self.group)
        sizes = tuple(int(n) for n in sizes)
        features, labels = gather_batch(local_embeddings, local_labels, self.group, sizes)
        features = features.float()
        if self.check_inputs == "strict":
            check_global_batch(features.detach(), labels, sizes, self.num_classes)
        elif self.check_inputs == "deferred":
            self._reports.append((input_report(features.detach(), labels, self.num_classes), sizes))

        index, target = self._choose_rows(labels)
        # The first training forward of a step keeps its [N, c] and [c, D] buffers between
        # steps (as its copy of the rows, see _leaves); any other forward allocates.
        workspace = self._row_workspace() if self.training and torch.is_grad_enabled() and not self._chosen else None
        chosen = self._leaves(index)
        if self.training and torch.is_grad_enabled():
            # Forwards whose backward never ran hold rows nobody will update: dropped, so that
            # the pending list cannot grow step after step.  The dense float32 shard is the
            # leaf itself: it is listed once (a torch optimiser may own it and never clear).
            self._chosen = [c for c in self._chosen if c.has_grad]
            if not any(c.weight is chosen.weight for c in self._chosen):
                self._chosen.append(chosen)

        feature_norm = features.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
        unit = features / feature_norm
        rows = chosen.weight.view(-1, self.embedding_size)  # [c·K, D]
        norms = chosen.norms if chosen.norms is not None else row_norms(rows)
        fused = self.margin.logit_scale() is not None
        if chosen.weight is not self.weight and self.training and torch.is_grad_enabled():
            # The rows are this forward's own copy: the row optimiser makes their gradient
            # block by block, while it holds each block in cache anyway.
            chosen.correction = RowCorrection(rows.detach())
        # The parameter itself (dense float32 shard) keeps its own .grad: a torch optimiser may
        # zero it in place and accumulate into it, so its gradient must not be a kept buffer.
        # The cosines feed the fused softmax alone (one centre, no filtering): the two may share
        # their [N, c] passes (partial_fc.cosine.SoftmaxHandoff).
        direct = fused and self.num_centers == 1 and self.interclass_filtering_threshold == 0
        handoff = SoftmaxHandoff() if direct else None
        cos = cosine_logits(unit, rows, norms, self.compute_dtype, self.tf32,
                            grad_in_place=fused and self.num_centers == 1, correction=chosen.correction,
                            workspace=None if chosen.weight is self.weight else workspace,
                            threads=self.block_threads, handoff=handoff)
        # Only margins on un-normalised rows (softmax, L-Softmax) differentiate through ‖w‖.
        weight_norm = rows.norm(dim=1).clamp_min(_NORM_EPS) if self.margin.uses_weight_norm else norms
        if self.num_centers > 1:
            cos = cos.view(cos.shape[0], -1, self.num_centers).max(dim=2).values
            # Sub-centre margins are normalised; the largest centre norm stands for the class.
            weight_norm = weight_norm.view(-1, self.num_centers).max(dim=1).values

        if self.interclass_filtering_threshold > 0:
            cos = filter_similar_negatives(cos, target, self.interclass_filtering_threshold)

        inp = MarginInput(cos=cos, target=target, feature_norm=feature_norm, weight_norm=weight_norm,
                          bias=chosen.bias, group=self.group)
        fused_out = (margin_cross_entropy(self.margin, inp, accuracy, workspace, self.block_threads, handoff)
                     if fused else None)
        if fused_out is not None:
            # s·cos margins: margin and softmax share one [N, c] buffer (partial_fc.margin_softmax).
            loss, self.accuracy = fused_out
        elif accuracy:
            logits = self.margin(inp).float()
            # Ranked by the loss's own logits: the cosine ranks wrongly where logits are not
            # cosines (softmax, L-Softmax: ‖w‖‖x‖cos + b).
            loss, self.accuracy = sharded_cross_entropy_and_accuracy(logits, target, logits.detach(), self.group)
        else:
            logits = self.margin(inp).float()
            loss = sharded_cross_entropy(logits, target, self.group)
            self.accuracy = torch.full((), float("nan"), device=logits.device)
        extra = self.margin.extra_loss(inp)
        if extra is not None:
            # Every rank computed the same global value; backward uses this rank's share.
            share = extra / self.world_size
            loss = loss + share + (extra - share).detach()
        return loss

    def take_input_reports(self) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """The deferred input checks since the last call: (device report of
        :func:`partial_fc.checks.input_report`, every rank's local batch size)."""
        reports, self._reports = self._reports, []
        return reports

    # ------------------------------------------------------------------ gradients of rows
    def row_grads(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(row index or None for all rows, weight grad rows, bias grad rows) since the last clear.

        Gradients of several forwards (gradient accumulation) are summed per row.
        Returns (None, None, None) when no row received a gradient.
        """
        done = self._complete_row_grads()
        if not done:
            return None, None, None
        if any(c.index is None for c in done):
            if done[0].weight is self.weight:
                return None, self.weight.grad, (self.bias.grad if self.bias is not None else None)
            w = torch.stack([c.weight.grad for c in done]).sum(0)
            b = torch.stack([c.bias.grad for c in done if c.bias is not None]).sum(0) if self.bias is not None else None
            return None, w, b
        if len(done) == 1:
            only = done[0]
            return only.index, only.weight.grad, (only.bias.grad if only.bias is not None else None)
        index = torch.cat([c.index for c in done])
        w = torch.cat([c.weight.grad for c in done])
        b = torch.cat([c.bias.grad for c in done if c.bias is not None]) if self.bias is not None else None
        index, inverse = torch.unique(index, return_inverse=True)
        w = w.new_zeros((index.numel(),) + w.shape[1:]).index_add_(0, inverse, w)
        if b is not None:
            b = b.new_zeros(index.numel()).index_add_(0, inverse, b)
        return index, w, b

    def _complete_row_grads(self) -> list[_Chosen]:
        """The forwards with a gradient, each pending gradient made (into ``weight.grad``)."""
        done = [c for c in self._chosen if c.has_grad]
        for c in done:
            if c.correction is not None and c.correction.pending:
                grad = self._make_pending_gradient(c)
                c.weight.grad = grad if c.weight.grad is None else c.weight.grad.add_(grad)
        return done

    def _make_pending_gradient(self, chosen: _Chosen) -> torch.Tensor:
        """The gradient a backward left pending, made in the row optimiser's blocks (so that it
        equals, bit for bit, what the optimiser would have made itself)."""
        correction = chosen.correction
        assert correction is not None
        out = torch.empty(chosen.weight.shape, dtype=torch.float32, device=chosen.weight.device)
        rows = out.view(correction.rows.shape)
        k = self.num_centers

        def block(sl: slice, ws: Workspace) -> None:
            part = slice(sl.start * k, sl.stop * k)
            correction.gradient_block(part, rows[part])

        self.block_threads.run(block, self.update_blocks(out.shape[0]), None if out.device.type == "cpu" else 1)
        correction.clear()
        return out

    def update_blocks(self, num_rows: int) -> list[slice]:
        """The blocks of chosen rows that a row optimiser updates one at a time, in cache."""
        return list(blocks(num_rows, self.num_centers * self.embedding_size, core_block_elements()))

    def pending_row_grads(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor],
                                         Optional[RowCorrection], Optional[torch.Tensor]]:
        """As :meth:`row_grads`, with the weight gradient possibly still to be made:
        (index, weight grad, pending, bias grad).

        When one forward fed the gradient and its row copy is still current
        (:meth:`gathered_weight_rows`), the weight gradient is not made: ``pending`` is the
        :class:`partial_fc.cosine.RowCorrection` that makes it block by block
        (``gradient_block`` over the rows of :meth:`update_blocks`, one centre after another),
        from the rows :meth:`gathered_weight_rows` returns, and ``weight grad`` is None.
        Whoever takes it must make each block before changing those rows, and ``clear()`` it
        after.  Otherwise ``pending`` is None and the weight gradient is complete.
        """
        done = [c for c in self._chosen if c.has_grad]
        if len(done) == 1 and done[0].deferred is not None and self.gathered_weight_rows() is not None:
            only = done[0]
            return only.index, None, only.deferred, only.bias.grad if only.bias is not None else None
        index, w, b = self.row_grads()
        return index, w, None, b

    @torch.no_grad()
    def row_grads_finite(self) -> torch.Tensor:
        """Device bool: every row gradient since the last clear is finite (no host read).

        A pending gradient is checked through its factors (the product's operands and the
        correction's coefficients; the rows are the weights, finite whenever the loss is), so
        the check never makes it: a product of finite float32 factors this size overflows
        only past 3e38.
        """
        ok = torch.ones((), dtype=torch.bool, device=self.weight.device)
        for c in self._chosen:
            if c.weight.grad is not None:
                ok = ok & torch.isfinite(c.weight.grad).all()
            correction = c.correction
            if correction is not None and correction.product is not None and correction.coef is not None:
                g, unit = correction.product[:2]
                ok = ok & torch.isfinite(g).all() & torch.isfinite(unit).all() & torch.isfinite(correction.coef).all()
            if c.bias is not None and c.bias.grad is not None:
                ok = ok & torch.isfinite(c.bias.grad).all()
        return ok

    def gathered_weight_rows(self) -> Optional[torch.Tensor]:
        """The float32 copy of the weight rows that :meth:`row_grads` refers to, if still current.

        Available when one forward fed the pending gradient, it used the reusable buffer,
        and the weight has not been changed since (its version counter is unchanged);
        None otherwise (the optimiser then gathers the rows itself).  The optimiser may
        update the returned rows in place: they are not read again before the next forward.
        """
        gathered = getattr(self, "_gathered", None)
        done = [c for c in self._chosen if c.has_grad]
        if gathered is None or len(done) != 1 or done[0].weight is not gathered[0]:
            return None
        rows, version = gathered
        return rows.detach() if self.weight._version == version else None

    def _gather(self, weight: torch.Tensor, index: Optional[torch.Tensor], out: torch.Tensor,
                workspace: Workspace, norms: Optional[torch.Tensor]) -> torch.Tensor:
        """``gather_rows`` into ``out``; on a CPU with several threads, cache-sized blocks on
        one core each (:mod:`partial_fc.block_threads`), so that the conversion and the norms
        read each block from cache instead of a few large parallel passes over memory."""
        simple = weight.dtype == out.dtype and norms is None
        if weight.device.type != "cpu" or torch.get_num_threads() == 1 or simple or out.dim() != 2:
            return gather_rows(weight, index, out, workspace, norms=norms)

        def block(sl: slice, ws: Workspace) -> None:
            gather_rows(weight[sl] if index is None else weight, None if index is None else index[sl], out[sl], ws,
                        per, None if norms is None else norms[sl])

        per = core_block_elements()
        self.block_threads.run(block, list(blocks(out.shape[0], out.shape[1], per)))
        return out

    @property
    def block_threads(self) -> BlockThreads:
        """The threads and per-thread scratch blocks of the row loops (created on first use)."""
        threads = getattr(self, "_threads", None)
        if threads is None:
            threads = self._threads = BlockThreads()
        return threads

    def _row_workspace(self) -> Workspace:
        """Buffers for the sampled rows, kept between steps (created on first use)."""
        workspace = getattr(self, "_workspace", None)
        if workspace is None:
            workspace = self._workspace = Workspace()
        return workspace

    def clear_row_grads(self) -> None:
        """Forget the rows chosen since the last step (called by the optimiser's zero_grad)."""
        self._chosen.clear()
        self._gathered = None
        self.weight.grad = None
        if self.bias is not None:
            self.bias.grad = None

    def dense_weight_grad(self) -> torch.Tensor:
        """The gradient of the whole shard as a dense tensor (zero for unsampled rows); for checks."""
        index, w, _ = self.row_grads()
        dense = torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        if w is None:
            return dense
        if index is None:
            return w.float().clone()
        dense[index] = w.float()
        return dense

    def bytes_per_class(self, optimizer: str = "sgd") -> int:
        """Persistent bytes per class on this rank: weight (+ bias) and the optimiser's row state."""
        elem = self.weight.element_size()
        width = self.weight.shape[1] + (1 if self.bias is not None else 0)
        states = {"sgd": 1, "adamw": 2}[optimizer]
        per_row_step = 4 if optimizer == "adamw" else 0
        return elem * width * (1 + states) + per_row_step

    def extra_repr(self) -> str:
        return (f"classes={self.num_classes}, local=[{self.class_start}, {self.class_start + self.num_local}), "
                f"D={self.embedding_size}, sample_rate={self.sample_rate}, centers={self.num_centers}, "
                f"dtype={self.weight.dtype}, compute={self.compute_dtype}{' (tf32)' if self.tf32 else ''}")
