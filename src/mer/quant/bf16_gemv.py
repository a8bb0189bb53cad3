"""One token through a bfloat16 dense matrix: PyTorch's F.linear, or mer's C GEMV
(`bf16_kernel.c`), whichever measured faster for that shape on this CPU.

Decode multiplies each attention projection and the output head by a single token, a
pass over the weight's bytes; on AVX512_BF16 CPUs PyTorch's bf16 path reads them at about
half the rate of its float32 path. The C GEMV is used only where it built as the
AVX512_BF16 build, matched the float64 reference on a probe, and was measured faster
than F.linear on the shape (at model open, `prepare`, or on the shape's first call),
alternating the two over a few rounds; the choice is kept per process (a few ms per
shape). Float32 weights or activations (exact runs), more than one token, and shapes
whose K is not a multiple of 32 always take F.linear.
"""

from __future__ import annotations

import ctypes
import functools
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from mer.quant import native

SOURCE = Path(__file__).with_name("bf16_kernel.c")
ROUNDS = 5
GRAIN = 4 << 20  # weight bytes per thread at least


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = native.build_avx512(SOURCE, "bf16 GEMV kernel", "bf16_gemv_simd")
    if lib is None:
        return None
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.bf16_gemv.argtypes = [p, p, p, i64, i64, ctypes.c_int]
    lib.bf16_gemv.restype = None
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(67, 96, generator=gen).bfloat16(), torch.randn(96, generator=gen).bfloat16()
    ref = w.double() @ x.double()
    if (_gemv(lib, w, x).double() - ref).abs().max() > 1e-5 * ref.abs().max():
        warnings.warn("bf16 GEMV kernel disagrees with the reference here: not used", stacklevel=3)
        return None
    return lib


def _gemv(lib: ctypes.CDLL, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    y = torch.empty(n)
    threads = max(1, min(torch.get_num_threads(), w.nbytes // GRAIN))
    lib.bf16_gemv(w.data_ptr(), x.data_ptr(), y.data_ptr(), n, k, threads)
    return y


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        x.dtype == torch.bfloat16
        and w.dtype == torch.bfloat16
        and w.dim() == 2
        and x.numel() == w.shape[1]
        and w.shape[1] % 32 == 0
        and w.is_contiguous()
    )


_faster: dict[tuple, bool] = {}


def c_is_faster(w: torch.Tensor) -> bool:
    """Whether the C GEMV beat F.linear on one token through a matrix of w's shape here."""
    key = (*w.shape, torch.get_num_threads())
    if key not in _faster:
        lib = _lib()
        _faster[key] = lib is not None and _measure(lib, w)
    return _faster[key]


def _measure(lib: ctypes.CDLL, w: torch.Tensor) -> bool:
    x = torch.randn(1, w.shape[1], dtype=torch.bfloat16)
    fns = {"c": lambda: _gemv(lib, w, x), "torch": lambda: F.linear(x, w)}
    best = {name: float("inf") for name in fns}
    for _ in range(ROUNDS):  # alternating: a busy machine slows both alike
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best["c"] < best["torch"]


def prepare(weights) -> None:
    """Measure now each bf16 matrix shape among `weights` (a model's dense tensors)."""
    for w in weights:
        if isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and w.dim() == 2:
            if w.shape[1] % 32 == 0 and w.is_contiguous():
                c_is_faster(w)


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x @ w.T for one bf16 token by the C GEMV where it applies and measured faster, else
    None (the caller runs F.linear)."""
    if not applies(x, w) or not c_is_faster(w):
        return None
    return _gemv(_lib(), w, x.reshape(-1).contiguous()).to(torch.bfloat16).view(*x.shape[:-1], -1)
