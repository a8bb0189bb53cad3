"""MXFP4 weights: E2M1 values with one power-of-two (E8M0) scale per block of 32.

The OCP microscaling format gpt-oss checkpoints ship their experts in. A weight
W [N, K] (out, in) is `blocks` uint8 [N, K/32, 16] and `scales` uint8 [N, K/32]:
byte j of a block holds element 2j in its low nibble and 2j+1 in its high one,
each nibble an E2M1 code (sign bit 3, value FP4_VALUES[code & 7]), and the
block's values are multiplied by 2^(scale - 127), as `transformers` dequantizes
them. Every such weight is exactly representable in float32 (and bfloat16), so
`dequantize` is exact. `quantize` rounds float weights to the nearest MXFP4
value, for synthetic stores and tests. `Mxfp4Linear` runs y = x @ W.T from the
packed bytes with the C kernels of `mxfp4_kernel.c`, built for this CPU and
checked against the reference before they are used: float32 arithmetic, and
where the CPU has AVX512_BF16, bfloat16 dot products for batches of bfloat16
activations (a slow torch path where nothing builds or passes); `dequantize`
and `reference_matmul` are the obvious versions they are tested against.
"""

from __future__ import annotations

import ctypes
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mer.quant import native

BLOCK = 32
SOURCE = Path(__file__).with_name("mxfp4_kernel.c")
_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_VALUES = _MAGNITUDES + tuple(-m for m in _MAGNITUDES)  # E2M1 code -> value; bit 3 is the sign
# Midpoints between consecutive magnitudes 0, 0.5, ... 6: round to nearest.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@functools.cache
def scale_values() -> torch.Tensor:
    """float32 [256]: 2^(s - 127) for every scale byte s (2^-127 is a float32 subnormal,
    2^128 overflows to inf as in transformers). Shared: do not modify."""
    return torch.tensor([math.ldexp(1.0, s - 127) for s in range(256)], dtype=torch.float64).float()


