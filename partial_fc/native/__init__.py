"""The C row kernels (``row_kernels.c``): built on first use with the system's C compiler, else absent.

The classifier's sparse SGD update and its row gather are memory-bound loops over the
sampled rows; written as torch ops they are a dozen passes per block of rows, each with its
own dispatch (bfloat16 conversion, gradient correction, SGD, stochastic rounding).  The C
loops read each row once and write it back once.  The [N, c] passes of the cosines and of
the fused margin softmax (scale and clamp; logits, row maximum and sum of exponentials; the
softmax's backward with the cosine's) are C loops over the logits for the same reason.  They are an accelerator, never a
requirement: without a C compiler (or with ``SHARDFACE_NATIVE=0``) :func:`library` is None
and the callers run their torch ops, which compute the same formulas with the same roundings
(on CPUs with FMA, where ATen's vector kernels fuse the multiply-adds the C loops fuse).

The library is compiled for the host CPU (``-march=native``) into a cache directory,
``$SHARDFACE_NATIVE_CACHE`` or ``~/.cache/shardface/native``, under a name that hashes the
source, the compiler and the CPU's feature flags, so a cluster whose nodes differ (and share
a home directory) gets one build per CPU kind.  Ranks that build at the same time each write
a private file and rename it into place.  ctypes releases the GIL for the call, so blocks on
:mod:`partial_fc.block_threads` threads run in parallel.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

_SOURCE = Path(__file__).with_name("row_kernels.c")
# -ffp-contract=off: the compiler fuses no multiply-add the source does not (see row_kernels.c).
_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"]
# The exp of the softmax pass runs twice as fast in 512-bit vectors where the CPU has them.
_NATIVE_ARCH = ["-march=native"] + (["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else [])
_ARCH_FLAGS: tuple[list[str], ...] = (_NATIVE_ARCH, [])  # the second try: compilers without them
_lock = threading.Lock()
_state: dict = {}

_i64, _i32, _f32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("SHARDFACE_NATIVE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "shardface" / "native"


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str) -> Path:
    """The compiled library's path (built now unless the cache has it); raises if no flags work."""
    source = _SOURCE.read_bytes()
    flags = " ".join(_FLAGS + _NATIVE_ARCH)
    key = hashlib.sha256(source + compiler.encode() + flags.encode() + _cpu_signature().encode()
                         + platform.machine().encode()).hexdigest()[:16]
    target = _cache_dir() / f"row_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for arch in _ARCH_FLAGS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *_FLAGS, *arch, str(_SOURCE), "-o", tmp, "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: a rank never loads a half-written file
                return target
            errors.append(done.stderr.strip()[-400:])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.sf_gather_rows.argtypes = [_i64, _i64, _ptr, _ptr, _i32, _ptr, _ptr]
    lib.sf_gather_rows.restype = None
    sgd_args: list = [_i64, _i64, _ptr, _ptr, _i32, _ptr, _i32, _ptr, _ptr, _ptr]
    lib.sf_sgd_rows.argtypes = sgd_args + [_f32] * 4 + [_i32, _i32] + [_ptr] * 5
    lib.sf_sgd_rows.restype = None
    lib.sf_top_rows.argtypes = [_i64, _ptr, _i64, _ptr, _ptr]
    lib.sf_top_rows.restype = None
    lib.sf_scale_dot_columns.argtypes = [_i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr]
    lib.sf_scale_dot_columns.restype = None
    lib.sf_scale_clamp_rows.argtypes = [_i64, _i64, _ptr, _ptr]
    lib.sf_scale_clamp_rows.restype = None
    lib.sf_margin_sum_rows.argtypes = [_i64, _i64, _ptr, _ptr, _f32, _ptr, _ptr, _ptr, _ptr, _ptr]
    lib.sf_margin_sum_rows.restype = None
    lib.sf_softmax_cosine_grad_columns.argtypes = [_i64, _i64, _i64, _ptr, _ptr, _ptr, _f32, _ptr, _ptr, _ptr,
                                                   _ptr, _i64]
    lib.sf_softmax_cosine_grad_columns.restype = None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded row kernels, or None (disabled, no compiler, or the build failed: one warning)."""
    if os.environ.get("SHARDFACE_NATIVE", "1") == "0":
        return None
    with _lock:
        if "lib" not in _state:
            _state["lib"] = None
            compiler = _compiler()
            if compiler is not None:
                try:
                    _state["lib"] = _load(_build(compiler))
                except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                    warnings.warn(f"the C row kernels did not build ({err}); the classifier update runs as "
                                  "torch ops (same formulas, slower on the CPU)", RuntimeWarning, stacklevel=2)
        return _state["lib"]


def _storage_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dim() == 2 and t.is_contiguous() and t.dtype in (torch.float32, torch.bfloat16)


def _ptr_of(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def can_gather(storage: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether :func:`gather_rows` takes these tensors (the library is loaded; CPU, 2-D, contiguous)."""
    return (_storage_ok(storage) and out.dtype == torch.float32 and out.is_contiguous() and out.dim() == 2
            and out.shape[1] == storage.shape[1] and library() is not None)


