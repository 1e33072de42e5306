"""Gathers, scatters and bfloat16 rounding of a shard's sampled rows, block by block.

A sparse row update is memory-bound: on a CPU the arithmetic of SGD or AdamW is nothing
next to moving the rows.  Two costs dominate once the rows are moved only once:

- fresh pages: a ``[rows, D]`` float32 tensor above glibc's mmap threshold (32 MiB) is
  mapped anew on each allocation and faulted in page by page, which costs several times
  the copy itself.  :class:`Workspace` keeps such buffers between steps;
- passes over memory: every elementwise op on a ``[rows, D]`` tensor reads and writes it
  from DRAM.  The optimiser works on blocks of rows small enough to stay in cache
  (:func:`blocks`), so gather → update → round → scatter reads each row from DRAM once;
  with several threads the blocks are shared out to threads that run on one core each
  (:mod:`partial_fc.block_threads`), not split op by op.  Where the C row kernels are
  built (:mod:`partial_fc.native`), a conversion or a norm is one C loop per row instead.

bfloat16 stochastic rounding adds uniform 16-bit noise below the kept bits and truncates.
Drawing one random number per element from the generator costs more than the rest of
the update; :func:`rounding_noise` instead draws one number per row and one per column and
combines them as ``row_i XOR col_j``.  Each element's noise is uniform on [0, 2^16), so
each element rounds up with exactly the probability of its dropped fraction (unbiased),
and any three elements' noises are independent (the XOR map has rank 3 over GF(2)); only
the four corners of a rectangle of rows × columns are tied (their XOR is zero).  Pairwise
independence is what the variance of a sum of rounding errors depends on, so a dot
product of rounded rows has the same rounding variance as with independent noise.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from . import native

# Elements per block at one thread: 512k float32 = 2 MiB per tensor, so a block of weight,
# state, gradient and noise fits in this machine class's L2 + L3; larger blocks gain nothing
# and smaller ones pay Python dispatch per op.
BLOCK_ELEMENTS = 1 << 19
# Elements per block when ops run on several threads (the [N, c] passes of the cosine and
# the softmax; the row updates use one-core blocks instead): every parallel op ends at an OpenMP
# barrier, which costs a scheduler time slice (milliseconds) whenever one of its threads is
# descheduled (a machine with more runnable processes than cores).  Hundreds of cache-sized
# ops then cost far more than the extra DRAM passes of a few large ones; 16M float32 =
# 64 MiB per tensor: 32k rows of D = 512 per block.
PARALLEL_BLOCK_ELEMENTS = 1 << 24


def elements_per_block() -> int:
    """Elements per block for the current torch thread count (see the two constants above)."""
    return BLOCK_ELEMENTS if torch.get_num_threads() <= 1 else max(BLOCK_ELEMENTS, PARALLEL_BLOCK_ELEMENTS)


def core_block_elements() -> int:
    """Elements per block of a loop whose ops run on one core each (:mod:`partial_fc.block_threads`)."""
    return BLOCK_ELEMENTS


def blocks(num_rows: int, width: int, block_elements: Optional[int] = None) -> Iterator[slice]:
    """Slices of ``range(num_rows)`` of about ``block_elements`` elements each (whole rows);
    None: :func:`elements_per_block`."""
    per = max(1, (block_elements or elements_per_block()) // max(1, width))
    for lo in range(0, num_rows, per):
        yield slice(lo, min(num_rows, lo + per))


class Workspace:
    """Named scratch tensors reused across steps (reallocated when a larger one is needed)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of ``shape`` (contents undefined) backed by the buffer ``name``."""
        count = 1
        for s in shape:
            count *= s
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < count or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(count, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:count].view(shape)

    def clear(self) -> None:
        """Free every buffer."""
        self._buffers.clear()


def as_words(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` viewed as int32 words when they are 2-byte values (bfloat16) in contiguous rows
    of even width; ``rows`` itself otherwise.

    Moving rows is bit copying: CPU index kernels copy 4-byte elements markedly faster than
    bfloat16 ones (about 1.6x for ``index_select`` on this machine class), and an integer
    view keeps every bit pattern.
    """
    if (rows.element_size() == 2 and rows.dim() >= 2 and rows.is_contiguous()
            and rows.shape[-1] % 2 == 0):
        return rows.view(torch.int32)
    return rows