def check_shape(k: int, what: str = "weight") -> None:
    if k % BLOCK:
        raise ValueError(f"{what}: input dim {k} is not a multiple of the MXFP4 block ({BLOCK})")


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Reference: blocks [N, K/32, 16], scales [N, K/32] -> float32 [N, K], exact."""
    n, nb, _ = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack([blocks & 15, blocks >> 4], -1).reshape(n, nb, BLOCK)  # [N, K/32, 32]
    w = lut[codes.long()] * scale_values()[scales.long()][..., None]
    return w.reshape(n, nb * BLOCK)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] float -> (blocks, scales), each value rounded to the nearest MXFP4 value.

    A block's scale is the smallest power of two that fits its largest magnitude
    within E2M1's 6, so nothing is clipped; ties round to even, as OCP's spec rounds.
    """
    n, k = w.shape
    check_shape(k)
    g = w.float().reshape(n, k // BLOCK, BLOCK)
    amax = g.abs().amax(-1)
    # frexp: amax/6 = m * 2^e with m in [0.5, 1): ceil(log2) is e, or e-1 when m is 0.5 exactly.
    m, e = torch.frexp(amax / 6)
    exp = torch.where(m == 0.5, e - 1, e).clamp(-127, 127)
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -127))
    v = g / torch.ldexp(torch.ones_like(amax), exp)[..., None]
    a = v.abs()
    mids = torch.tensor((*_MIDPOINTS, math.inf))
    mag = torch.bucketize(a, mids[:-1])  # 0..7; a tie lands on the smaller magnitude
    mag += (a == mids[mag]) & (mag % 2 == 1)  # ties to even (an even code's mantissa bit is 0)
    codes = (mag | torch.where(v < 0, 8, 0)).to(torch.uint8).reshape(n, k // BLOCK, 16, 2)
    blocks = codes[..., 0] | codes[..., 1] << 4
    return blocks, (exp + 127).to(torch.uint8)


@dataclass(frozen=True)
class Mxfp4Linear:
    """y = x @ W.T for an MXFP4 weight W [n, k]: blocks [n, k/32, 16], scales [n, k/32] uint8."""

    blocks: torch.Tensor
    scales: torch.Tensor
    n: int
    k: int

    def __post_init__(self) -> None:
        nb = self.k // BLOCK
        for name, t, shape in (
            ("blocks", self.blocks, (self.n, nb, 16)),
            ("scales", self.scales, (self.n, nb)),
        ):
            # The kernel reads raw memory: anything but these exact bytes would be garbage.
            if t.dtype != torch.uint8 or tuple(t.shape) != shape or not t.is_contiguous():
                raise ValueError(
                    f"MXFP4 {name}: got {t.dtype} {tuple(t.shape)}, want contiguous uint8 {shape}"
                )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        fp32, bf16, _ = _native()
        y = torch.empty(x2.shape[0], self.n, dtype=torch.float32)
        if bf16 is not None and x.dtype == torch.bfloat16 and len(x2) > 1 and self.bf16_exact:
            bf16(self.blocks, self.scales, arrange(x2, torch.bfloat16), y)
        elif fp32 is not None:
            fp32(self.blocks, self.scales, arrange(x2, torch.float32), y)
        else:
            y = _torch_matmul(x2, self)
        return y.to(x.dtype).reshape(*lead, self.n)

    @functools.cached_property
    def bf16_exact(self) -> bool:
        """Every scale in 2..252: the bfloat16 kernel's scaled table holds each value exactly."""
        return bool(self.scales.min() >= 2 and self.scales.max() <= 252)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.blocks, self.scales)


Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def arrange(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [T, K] -> the layout the kernels read, in `dtype`: each 32-element block as its
    even elements, then its odd ones, so a block's low and high nibbles meet contiguous
    vectors."""
    t, k = x.shape
    return x.to(dtype).reshape(t, k // BLOCK, 16, 2).transpose(-1, -2).contiguous()


@functools.cache
def _native() -> tuple[Kernel | None, Kernel | None, str]:
    """(the float32 C kernel, the bfloat16 one, what runs) for the kernels that build here
    and match the reference on a probe; None for those that do not."""
    try:
        lib = native.build(SOURCE)
    except native.BuildError as e:
        warnings.warn(f"MXFP4 kernel unavailable ({e}): using the slow torch path", stacklevel=3)
        return None, None, f"torch (no C kernel: {e})"
    fp32 = wrap(lib)
    if not probe(fp32):
        warnings.warn(
            "MXFP4 kernel disagrees with the reference here: using the slow torch path",
            stacklevel=3,
        )
        return None, None, "torch (the C kernel failed its probe)"
    simd = lib.mxfp4_simd()
    if simd != 512:
        return fp32, None, "C, AVX2" if simd == 256 else "C, portable loop"
    # Only built where the compiler targets AVX512_BF16; ctypes has no such symbol elsewhere.
    bf16 = wrap(lib, "mxfp4_linear_bf16") if hasattr(lib, "mxfp4_linear_bf16") else None
    if bf16 is None or not probe(bf16, torch.bfloat16):
        return fp32, None, "C, AVX-512"
    return fp32, bf16, "C, AVX-512; bf16 dot products from 2 tokens"


def wrap(lib: ctypes.CDLL, name: str = "mxfp4_linear") -> Kernel:
    """A kernel of the loaded library as a function of tensors."""
    fn = getattr(lib, name)
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    fn.restype = None

    def run(blocks: torch.Tensor, scales: torch.Tensor, xp: torch.Tensor, y: torch.Tensor) -> None:
        n, nb = scales.shape
        fn(blocks.data_ptr(), scales.data_ptr(), xp.data_ptr(), y.data_ptr(),
           xp.shape[0], n, nb * BLOCK, torch.get_num_threads())  # fmt: skip

    return run


def native_kernel() -> Kernel | None:
    """The float32 C kernel, or None where the torch path runs instead."""
    return _native()[0]


def bf16_kernel() -> Kernel | None:
    """The bfloat16 C kernel, where this CPU has one that passed its probe."""
    return _native()[1]


def kernel_description() -> str:
    """Which path MXFP4 matmuls take on this machine, for benchmarks to print."""
    return _native()[2]


def probe(run: Kernel, dtype: torch.dtype = torch.float32) -> bool:
    """Every tile shape the kernel specializes (1, 2, 3 and 4 tokens, a partial row tile),
    every code and a spread of scales, against the reference on the same x."""
    gen = torch.Generator().manual_seed(0)
    n, k = 23, 96
    blocks = torch.randint(0, 256, (n, k // BLOCK, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(117, 137, (n, k // BLOCK), dtype=torch.uint8, generator=gen)
    w = dequantize(blocks, scales).double()
    for t in (1, 2, 7):
        x = torch.randn(t, k, generator=gen).to(dtype)
        y = torch.empty(t, n)
        run(blocks, scales, arrange(x, dtype), y)
        ref = x.double() @ w.t()
        if not ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5:
            return False
    return True


def _torch_matmul(x: torch.Tensor, lin: Mxfp4Linear, rows: int = 256) -> torch.Tensor:
    """Without the native kernel: dequantize a few rows at a time (they stay in cache) and
    multiply in float32. Correct everywhere, and slow: on the gpt-oss-20b expert shape, one
    token on one thread took 100-170x the int4 kernel's time."""
    x32 = x.float()
    y = torch.empty(x.shape[0], lin.n, dtype=torch.float32)
    for r in range(0, lin.n, rows):
        w = dequantize(lin.blocks[r : r + rows], lin.scales[r : r + rows])
        y[:, r : r + rows] = x32 @ w.t()
    return y


def reference_matmul(x: torch.Tensor, lin: Mxfp4Linear) -> torch.Tensor:
    """x @ dequantize(W).T in float32: the slow path the kernel is tested against."""
    return (x.float() @ lin.dequantize().t()).to(x.dtype)