def gather_rows(storage: torch.Tensor, index: Optional[torch.Tensor], out: torch.Tensor,
                norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[:] = storage[index]`` as float32 and ``norms[:] = ‖out‖`` per row (see :func:`can_gather`)."""
    lib = library()
    assert lib is not None and can_gather(storage, out)
    idx = None if index is None else _index(index, out.shape[0])
    if index is None and out.shape[0] > storage.shape[0]:
        raise ValueError(f"{out.shape[0]} rows asked of a storage of {storage.shape[0]}")
    if norms is not None:
        assert norms.dtype == torch.float32 and norms.is_contiguous() and norms.numel() == out.shape[0]
    lib.sf_gather_rows(out.shape[0], out.shape[1], _ptr_of(idx), storage.data_ptr(),
                       int(storage.dtype == torch.bfloat16), out.data_ptr(), _ptr_of(norms))
    return out


def _index(index: torch.Tensor, n: int) -> torch.Tensor:
    if index.dtype != torch.int64 or not index.is_contiguous() or index.numel() != n:
        raise ValueError(f"row index must be {n} contiguous int64 values, got {tuple(index.shape)} {index.dtype}")
    return index


def _f32_vector(t: Optional[torch.Tensor], n: int, what: str) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = t.reshape(-1)
    if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != n:
        raise ValueError(f"{what} must be {n} contiguous float32 values, got {tuple(t.shape)} {t.dtype}")
    return t


def sgd_rows(weight: torch.Tensor, momentum: torch.Tensor, index: Optional[torch.Tensor], grad: torch.Tensor,
             *, lr: float, momentum_factor: float, weight_decay: float, nesterov: bool, scale: float = 1.0,
             owed: Optional[torch.Tensor] = None,
             coef: Optional[torch.Tensor] = None, weight_noise: Optional[tuple] = None,
             momentum_noise: Optional[tuple] = None, scratch: Optional[torch.Tensor] = None) -> None:
    """torch.optim.SGD's update of rows ``index`` (None: the first ``len(grad)`` rows) of ``weight``
    and ``momentum`` in place, from the gradient ``(grad - coef·w) · scale``.

    The weight rows are read from ``weight`` (times ``owed``, the decay they still owe);
    ``*_noise``: ``(row [n, 1], col [1, d])`` int32 draws of :func:`partial_fc.rows.rounding_noise`
    for bfloat16 storage rounded stochastically (None: to nearest).
    """
    lib = library()
    assert lib is not None
    n, d = grad.shape
    if not (_storage_ok(weight) and _storage_ok(momentum) and weight.shape == momentum.shape and weight.shape[1] == d):
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} and momentum {tuple(momentum.shape)} "
                         f"{momentum.dtype} must be contiguous 2-D CPU rows of width {d}")
    if grad.dtype != torch.float32 or not grad.is_contiguous():
        raise ValueError(f"grad must be contiguous float32, got {grad.dtype}")
    idx = None if index is None else _index(index, n)
    if idx is None and n > weight.shape[0]:
        raise ValueError(f"{n} gradient rows for a storage of {weight.shape[0]}")
    owed, coef = _f32_vector(owed, n, "owed"), _f32_vector(coef, n, "coef")
    noise = []
    for pair in (weight_noise, momentum_noise):
        if pair is None:
            noise += [None, None]
            continue
        row, col = (t.reshape(-1) for t in pair)
        if row.dtype != torch.int32 or col.dtype != torch.int32 or row.numel() != n or col.numel() != d:
            raise ValueError(f"rounding noise must be int32 of {n} rows and {d} columns")
        noise += [row.contiguous(), col.contiguous()]
    if scratch is None or scratch.numel() < 3 * d or scratch.dtype != torch.float32:
        scratch = torch.empty(3 * d, dtype=torch.float32)
    lib.sf_sgd_rows(n, d, _ptr_of(idx), weight.data_ptr(), int(weight.dtype == torch.bfloat16), momentum.data_ptr(),
                    int(momentum.dtype == torch.bfloat16), _ptr_of(owed), grad.data_ptr(),
                    _ptr_of(coef), scale, lr, momentum_factor, weight_decay, int(momentum_factor != 0),
                    int(nesterov), *(_ptr_of(t) for t in noise), scratch.data_ptr())


def top_rows(scores: torch.Tensor, k: int) -> Optional[torch.Tensor]:
    """The indices of the ``k`` largest of non-negative float32 ``scores`` [n], ascending (of equal
    scores at the boundary the lowest indices), or None where the library cannot take them.

    ``torch.topk(...).indices.sort()`` for the sampler's scores (uniform draws, positives at 2),
    in three linear passes instead of a selection plus a sort; negative scores would misorder.
    """
    n = scores.numel()
    if (scores.device.type != "cpu" or scores.dtype != torch.float32 or scores.dim() != 1
            or not scores.is_contiguous() or not 0 < k < n):
        return None
    lib = library()
    if lib is None:
        return None
    out = torch.empty(k, dtype=torch.int64)
    hist = torch.empty(1 << 16, dtype=torch.int64)
    lib.sf_top_rows(n, scores.data_ptr(), k, out.data_ptr(), hist.data_ptr())
    return out


def _cpu_f32(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def can_scale_dot(g: torch.Tensor, cos: torch.Tensor, inv_norm: torch.Tensor, coef: torch.Tensor) -> bool:
    """Whether :func:`scale_dot_columns` takes these tensors (CPU float32, contiguous, matching shapes)."""
    return (_cpu_f32(g, cos, inv_norm, coef) and g.dim() == 2 and cos.shape == g.shape
            and inv_norm.numel() == coef.numel() == g.shape[1] and library() is not None)


def scale_dot_columns(g: torch.Tensor, cos: torch.Tensor, inv_norm: torch.Tensor, coef: torch.Tensor,
                      columns: slice) -> None:
    """On ``columns`` of [N, c] ``g`` and ``cos``: ``g *= inv_norm`` (per column) in place and
    ``coef += (g · cos).sum(0)``, in one pass (see :func:`can_scale_dot`); the sum runs over the
    rows in order, so a column's result does not depend on how the columns are split."""
    lib = library()
    assert lib is not None and can_scale_dot(g, cos, inv_norm, coef)
    lo, hi = columns.start or 0, min(g.shape[1], columns.stop)
    if hi <= lo:
        return
    step = g.element_size()
    lib.sf_scale_dot_columns(g.shape[0], hi - lo, g.shape[1], g.data_ptr() + lo * step, cos.data_ptr() + lo * step,
                             inv_norm.data_ptr() + lo * step, coef.data_ptr() + lo * step)


def can_run_rows(*tensors: torch.Tensor) -> bool:
    """Whether the [N, c] passes (:func:`scale_clamp_rows`, :func:`margin_sum_rows`,
    :func:`softmax_cosine_grad_columns`) take these float32 tensors: CPU, contiguous, and the
    library loaded."""
    return _cpu_f32(*tensors) and library() is not None


def scale_clamp_rows(cos: torch.Tensor, inv_norm: torch.Tensor, rows: slice) -> None:
    """``cos[rows] = clamp(cos[rows] * inv_norm, -1, 1)`` in place (torch's mul_ then clamp_, bit for bit)."""
    lib = library()
    assert lib is not None and can_run_rows(cos, inv_norm) and cos.dim() == 2 and inv_norm.numel() == cos.shape[1]
    part = cos[rows]
    lib.sf_scale_clamp_rows(part.shape[0], part.shape[1], part.data_ptr(), inv_norm.data_ptr())


def margin_sum_rows(raw: torch.Tensor, inv_norm: torch.Tensor, scale: float, column: torch.Tensor,
                    value: torch.Tensor, row_max: torch.Tensor, sum_exp: torch.Tensor, target_exp: torch.Tensor,
                    rows: slice) -> None:
    """The scaled margin softmax's forward on ``rows`` of the raw products ``raw`` [N, c] (the cosine
    GEMM's output, not yet divided by ‖w‖), reading each row twice while it is in cache and writing
    nothing of [N, c].

    Logits are ``scale · clamp(raw · inv_norm, −1, 1)`` (the roundings of torch's ops), with
    ``value[i]`` at ``column[i]`` where ``column[i] >= 0``; ``row_max`` gets their row maximum,
    ``sum_exp`` the row sum of ``exp(logit − row_max)`` (16 lanes, a fixed order: a row's result
    does not depend on how the rows are split), ``target_exp`` ``exp(value − row_max)`` (0 where
    ``column < 0``).  The exp is within 1 ulp (the polynomial scheme of torch's)."""
    lib = library()
    n, c = raw.shape
    assert lib is not None and can_run_rows(raw, inv_norm, value, row_max, sum_exp, target_exp)
    assert inv_norm.numel() == c
    column = _index(column, n)
    r_, k_, v_, m_, e_, t_ = (t[rows] for t in (raw, column, value, row_max, sum_exp, target_exp))
    if r_.shape[0] == 0:
        return
    lib.sf_margin_sum_rows(r_.shape[0], c, r_.data_ptr(), inv_norm.data_ptr(), float(scale), k_.data_ptr(),
                           v_.data_ptr(), m_.data_ptr(), e_.data_ptr(), t_.data_ptr())


def softmax_cosine_grad_columns(raw: torch.Tensor, inv_norm: torch.Tensor, coef: torch.Tensor, scale: float,
                                row_max: torch.Tensor, row_scale: torch.Tensor, target: torch.Tensor,
                                target_grad: torch.Tensor, columns: slice) -> None:
    """The backward of :func:`margin_sum_rows` and of the cosine, on ``columns`` of ``raw`` [N, c],
    in place: ``raw`` becomes ``g' = ∂L/∂cos / ‖w‖`` and ``coef += (g' · cos).sum(0)``.

    With ``cos = clamp(raw · inv_norm, −1, 1)``, ``g' = exp(scale·cos − row_max) · row_scale ·
    inv_norm`` (the exponentials recomputed as the forward made them), ``target_grad · inv_norm``
    at ``target[i]`` where it is >= 0.  The column sums run over the rows in order, so a column's
    result does not depend on how the columns are split."""
    lib = library()
    n, c = raw.shape
    assert lib is not None and can_run_rows(raw, inv_norm, coef, row_max, row_scale, target_grad)
    assert inv_norm.numel() == coef.numel() == c
    row_max, row_scale = _f32_vector(row_max, n, "row_max"), _f32_vector(row_scale, n, "row_scale")
    target, target_grad = _index(target, n), _f32_vector(target_grad, n, "target_grad")
    lo, hi = columns.start or 0, min(c, columns.stop)
    if hi <= lo:
        return
    step = raw.element_size()
    lib.sf_softmax_cosine_grad_columns(n, hi - lo, c, raw.data_ptr() + lo * step, inv_norm.data_ptr() + lo * step,
                                       coef.data_ptr() + lo * step, float(scale), _ptr_of(row_max),
                                       _ptr_of(row_scale), target.data_ptr(), _ptr_of(target_grad), lo)


__all__ = ["library", "can_gather", "can_run_rows", "can_scale_dot", "gather_rows", "margin_sum_rows",
           "scale_clamp_rows", "scale_dot_columns", "softmax_cosine_grad_columns", "sgd_rows", "top_rows"]
