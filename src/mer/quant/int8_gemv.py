"""One token through an int8 dense matrix: PyTorch's `_weight_int8pack_mm`, or mer's C GEMV
(`int8_kernel.c`, int8 activations with VNNI dot products), whichever measured faster for
that shape on this CPU.

The C GEMV rounds the token per group of 64 to int8 (each value off by up to 1/254 of its
group's largest, as llama.cpp's Q8 activations and mer's c-int8 int4 path), so it is a
candidate only for bfloat16 activations: float32 runs (exact) keep PyTorch's kernel. It is
used only where it built as the AVX512_VNNI build, matched the float64 reference on
activations rounded as it rounds them on a probe, and was measured faster than PyTorch's
kernel on the shape (at model open, `prepare`, or on the shape's first call), the two
alternating over a few rounds; the choice is kept per process. More than one token, and
shapes whose K is not a multiple of 64, always take PyTorch's kernel.
"""

from __future__ import annotations

import ctypes
import functools
import time
import warnings
from pathlib import Path

import torch

from mer.quant import native

SOURCE = Path(__file__).with_name("int8_kernel.c")
GROUP = 64  # activations rounded per group of this many
ROUNDS = 5
GRAIN = 4 << 20  # weight bytes per thread at least


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = native.build_avx512(SOURCE, "int8 GEMV kernel", "int8_gemv_simd")
    if lib is None:
        return None
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.int8_gemv.argtypes = [p, p, p, p, i64, i64, ctypes.c_int]
    lib.int8_gemv.restype = None
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(-127, 128, (67, 192), generator=gen, dtype=torch.int8)
    scales = torch.rand(67, generator=gen) + 0.5
    x = torch.randn(192, generator=gen)
    ref = (data.double() * scales.double()[:, None]) @ round_int8(x.double())
    if (_gemv(lib, data, scales, x).double() - ref).abs().max() > 1e-5 * ref.abs().max():
        warnings.warn("int8 GEMV kernel disagrees with the reference here: not used", stacklevel=3)
        return None
    return lib


def available() -> bool:
    return _lib() is not None


def round_int8(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] rounded as the kernel rounds it: per group of 64, to int8 steps of
    max|x| / 127 (ties to even, as the C library's rint)."""
    xg = x.reshape(*x.shape[:-1], -1, GROUP)
    step = xg.abs().amax(-1, keepdim=True) / 127
    return (torch.round(xg / torch.where(step > 0, step, 1)) * step).reshape(x.shape)


def _gemv(lib: ctypes.CDLL, data: torch.Tensor, scales: torch.Tensor, x: torch.Tensor):
    n, k = data.shape
    x32 = x.reshape(-1).float().contiguous()
    y = torch.empty(n)
    threads = max(1, min(torch.get_num_threads(), data.nbytes // GRAIN))
    lib.int8_gemv(data.data_ptr(), scales.data_ptr(), x32.data_ptr(), y.data_ptr(), n, k, threads)
    return y


def applies(x: torch.Tensor, data: torch.Tensor) -> bool:
    return (
        x.dtype == torch.bfloat16
        and x.numel() == data.shape[1]
        and data.shape[1] % GROUP == 0
        and data.is_contiguous()
    )


_faster: dict[tuple, bool] = {}


def c_is_faster(data: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether the C GEMV beat PyTorch's int8 kernel on one token through data's shape here."""
    key = (*data.shape, torch.get_num_threads())
    if key not in _faster:
        lib = _lib()
        _faster[key] = lib is not None and _measure(lib, data, scales)
    return _faster[key]


def torch_int8(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """PyTorch's int8 weight-only kernel: x [T, K] @ (data * scales[:, None]).T."""
    return torch.ops.aten._weight_int8pack_mm(x, data, scales.to(x.dtype))


def _measure(lib: ctypes.CDLL, data: torch.Tensor, scales: torch.Tensor) -> bool:
    x = torch.randn(1, data.shape[1], dtype=torch.bfloat16)
    fns = {"c": lambda: _gemv(lib, data, scales, x), "torch": lambda: torch_int8(x, data, scales)}
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(ROUNDS):  # alternating: a busy machine slows both alike
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best["c"] < best["torch"]


def rounded_like_gemv(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [T, K] for PyTorch's kernel: rounded as the C GEMV rounds a token where the GEMV is
    this shape's one-token path (bf16, K a multiple of GROUP, measured faster), else as it
    is. A token's output then differs alone (GEMV) and batched (PyTorch) by float rounding,
    not by the int8 rounding of its activations: a request must sample the same text alone
    and batched."""
    if x.dtype != torch.bfloat16 or data.shape[1] % GROUP or not c_is_faster(data, scales):
        return x
    return round_int8(x.float()).to(x.dtype)


def gemv(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x @ (data * scales).T for one bf16 token by the C GEMV where it applies and measured
    faster, else None (the caller runs PyTorch's kernel)."""
    if not applies(x, data) or not c_is_faster(data, scales):
        return None
    return _gemv(_lib(), data, scales, x).to(torch.bfloat16).view(*x.shape[:-1], -1)