def copy_rows_(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``target[index] = rows`` (same dtype), as word copies where :func:`as_words` allows."""
    words, src = as_words(target), as_words(rows)
    if words.dtype != src.dtype:
        words, src = target, rows
    words.index_copy_(0, index, src)
    return target


def gather_rows(source: torch.Tensor, index: Optional[torch.Tensor], out: torch.Tensor,
                scratch: Optional[Workspace] = None, block_elements: Optional[int] = None,
                norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[:] = source[index]`` (all rows when ``index`` is None), converted to ``out``'s dtype.

    Rows of another dtype (bfloat16 storage) go through a cache-sized block, so the
    conversion costs no extra pass over memory.  ``norms`` [rows] (float32, ``out`` 2-D):
    also receives each gathered row's L2 norm, computed while its block is in cache.
    A conversion or norms on the CPU run in one C loop per row where :mod:`partial_fc.native`
    is built (a plain copy stays torch's, parallel over its threads).
    """
    if ((source.dtype != out.dtype or norms is not None) and (index is None or index.dtype == torch.int64)
            and native.can_gather(source, out)):
        return native.gather_rows(source, None if index is None else index.contiguous(), out, norms)
    if source.dtype == out.dtype and norms is None:
        if index is None:
            out.copy_(source)
        else:
            torch.index_select(source, 0, index, out=out)
        return out
    width = out[0].numel() if out.dim() > 1 else 1
    for sl in blocks(out.shape[0], width, block_elements):
        if index is None:
            out[sl].copy_(source[sl])
        elif source.dtype == out.dtype:
            torch.index_select(source, 0, index[sl], out=out[sl])
        else:
            part = index[sl]
            shape = (part.numel(),) + tuple(source.shape[1:])
            tmp = (scratch.get("gather", shape, source.dtype, source.device) if scratch is not None
                   else torch.empty(shape, dtype=source.dtype, device=source.device))
            words, tmp_words = as_words(source), as_words(tmp)
            if words.dtype != tmp_words.dtype:
                words, tmp_words = source, tmp
            torch.index_select(words, 0, part, out=tmp_words)
            out[sl].copy_(tmp)
        if norms is not None:
            torch.linalg.vector_norm(out[sl], dim=1, out=norms[sl])
    return out


def rounding_noise(num_rows: int, width: int, gen: torch.Generator,
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column draws (int32, uniform on [0, 2^16)) whose XOR is one noise per element."""
    row = torch.randint(0, 1 << 16, (num_rows, 1), generator=gen, device=device, dtype=torch.int32)
    col = torch.randint(0, 1 << 16, (1, width), generator=gen, device=device, dtype=torch.int32)
    return row, col


def round_to_bf16_(x: torch.Tensor, row: torch.Tensor, col: torch.Tensor, out: torch.Tensor,
                   noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Stochastically round float32 ``x`` [n, w] into bfloat16 ``out``; ``x`` is overwritten.

    ``row`` [n, 1] and ``col`` [1, w] come from :func:`rounding_noise`; ``noise`` is an
    optional int32 [n, w] scratch.  Adding uniform noise below the kept 16 bits and
    truncating rounds up with exactly the probability of the dropped fraction.
    """
    noise = torch.bitwise_xor(row, col, out=noise)
    bits = x.view(torch.int32)
    bits.add_(noise)
    if out.is_contiguous() and noise.is_contiguous() and noise.shape == bits.shape:
        # Truncation keeps the upper 16 bits: shift them down (into the noise, no longer
        # needed) and narrow to int16, which keeps the low 16 bits of each word.  Two
        # vectorised passes; a strided copy of the upper halves is a scalar loop, twice slower.
        high = torch.bitwise_right_shift(bits, 16, out=noise)
        out.view(torch.int16).copy_(high)
        return out
    bits.bitwise_and_(-65536)  # the upper 16 bits are now the bf16 value, exactly
    return out.copy_(x)


__all__ = ["BLOCK_ELEMENTS", "PARALLEL_BLOCK_ELEMENTS", "core_block_elements", "elements_per_block", "Workspace",
           "as_words", "blocks", "copy_rows_", "gather_rows", "rounding_noise", "round_to_bf16_"]
