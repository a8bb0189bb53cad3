"""The int4 expert FFN's paths, and the one each shape class takes here, chosen by measurement.

An int4 expert's SwiGLU FFN can run seven ways on the same bytes:

- "tinygemm": PyTorch's `_weight_int4pack_mm_for_cpu` per linear, SiLU in torch (the path
  every CPU build of PyTorch has);
- "c-fused": `int4_kernel.c`'s whole FFN in one call (gate and up rows of a block in one
  pass, SiLU, down), float32 accumulation, AVX-512 only;
- "c-bf16": the same on bfloat16 activations with AVX512_BF16 dot products (x, and the
  SiLU product, rounded to bfloat16 as a bf16 model rounds them);
- "c-int8": the same with AVX512_VNNI int8 dot products, x and the SiLU product rounded
  per group to int8 with a float scale (as llama.cpp's Q4_0 x Q8_0), 4 k-steps a
  instruction;
- "c-avx2": the float32 fused FFN built for AVX2 + FMA without AVX-512, one token at a
  time, on either "halves" layout: the native kernel of CPUs without AVX-512;
- "dequant-bf16" / "dequant-f32": a chunk of rows dequantized by the C kernel into a small
  buffer that stays in cache, then a bf16 or float32 GEMM by PyTorch (oneDNN, AMX where
  the CPU has it), so a weight serves every token of a prefill.

Which is fastest depends on the CPU and on the token count, so nothing is chosen from CPU
flags: the first time an expert of a shape runs, each eligible path runs that expert at a
token count standing for its class (decode: 1 token; small batches: 2-31; prefill: 32 and
more), alternating paths over several rounds. The shape then takes one path for every
class, the least slow over all three relative to each class's fastest: paths round
differently, and a token's output must not depend on how many tokens its experts saw in
the pass (`_pick`). Float32 activations (a model run in float32 to be exact) get their
own choice among the paths that do not round them to bfloat16. The choice is kept in
memory and in a JSON file under the kernel cache directory whose name hashes this
CPU, the PyTorch version, the kernel source, the shape and the thread count, so later
processes on this machine reuse it. `MER_INT4_PATH` forces one path everywhere (for
benchmarks and tests). A C kernel is used only where it built (the native build for the
AVX-512 paths, a -mno-avx512f build for c-avx2) and matched the reference on a probe;
every path is tested against the reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mer.progress import progress_bar
from mer.quant import int4, native
from mer.quant.expert import ExpertFormat, ExpertWeights

SOURCE = Path(__file__).with_name("int4_kernel.c")
SYMMETRIC = ("-DINT4_SYMMETRIC",)  # the build for symmetric weights: float16 scales, no zero
PATHS = ("tinygemm", "c-fused", "c-bf16", "c-int8", "c-avx2", "dequant-bf16", "dequant-f32")
# Shape classes and the token count each is measured at.
CLASSES = {"decode": 1, "small": 8, "prefill": 64}
ROUNDS = 4
ROUND_S = 0.02  # seconds of calls per candidate and round, at least
PRUNE = 3.0  # a candidate this many times behind the best after one round is timed no more
GRAIN = 1 << 20  # weight bytes per C thread at least
CHUNK = 512  # rows dequantized at a time: a few MiB, so the GEMM reads them from cache


def shape_class(tokens: int) -> str:
    return "decode" if tokens <= 1 else "small" if tokens < 32 else "prefill"


def _lib(symmetric: bool = False) -> ctypes.CDLL | None:
    """The C kernels where they build here as the AVX-512 path and pass their probe; with
    `symmetric`, their build for float16 scales alone (`int4.Int4Linear.symmetric`)."""
    return _built(bool(symmetric))  # one library object per build, however it is asked for


def stream_non_temporal(on: bool) -> None:
    """Whether the C kernels prefetch the weights a decode step reads once non-temporally
    (NTA) or into every cache level (T0): which is faster depends on the machine
    (`mer.quant.stream_hint` measures it). Holds for the libraries built now and later."""
    global _stream_nta
    _stream_nta = bool(on)
    for lib in _loaded:
        lib.int4_stream_nta(int(_stream_nta))


def streams_non_temporal() -> bool:
    return _stream_nta


_stream_nta = True
_loaded: list[ctypes.CDLL] = []


@functools.cache
def _built(symmetric: bool) -> ctypes.CDLL | None:
    flags = SYMMETRIC if symmetric else ()
    lib = native.build_avx512(SOURCE, "int4 C kernel (PyTorch paths only)", "int4_simd", flags)
    if lib is None:
        return None
    lib.int4_stream_nta.argtypes = [ctypes.c_int]
    lib.int4_stream_nta.restype = None
    lib.int4_stream_nta(int(_stream_nta))
    _loaded.append(lib)
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.int4_ffn.argtypes = [p] * 10 + [i64] * 5 + [ctypes.c_int]
    lib.int4_ffn_group.argtypes = [i64] + [p] * 10 + [i64] * 4 + [ctypes.c_int]
    lib.int4_linear.argtypes = [p] * 5 + [i64] * 4 + [ctypes.c_int]
    lib.int4_dequant.argtypes = [p, p, p, ctypes.c_int] + [i64] * 5 + [ctypes.c_int]
    for fn in (lib.int4_ffn, lib.int4_ffn_group, lib.int4_linear, lib.int4_dequant):
        fn.restype = None
    if not _probe(lib):
        warnings.warn("int4 C kernel disagrees with the reference here: not used", stacklevel=3)
        return None
    if hasattr(lib, "int4_ffn_bf16"):  # built only where the compiler targets AVX512_BF16
        lib.int4_ffn_bf16.argtypes = [p] * 10 + [i64] * 5 + [ctypes.c_int]
        lib.int4_ffn_bf16_group.argtypes = [i64] + [p] * 10 + [i64] * 4 + [ctypes.c_int]
        lib.int4_ffn_bf16.restype = lib.int4_ffn_bf16_group.restype = None
    if hasattr(lib, "int4_ffn_i8"):  # built only where the compiler targets AVX512_VNNI
        lib.int4_ffn_i8.argtypes = [p] * 14 + [i64] * 5 + [ctypes.c_int]
        lib.int4_linear_i8.argtypes = [p] * 7 + [i64] * 4 + [ctypes.c_int]
        lib.int4_ffn_i8_group.argtypes = [i64] + [p] * 14 + [i64] * 4 + [ctypes.c_int]
        lib.int4_linear_i8_bf16.argtypes = [p] * 9 + [i64] * 4 + [ctypes.c_int]
        lib.int4_ffn_i8.restype = lib.int4_linear_i8.restype = None
        lib.int4_linear_i8_bf16.restype = None
        lib.int4_ffn_i8_group.restype = None
    f32 = ctypes.POINTER(ctypes.c_float)
    lib.moe_sum_bf16.argtypes = lib.moe_sum_f32.argtypes = [p, f32, p, i64, i64]
    lib.moe_sum_bf16.restype = lib.moe_sum_f32.restype = None
    return lib


def _lib_avx2(symmetric: bool = False) -> ctypes.CDLL | None:
    """The same source built for AVX2 + FMA without AVX-512 (what a CPU without AVX-512
    builds natively), where it builds and passes its probe on both "halves" layouts."""
    return _built_avx2(bool(symmetric))


@functools.cache
def _built_avx2(symmetric: bool) -> ctypes.CDLL | None:
    flags = ("-mno-avx512f", "-mavx2", "-mfma", *(SYMMETRIC if symmetric else ()))
    try:
        lib = native.build(SOURCE, flags)
    except native.BuildError as e:
        warnings.warn(f"int4 AVX2 kernel unavailable ({e})", stacklevel=3)
        return None
    if lib.int4_simd() != 256 or not hasattr(lib, "int4_ffn_avx2"):
        return None
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.int4_ffn_avx2.argtypes = [p] * 10 + [i64] * 6 + [ctypes.c_int]
    lib.int4_linear_avx2.argtypes = [p] * 5 + [i64] * 5 + [ctypes.c_int]
    lib.int4_ffn_avx2.restype = lib.int4_linear_avx2.restype = None
    if not all(_probe_avx2(lib, layout) for layout in ("tinygemm-avx512", "tinygemm-avx2")):
        warnings.warn("int4 AVX2 kernel disagrees with the reference here: not used", stacklevel=3)
        return None
    return lib


def avx2_available(symmetric: bool = False) -> bool:
    return _lib_avx2(symmetric) is not None


def block_rows(layout: str) -> int | None:
    """Rows per block of a layout the AVX2 kernels read ("halves" layouts), else None."""
    block, mode = int4.LAYOUTS[layout]
    return block if mode == "halves" else None


def bf16_available(symmetric: bool = False) -> bool:
    """The AVX512_BF16 fused FFN built and matches the reference on a probe."""
    return _probe_once(_lib(symmetric), "int4_ffn_bf16")


def int8_available(symmetric: bool = False) -> bool:
    """The AVX512_VNNI fused FFN (int8 activations) built and matches the reference."""
    return _probe_once(_lib(symmetric), "int4_ffn_i8")


@functools.cache
def _probe_once(lib: ctypes.CDLL | None, fn: str) -> bool:
    """Whether `lib` has `fn` (built only where the compiler targets its instructions) and
    it passes its probe; asked of each library once."""
    probe = {"int4_ffn_bf16": _probe_bf16, "int4_ffn_i8": _probe_i8}[fn]
    return lib is not None and hasattr(lib, fn) and probe(lib)


def native_available(symmetric: bool = False) -> bool:
    return _lib(symmetric) is not None


def c_linear(lin: int4.Int4Linear, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """y = x @ W.T by the C kernel (float32 out), on `threads` (default: by its size). The
    caller checks `eligible`."""
    return _linear_raw(_lib(lin.symmetric), lin, x, threads or threads_for(lin.packed.nbytes))


def c_linear_i8(lin: int4.Int4Linear, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """y = x @ W.T by the C kernel on x rounded per group to int8, on `threads` (default: by
    its size): float32 out, or for bfloat16 x bfloat16 out, rounded in the kernel as
    `.to(torch.bfloat16)` rounds (a decode step's dense matrices, a dozen calls a token,
    then need no conversion around the call)."""
    t, g = len(x), lin.group_size
    xf, xq, sx, xs, y = _i8_scratch(t, lin.k, g, lin.n, x.dtype == torch.bfloat16)
    threads = threads or threads_for(lin.packed.nbytes)
    lib = _lib(lin.symmetric)
    if x.dtype == torch.bfloat16:
        xb = x.contiguous()
        out = torch.empty(t, lin.n, dtype=torch.bfloat16)
        lib.int4_linear_i8_bf16(lin.packed.data_ptr(), lin.scales.data_ptr(), xb.data_ptr(),
                                xf.data_ptr(), xq.data_ptr(), sx.data_ptr(), xs.data_ptr(),
                                y.data_ptr(), out.data_ptr(), t, lin.n, lin.k, g,
                                threads)  # fmt: skip
        return out
    x32 = x.float().contiguous()
    y = torch.empty(t, lin.n)  # returned: never the kept scratch
    lib.int4_linear_i8(lin.packed.data_ptr(), lin.scales.data_ptr(), x32.data_ptr(),
                       xq.data_ptr(), sx.data_ptr(), xs.data_ptr(), y.data_ptr(), t, lin.n,
                       lin.k, g, threads)  # fmt: skip
    return y


def _i8_scratch(t: int, k: int, g: int, n: int, bf16: bool) -> tuple[torch.Tensor | None, ...]:
    """c_linear_i8's scratch: x widened to float32 (for bfloat16 x), x rounded to int8 with
    its group scales and sums, and the float32 result [t, n] (for bfloat16 x, which is given
    its rounded copy). For one token (a decode step's dense matrices, a dozen calls a token)
    kept per thread and reused, since each allocation costs more than it should on caches
    the weights have just swept."""
    if t != 1:
        wide = (torch.empty(t, k), torch.empty(t, n)) if bf16 else (None, None)
        return (wide[0], torch.empty(t, k, dtype=torch.int8), torch.empty(t * k // g),
                torch.empty(t * k // g), wide[1])  # fmt: skip
    cache = getattr(_scratches, "i8", None)
    if cache is None:
        cache = _scratches.i8 = {}
    key = (k, g, n)
    if key not in cache:
        cache[key] = (torch.empty(1, k), torch.empty(1, k, dtype=torch.int8),
                      torch.empty(k // g), torch.empty(k // g), torch.empty(1, n))  # fmt: skip
    return cache[key]


def dequantize_rows(lin: int4.Int4Linear, n0: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows n0..n0+rows of W, transposed ([k, rows]), by the C kernel, in float32 or bf16."""
    return _dequant_raw(_lib(lin.symmetric), lin, n0, rows, dtype, threads_for(rows * lin.k // 2))


def _probe_expert(seed: int, g: int, layout: str, lib: ctypes.CDLL):
    """A random expert (hidden 128, ffn 192, group g) packed in `layout`, symmetric where
    `lib` is the symmetric build, for its self-check: its two Int4Linears, their
    dequantized float64 weights, and the generator to draw activations from."""
    gen = torch.Generator().manual_seed(seed)
    h, f, sym = 128, 192, bool(lib.int4_symmetric())
    w1, w3 = torch.randn(f, h, generator=gen), torch.randn(f, h, generator=gen)
    gu = int4.Int4Linear(*_encode(torch.cat([w1, w3]), g, layout, sym), g, 2 * f, h)
    down = int4.Int4Linear(*_encode(torch.randn(h, f, generator=gen), g, layout, sym), g, h, f)
    return gu, down, gu.dequantize(layout).double(), down.dequantize(layout).double(), gen


def _probe(lib: ctypes.CDLL) -> bool:
    """The fused FFN, the linear and both dequantizations on 1, 3, 4 and 9 tokens of a small
    expert with two groups per row, against the float64 reference."""
    h, f = 128, 192
    gu, down, wgu, wd, gen = _probe_expert(0, 64, "tinygemm-avx512", lib)
    ok = True
    for t in (1, 3, 4, 9):
        x = torch.randn(t, h, generator=gen)
        a = x.double() @ wgu.t()
        ref = (F.silu(a[:, :f]) * a[:, f:]) @ wd.double().t()
        ok &= _close(_c_ffn_raw(lib, gu, down, f, x), ref)
        ok &= _close(_linear_raw(lib, gu, x), a)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        got = _dequant_raw(lib, gu, 64, 128, dtype).double().t()
        ok &= _close(got, wgu[64:192], tol)
    return bool(ok)


def _probe_bf16(lib: ctypes.CDLL) -> bool:
    h, f = 128, 192
    gu, down, wgu, wd, gen = _probe_expert(1, 32, "tinygemm-avx512", lib)
    ok = True
    for t in (1, 3, 4, 9):
        x = torch.randn(t, h, generator=gen).bfloat16()
        a = x.double() @ wgu.t()
        hb = (F.silu(a[:, :f]) * a[:, f:]).bfloat16().double()  # h rounded as the kernel does
        # bf16 rounding of h can flip where two paths round differently: compare loosely.
        ok &= _close(_c_ffn_bf16_raw(lib, gu, down, f, x), hb @ wd.double().t(), 1e-2)
    return bool(ok)


def _probe_avx2(lib: ctypes.CDLL, layout: str) -> bool:
    h, f = 128, 192
    gu, down, wgu, wd, gen = _probe_expert(3, 64, layout, lib)
    ok = True
    for t in (1, 3):
        x = torch.randn(t, h, generator=gen)
        a = x.double() @ wgu.t()
        ref = (F.silu(a[:, :f]) * a[:, f:]) @ wd.t()
        ok &= _close(_c_ffn_avx2_raw(lib, gu, down, f, x, block_rows(layout)), ref)
    return bool(ok)


def _probe_i8(lib: ctypes.CDLL) -> bool:
    """Against the float64 reference run on activations rounded as the kernel rounds them
    (`round_int8`), so a wrong sum shows however small the rounding."""
    h, f, g = 128, 192, 32
    gu, down, wgu, wd, gen = _probe_expert(2, g, "tinygemm-avx512", lib)
    ok = True
    for t in (1, 3, 4, 9):
        x = torch.randn(t, h, generator=gen)
        a = round_int8(x.double(), g) @ wgu.t()
        ref = round_int8(F.silu(a[:, :f]) * a[:, f:], g) @ wd.double().t()
        ok &= _close(_c_ffn_i8_raw(lib, gu, down, f, x), ref, 1e-4)
    return bool(ok)


def round_int8(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [T, K] rounded as c-int8 rounds activations: per group, to int8 steps of max|x|/127."""
    t, k = x.shape
    xg = x.reshape(t, k // group, group)
    step = xg.abs().amax(-1, keepdim=True) / 127
    return (torch.round(xg / torch.where(step > 0, step, 1)) * step).reshape(t, k)


def _encode(w: torch.Tensor, g: int, layout: str, symmetric: bool = False):
    """W -> (packed in `layout`, scales): the parts of an Int4Linear."""
    if symmetric:
        q, s = int4.quantize_symmetric(w, g)
        return int4.pack(q, layout), int4.pack_scales(s)
    q, s, z = int4.quantize(w, g)
    return int4.pack(q, layout), int4.pack_scales_zeros(s, z)


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((got.double() - ref).abs().max() <= tol * ref.abs().max().clamp_min(1e-30))


def _linear_raw(lib, lin: int4.Int4Linear, x: torch.Tensor, threads: int = 2) -> torch.Tensor:
    x32 = x.float().contiguous()
    y = torch.empty(len(x32), lin.n)
    xs = torch.empty(len(x32) * lin.k // lin.group_size)
    lib.int4_linear(lin.packed.data_ptr(), lin.scales.data_ptr(), x32.data_ptr(),
                    xs.data_ptr(), y.data_ptr(), len(x32), lin.n, lin.k, lin.group_size,
                    threads)  # fmt: skip
    return y


def _dequant_raw(lib, lin: int4.Int4Linear, n0: int, rows: int, dtype: torch.dtype,
                 threads: int = 2) -> torch.Tensor:  # fmt: skip
    out = torch.empty(lin.k, rows, dtype=dtype)
    lib.int4_dequant(lin.packed.data_ptr(), lin.scales.data_ptr(), out.data_ptr(),
                     int(dtype == torch.bfloat16), n0, rows, lin.n, lin.k, lin.group_size,
                     threads)  # fmt: skip
    return out


def _c_ffn_raw(lib, gu: int4.Int4Linear, down: int4.Int4Linear, ffn: int, x: torch.Tensor,
               threads: int = 2) -> torch.Tensor:  # fmt: skip
    x32 = x.float().contiguous()
    t, hidden = x32.shape
    h = torch.empty(t, ffn)
    scratch = torch.empty(threads * t * 128)
    xs = torch.empty(t * hidden // gu.group_size)
    hs = torch.empty(threads * t * ffn // down.group_size)
    y = torch.empty(t, hidden)
    lib.int4_ffn(gu.packed.data_ptr(), gu.scales.data_ptr(), down.packed.data_ptr(),
                 down.scales.data_ptr(), x32.data_ptr(), h.data_ptr(), scratch.data_ptr(),
                 xs.data_ptr(), hs.data_ptr(), y.data_ptr(), t, hidden, ffn, gu.group_size,
                 down.group_size, threads)  # fmt: skip
    return y


def _c_ffn_bf16_raw(lib, gu: int4.Int4Linear, down: int4.Int4Linear, ffn: int, x: torch.Tensor,
                    threads: int = 2) -> torch.Tensor:  # fmt: skip
    xb = x.to(torch.bfloat16).contiguous()
    t, hidden = xb.shape
    h = torch.empty(t, ffn, dtype=torch.bfloat16)
    scratch = torch.empty(threads * t * 128)
    xs = torch.empty(t * hidden // gu.group_size)
    hs = torch.empty(threads * t * ffn // down.group_size)
    y = torch.empty(t, hidden)
    lib.int4_ffn_bf16(gu.packed.data_ptr(), gu.scales.data_ptr(), down.packed.data_ptr(),
                      down.scales.data_ptr(), xb.data_ptr(), h.data_ptr(),
                      scratch.data_ptr(), xs.data_ptr(), hs.data_ptr(), y.data_ptr(), t, hidden,
                      ffn, gu.group_size, down.group_size, threads)  # fmt: skip
    return y


def _c_ffn_avx2_raw(lib, gu: int4.Int4Linear, down: int4.Int4Linear, ffn: int, x: torch.Tensor,
                    block: int, threads: int = 2) -> torch.Tensor:  # fmt: skip
    x32 = x.float().contiguous()
    t, hidden = x32.shape
    h, scratch = torch.empty(t, ffn), torch.empty(threads * t * 2 * block)
    xs = torch.empty(t * hidden // gu.group_size)
    hs = torch.empty(threads * t * ffn // down.group_size)
    y = torch.empty(t, hidden)
    lib.int4_ffn_avx2(gu.packed.data_ptr(), gu.scales.data_ptr(), down.packed.data_ptr(),
                      down.scales.data_ptr(), x32.data_ptr(), h.data_ptr(),
                      scratch.data_ptr(), xs.data_ptr(), hs.data_ptr(), y.data_ptr(), t, hidden,
                      ffn, gu.group_size, down.group_size, block, threads)  # fmt: skip
    return y


def _c_ffn_i8_raw(lib, gu: int4.Int4Linear, down: int4.Int4Linear, ffn: int, x: torch.Tensor,
                  threads: int = 2) -> torch.Tensor:  # fmt: skip
    x32 = x.float().contiguous()
    t, hidden = x32.shape
    xq, hq = torch.empty(t, hidden, dtype=torch.int8), torch.empty(t, ffn, dtype=torch.int8)
    sx, xs = torch.empty(t * hidden // gu.group_size), torch.empty(t * hidden // gu.group_size)
    hsx, hs = torch.empty(t * ffn // down.group_size), torch.empty(t * ffn // down.group_size)
    h, scratch, y = torch.empty(t, ffn), torch.empty(threads * t * 128), torch.empty(t, hidden)
    lib.int4_ffn_i8(gu.packed.data_ptr(), gu.scales.data_ptr(), down.packed.data_ptr(),
                    down.scales.data_ptr(), x32.data_ptr(), xq.data_ptr(), sx.data_ptr(),
                    xs.data_ptr(), h.data_ptr(), hq.data_ptr(), hsx.data_ptr(), hs.data_ptr(),
                    scratch.data_ptr(), y.data_ptr(), t, hidden, ffn, gu.group_size,
                    down.group_size, threads)  # fmt: skip
    return y


# --- the paths, as functions of (expert, x) -----------------------------------------------


def _tinygemm(e: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    return ExpertWeights.__call__(e, x)


def threads_for(nbytes: int) -> int:
    """Threads for a C call over `nbytes` of weights: one per GRAIN at most, since waking
    and joining a thread costs more than a small expert's work (and far more on a busy
    machine, where a barrier waits for a descheduled thread)."""
    return max(1, min(torch.get_num_threads(), nbytes // GRAIN))


def _c_fused(e: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    nbytes = e.gate_up.packed.nbytes + e.down.packed.nbytes
    lib = _lib(e.down.symmetric)
    return _c_ffn_raw(lib, e.gate_up, e.down, e.ffn, x, threads_for(nbytes)).to(x.dtype)


def _c_bf16(e: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    nbytes = e.gate_up.packed.nbytes + e.down.packed.nbytes
    lib = _lib(e.down.symmetric)
    return _c_ffn_bf16_raw(lib, e.gate_up, e.down, e.ffn, x, threads_for(nbytes)).to(x.dtype)


def _c_int8(e: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    nbytes = e.gate_up.packed.nbytes + e.down.packed.nbytes
    lib = _lib(e.down.symmetric)
    return _c_ffn_i8_raw(lib, e.gate_up, e.down, e.ffn, x, threads_for(nbytes)).to(x.dtype)


def _c_avx2(e: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    nbytes = e.gate_up.packed.nbytes + e.down.packed.nbytes
    block = block_rows(int4.kernel_layout())
    lib = _lib_avx2(e.down.symmetric)
    y = _c_ffn_avx2_raw(lib, e.gate_up, e.down, e.ffn, x, block, threads_for(nbytes))
    return y.to(x.dtype)


def _dequant(dtype: torch.dtype) -> Callable[[ExpertWeights, torch.Tensor], torch.Tensor]:
    def run(e: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        gu, down, f = e.gate_up, e.down, e.ffn
        xd = x.to(dtype)
        h = torch.empty(x.shape[0], f, dtype=dtype)
        for c in range(0, f, CHUNK):
            r = min(CHUNK, f - c)
            g = xd @ dequantize_rows(gu, c, r, dtype)  # [T, r]
            u = xd @ dequantize_rows(gu, f + c, r, dtype)
            h[:, c : c + r] = F.silu(g) * u
        y = torch.empty(x.shape[0], down.n, dtype=dtype)
        for c in range(0, down.n, CHUNK):
            r = min(CHUNK, down.n - c)
            y[:, c : c + r] = h @ dequantize_rows(down, c, r, dtype)
        return y.to(x.dtype)

    return run


RUNNERS: dict[str, Callable[[ExpertWeights, torch.Tensor], torch.Tensor]] = {
    "tinygemm": _tinygemm,
    "c-fused": _c_fused,
    "c-bf16": _c_bf16,
    "c-int8": _c_int8,
    "c-avx2": _c_avx2,
    "dequant-bf16": _dequant(torch.bfloat16),
    "dequant-f32": _dequant(torch.float32),
}


# --- one token through several experts of a shape: one C call -----------------------------


def _pointer_arrays(es: list[Int4Expert]) -> tuple[ctypes.Array, list[int]]:
    """The C group call's four arrays of pointers (gate_up's nibbles and scales, down's), in
    one ctypes array: (the array, to keep alive over the call; the four arrays' addresses).
    A decode step builds this per layer, on caches its weights have just swept, where every
    Python object made costs: one array, and each expert's pointers read once per expert."""
    n = len(es)
    arr = (ctypes.c_void_p * (4 * n))()
    ptrs = [e.pointers for e in es]
    for j in range(4):
        arr[j * n : (j + 1) * n] = [p[j] for p in ptrs]
    base, size = ctypes.addressof(arr), ctypes.sizeof(ctypes.c_void_p)
    return arr, [base + j * n * size for j in range(4)]


def decode_group(
    es: list[ExpertWeights], x: torch.Tensor, weights: list[float] | None = None
) -> list[torch.Tensor] | torch.Tensor | None:
    """One token x [1, H] through each of `es` (experts of one shape), by one call of the
    fused C kernel that is their path: what each `e(x)` gives, bit for bit, from one
    parallel region instead of one per expert (a decode step of a many-expert model, such
    as 8 of Qwen3-30B-A3B's 128 a layer, spent a fifth of its expert time on the regions
    of 48 calls). With `weights` (the router's, one per expert, the experts in the order
    their outputs are summed): their weighted sum [1, H], rounded as the MoE block rounds it
    (`moe_sum_*` in the kernel), instead of the outputs. None where that path is not a
    fused C kernel, or for a sum in another dtype than bfloat16 or float32 (the caller runs
    each)."""

    e0 = es[0]
    if x.shape[0] != 1 or any(type(e) is not Int4Expert for e in es):
        return None
    key = e0.group_key
    if any(e.group_key != key for e in es):
        return None
    if weights is not None and x.dtype not in (torch.bfloat16, torch.float32):
        return None
    path = path_for(e0, 1, x.dtype)
    if path not in ("c-fused", "c-bf16", "c-int8"):
        return None
    n, (hidden, ffn, gu_g, d_g, sym, nbytes) = len(es), key
    lib = _lib(sym)
    threads = threads_for(n * nbytes)
    keep, (gu_p, gu_s, d_p, d_s) = _pointer_arrays(es)
    b = _scratch(path, n, hidden, ffn, gu_g, d_g, threads)
    y = b["y"]
    if path == "c-int8":
        b["x32"].copy_(x[0])
        lib.int4_ffn_i8_group(n, gu_p, gu_s, d_p, d_s, b["x32"].data_ptr(), b["xq"].data_ptr(),
                              b["sx"].data_ptr(), b["xs"].data_ptr(), b["h"].data_ptr(),
                              b["hq"].data_ptr(), b["hsx"].data_ptr(), b["hs"].data_ptr(),
                              b["scratch"].data_ptr(), y.data_ptr(), hidden, ffn, gu_g, d_g,
                              threads)  # fmt: skip
    elif path == "c-bf16":
        xb = x if x.dtype == torch.bfloat16 and x.is_contiguous() else b["xb"].copy_(x[0])
        lib.int4_ffn_bf16_group(n, gu_p, gu_s, d_p, d_s, xb.data_ptr(), b["h16"].data_ptr(),
                                b["scratch"].data_ptr(), b["xs"].data_ptr(), b["hs"].data_ptr(),
                                y.data_ptr(), hidden, ffn, gu_g, d_g, threads)  # fmt: skip
    else:
        b["x32"].copy_(x[0])
        lib.int4_ffn_group(n, gu_p, gu_s, d_p, d_s, b["x32"].data_ptr(), b["h"].data_ptr(),
                           b["scratch"].data_ptr(), b["xs"].data_ptr(), b["hs"].data_ptr(),
                           y.data_ptr(), hidden, ffn, gu_g, d_g, threads)  # fmt: skip
    if weights is None:  # a copy: y is the next call's scratch
        return list(y.to(x.dtype, copy=True).split(1))
    out = torch.empty(1, hidden, dtype=x.dtype)
    sum_ = lib.moe_sum_bf16 if x.dtype == torch.bfloat16 else lib.moe_sum_f32
    sum_(y.data_ptr(), (ctypes.c_float * n)(*weights), out.data_ptr(), n, hidden)
    return out


_scratches = threading.local()  # per thread: two models decoding in two threads never share


def _scratch(path: str, n: int, hidden: int, ffn: int, gu_g: int, d_g: int, threads: int):
    """The buffers of a decode_group call of this shape, allocated once per thread: a decode
    step's tensor allocations cost more than its small experts' arithmetic."""
    cache = getattr(_scratches, "bufs", None)
    if cache is None:
        cache = _scratches.bufs = {}
    key = (path, n, hidden, ffn, gu_g, d_g, threads)
    b = cache.get(key)
    if b is None:
        b = cache[key] = {
            "y": torch.empty(n, hidden), "scratch": torch.empty(threads * 128),
            "xs": torch.empty(hidden // gu_g), "hs": torch.empty(n * ffn // d_g),
            "x32": torch.empty(hidden), "xq": torch.empty(hidden, dtype=torch.int8),
            "sx": torch.empty(hidden // gu_g), "h": torch.empty(n, ffn),
            "hq": torch.empty(n, ffn, dtype=torch.int8), "hsx": torch.empty(n * ffn // d_g),
            "xb": torch.empty(hidden, dtype=torch.bfloat16),
            "h16": torch.empty(n, ffn, dtype=torch.bfloat16),
        }  # fmt: skip
    return b


# Paths that round activations on the way (to bfloat16, or to int8 per group): never taken
# for float32 activations, which a model runs in to be exact (parity checks), not fast.
ROUNDS_TO_BF16 = ("c-bf16", "c-int8", "dequant-bf16")


def eligible(e: ExpertWeights, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """The paths that can run this expert here on activations of `dtype`."""
    if isinstance(e, Int4BiasedExpert):
        return _eligible_biased(e, dtype)
    layout, sym = int4.kernel_layout(), e.down.symmetric
    c_ok = (
        layout == "tinygemm-avx512"
        and e.ffn % 64 == 0
        and e.down.n % 64 == 0
        and native_available(sym)
    )
    block = block_rows(layout)
    avx2_ok = block is not None and e.ffn % block == 0 and e.down.n % block == 0
    extra = {"c-bf16": bf16_available, "c-int8": int8_available}  # where the CPU has them
    paths = [
        p
        for p in PATHS[1:]
        if (p == "c-avx2" and avx2_ok and avx2_available(sym))
        or (p != "c-avx2" and c_ok and (p not in extra or extra[p](sym)))
    ]
    if dtype != torch.bfloat16:
        paths = [p for p in paths if p not in ROUNDS_TO_BF16]
    return ["tinygemm", *paths]


# --- experts with biases (gpt-oss): the path is chosen per linear map ---------------------

# How one biased linear map runs: PyTorch's int4 kernel, or the C kernel's linear in float32
# or on int8 activations; the bias is added in x's dtype either way.
LINEAR_PATHS: dict[str, Callable[[int4.Int4Linear, torch.Tensor], torch.Tensor]] = {
    "tinygemm": lambda lin, x: lin(x),
    "c-linear": lambda lin, x: c_linear(lin, x).to(x.dtype),
    "c-linear-i8": lambda lin, x: c_linear_i8(lin, x).to(x.dtype),
}


@dataclass(frozen=True)
class PathLinear:
    """x @ W.T + b for an int4 W by the linear path chosen for its expert's shape and the
    token count. `owner` holds that expert once it is built (a frozen expert and its maps
    cannot name each other at construction), so a family that calls the maps itself
    (gpt-oss's clamped SwiGLU) gets the chosen path too."""

    linear: int4.Int4Linear
    bias: torch.Tensor
    owner: list = field(repr=False, compare=False)

    n = property(lambda self: self.linear.n)
    k = property(lambda self: self.linear.k)
    group_size = property(lambda self: self.linear.group_size)
    symmetric = property(lambda self: self.linear.symmetric)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(path_for(self.owner[0], x.shape[0], x.dtype), x)

    def run(self, path: str, x: torch.Tensor) -> torch.Tensor:
        return LINEAR_PATHS[path](self.linear, x) + self.bias.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.linear.dequantize()


@dataclass(frozen=True)
class Int4BiasedExpert(ExpertWeights):
    """An int4 SwiGLU expert with biases whose maps take the path chosen here."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return BIASED_RUNNERS[path_for(self, x.shape[0], x.dtype)](self, x)


def biased_expert(gate_up, gate_up_bias, down, down_bias, ffn: int) -> Int4BiasedExpert:
    owner: list = []
    e = Int4BiasedExpert(PathLinear(gate_up, gate_up_bias, owner),
                         PathLinear(down, down_bias, owner), ffn)  # fmt: skip
    owner.append(e)
    return e


def _biased(path: str) -> Callable[[ExpertWeights, torch.Tensor], torch.Tensor]:
    def run(e: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        h = e.gate_up.run(path, x)  # [T, 2*ffn]
        return e.down.run(path, F.silu(h[:, : e.ffn]) * h[:, e.ffn :])

    return run


BIASED_RUNNERS = {p: _biased(p) for p in LINEAR_PATHS}


def _runners(e: ExpertWeights) -> dict:
    return BIASED_RUNNERS if isinstance(e, Int4BiasedExpert) else RUNNERS


def _eligible_biased(e: ExpertWeights, dtype: torch.dtype) -> list[str]:
    sym = e.down.symmetric
    c_ok = (
        int4.kernel_layout() == "tinygemm-avx512"
        and e.gate_up.n % 64 == 0
        and e.down.n % 64 == 0
        and native_available(sym)
    )
    i8 = c_ok and dtype == torch.bfloat16 and int8_available(sym)  # int8 rounds: bf16 runs only
    return ["tinygemm", *(["c-linear"] if c_ok else []), *(["c-linear-i8"] if i8 else [])]


# --- choosing by measurement ---------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """Per shape class: the path taken and each candidate's score (ms, `measure`) at the
    class's token count."""

    paths: dict[str, str]
    ms: dict[str, dict[str, float]]


def measure(
    e: ExpertWeights,
    candidates: list[str],
    tokens: int,
    rounds: int = ROUNDS,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, float]:
    """Each candidate's ms on `tokens` bf16 tokens through `e`: calls alternate between
    candidates in rounds (each round calls a candidate for ROUND_S at least), and the score
    is the 20th percentile of its calls, which the other processes of a busy machine
    inflate least. Candidates whose fastest call of the first round is PRUNE times behind
    the best one's are dropped: they would not win, and timing them again is most of the cost."""
    x = torch.randn(tokens, e.down.n, generator=torch.Generator().manual_seed(0))
    x = x.to(dtype)
    for c in candidates:
        _timed(c, e, x)  # warm-up: first calls allocate
    times: dict[str, list[float]] = {c: [] for c in candidates}
    for r in range(rounds):
        for c in times:
            start = time.perf_counter()
            while True:
                times[c].append(_timed(c, e, x))
                if time.perf_counter() - start >= ROUND_S:
                    break
        if r == 0:
            best = min(min(ts) for ts in times.values())
            times = {c: ts for c, ts in times.items() if min(ts) <= PRUNE * best}
    return {c: sorted(ts)[len(ts) // 5] * 1e3 for c, ts in times.items()}


def _timed(path: str, e: ExpertWeights, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    _runners(e)[path](e, x)
    return time.perf_counter() - t0


def _cache_file(e: ExpertWeights, dtype: torch.dtype = torch.bfloat16) -> Path:
    key = "\0".join(
        [
            native._cpu_identity(),
            torch.__version__,
            SOURCE.read_text(),
            repr((e.down.n, e.ffn, e.gate_up.group_size, e.down.group_size, str(dtype))),
            "symmetric" if e.down.symmetric else "",
            str(torch.get_num_threads()),
            int4.kernel_layout(),
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    kind = str(dtype).removeprefix("torch.")
    kind += "-biased" if isinstance(e, Int4BiasedExpert) else ""
    kind += "-sym" if e.down.symmetric else ""
    return native.cache_dir() / f"int4-paths-{e.down.n}x{e.ffn}-{kind}-{digest}.json"


_chosen: dict[tuple, Choice] = {}


def _memory_key(e: ExpertWeights, dtype: torch.dtype) -> tuple:
    return (e.down.n, e.ffn, e.gate_up.group_size, e.down.group_size, torch.get_num_threads(),
            dtype, isinstance(e, Int4BiasedExpert), e.down.symmetric)  # fmt: skip


def known(e: ExpertWeights, dtype: torch.dtype = torch.bfloat16) -> Choice | None:
    """The choice for experts shaped like `e` if this process or an earlier one on this
    machine made it (memory, then the cache file), else None. Reads no weight."""
    mem = _memory_key(e, dtype)
    if mem in _chosen:  # every expert call asks: no file, no hashing
        return _chosen[mem]
    cands = eligible(e, dtype)
    if len(cands) == 1:  # nothing to choose between: nothing to measure
        _chosen[mem] = Choice({cls: cands[0] for cls in CLASSES}, {})
        return _chosen[mem]
    try:
        d = json.loads(_cache_file(e, dtype).read_text())
        paths = d["paths"]
        # Measured among the paths eligible now: a choice made while a kernel was missing
        # (a build that failed once: a full disk, no compiler yet) is measured again once
        # it builds, not kept on the slower paths for good.
        if (set(paths) == set(CLASSES) and set(d["candidates"]) == set(cands)
                and _consistent(paths)):  # fmt: skip
            _chosen[mem] = Choice(d["paths"], d["ms"])
            return _chosen[mem]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def choose(e: ExpertWeights, dtype: torch.dtype = torch.bfloat16, progress: bool = False) -> Choice:
    """This machine's path per shape class for experts shaped like `e`: from memory, from the
    cache file, or measured now on `e` (and saved), with a progress bar if `progress`."""
    choice = known(e, dtype)
    if choice is not None:
        return choice
    cands = eligible(e, dtype)
    kind = str(dtype).removeprefix("torch.")
    what = f"choosing int4 kernels for {e.down.n}x{e.ffn} {kind} (once per machine)"
    ms = {}
    with progress_bar(len(CLASSES), what, enabled=progress, unit="classes") as bar:
        for cls, m in CLASSES.items():
            ms[cls] = measure(e, cands, m, dtype=dtype)
            bar.advance()
    choice = Choice(_pick(ms), ms)
    _save(_cache_file(e, dtype), choice, cands)
    _chosen[_memory_key(e, dtype)] = choice
    return choice


def _pick(ms: dict[str, dict[str, float]]) -> dict[str, str]:
    """One path for every class: the least slow over all of them relative to each class's
    best. Each path sums a token in the same order whatever else shares the call (mer's C
    kernels bit for bit, the others to float rounding; `test_each_path_gives_a_token_what_
    it_gives_it_alone`), but two paths round differently (bf16 or float32 hidden state, int8
    activations, another summation order), so a shape's classes mixing paths made a
    token's output depend on how many tokens of the pass its experts saw: a request decoded
    alone and batched, or a prompt prefilled packed with other requests' tokens, gave
    other sampled text (a clean-clone CI run, on a CPU whose fastest path per class
    differed). One path keeps continuous batching's promise: same seed, same tokens.

    A path `measure` dropped from a class was at least PRUNE times behind there: it costs
    that much in that class, so a path every class kept wins over one some class dropped
    unless it is slower still, and a choice exists when no path survived in every class."""
    paths = dict.fromkeys(p for t in ms.values() for p in t)
    cost = {p: sum(t[p] / min(t.values()) if p in t else PRUNE for t in ms.values())
            for p in paths}  # fmt: skip
    one = min(cost, key=cost.get)
    return dict.fromkeys(ms, one)


def _consistent(paths: dict[str, str]) -> bool:
    """Whether a saved choice keeps the rule `_pick` now applies (an older cache file may
    mix paths across classes)."""
    return len(set(paths.values())) == 1


def prepare(
    fmt: ExpertFormat,
    read_into: Callable[[torch.Tensor], None],
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> Choice | None:
    """Make the choice for experts of `fmt` before any runs (a model calls this as it opens,
    so its first token pays no measurement): known already, or measured on an expert that
    `read_into(buf)` fills (only then: a known choice costs no read and no memory). None
    for experts that take no int4 path choice (another scheme)."""
    buf = torch.empty(fmt.nbytes, dtype=torch.uint8)  # untouched pages: nothing resident yet
    e = fmt.view(buf)
    if not isinstance(e, Int4Expert | Int4BiasedExpert):
        return None
    choice = known(e, dtype)
    if choice is None:
        read_into(buf)
        choice = choose(e, dtype, progress=progress)
    return choice


def _save(path: Path, choice: Choice, candidates: list[str]) -> None:
    native.save_choice(path, {"paths": choice.paths, "ms": choice.ms, "candidates": candidates})


def path_for(e: ExpertWeights, tokens: int, dtype: torch.dtype = torch.bfloat16) -> str:
    forced = os.environ.get("MER_INT4_PATH")
    if forced:
        if forced not in PATHS and forced not in LINEAR_PATHS:
            known_paths = ", ".join(dict.fromkeys([*PATHS, *LINEAR_PATHS]))
            raise ValueError(f"MER_INT4_PATH={forced!r}: choose from {known_paths}")
        return forced if forced in eligible(e, dtype) else "tinygemm"
    return choose(e, dtype).paths[shape_class(tokens)]


@dataclass(frozen=True)
class Int4Expert(ExpertWeights):
    """An int4 SwiGLU expert whose call takes the path chosen for its token count here."""

    @functools.cached_property
    def group_key(self) -> tuple[int, int, int, int, bool, int]:
        """What experts run in one C group call share: hidden and ffn sizes, both group
        sizes, symmetry; and the bytes of nibbles an expert has (for the thread count)."""
        gu, d = self.gate_up, self.down
        nbytes = gu.packed.nbytes + d.packed.nbytes
        return d.n, self.ffn, gu.group_size, d.group_size, d.symmetric, nbytes

    @functools.cached_property
    def pointers(self) -> tuple[int, int, int, int]:
        """Addresses of gate_up's nibbles and scales and down's, for the C group call."""
        gu, d = self.gate_up, self.down
        return gu.packed.data_ptr(), gu.scales.data_ptr(), d.packed.data_ptr(), d.scales.data_ptr()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return RUNNERS[path_for(self, x.shape[0], x.dtype)](self, x)
