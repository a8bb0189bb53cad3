"""Group-wise int4 weights in the layout PyTorch's CPU int4 kernel consumes.

A weight W [N, K] (out, in) is cut into groups of G along K. Each group keeps
a scale and a zero so that w ~= (q - 8) * scale + zero with q in 0..15: the
convention of `aten._weight_int4pack_mm_for_cpu`, so stored bytes feed the
kernel with no repacking. A symmetric weight keeps the scale alone (zero 0,
float16): GGUF's Q4_0 as it lies, 4.5 bits a weight at group 32 against the
pair's 5, read by mer's C kernels (`quantize_symmetric`, `pack_scales`). The
packed byte order depends on the CPU build of the kernel (AVX-512, AVX2 or
scalar); `kernel_layout()` finds out which by packing a probe through PyTorch
itself, and `pack`/`unpack` implement each layout explicitly so a store
written on one machine can be repacked on another. `dequantize` and
`reference_matmul` are the slow, obvious versions that tests hold the kernel against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 64, 128, 256)

# name -> (block of output columns, how a full block pairs nibbles).
# "halves": byte j holds column j (low nibble) and column j + block/2 (high).
# "pairs": byte j holds columns 2j and 2j+1. A last, partial block always pairs.
LAYOUTS: dict[str, tuple[int, str]] = {
    "tinygemm-avx512": (64, "halves"),
    "tinygemm-avx2": (32, "halves"),
    "tinygemm-scalar": (32, "pairs"),
}


@dataclass(frozen=True)
class Int4Linear:
    """y = x @ W.T for an int4 weight W [n, k]: packed [n, k/2] uint8, and `scales` either
    bf16 [k/G, n, 2] (scale, zero) pairs or, for a symmetric weight (zero 0, GGUF's Q4_0),
    float16 [k/G, n] scales alone."""

    packed: torch.Tensor
    scales: torch.Tensor
    group_size: int
    n: int
    k: int

    @property
    def symmetric(self) -> bool:
        return self.scales.dim() == 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel computes in the activations' dtype and wants scales in the same one:
        # bf16 is the fast path; float32 (converting scales per call) is exact, for checking.
        # It knows only (scale, zero) pairs: a symmetric weight's are made per call (mer's C
        # kernels read its scales as they are; this path is the fallback where they do not run).
        sz = self.scales
        if self.symmetric:
            sz = torch.stack([sz, torch.zeros_like(sz)], -1)
        sz = sz if x.dtype == sz.dtype else sz.to(x.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, sz)

    def dequantize(self, layout: str | None = None) -> torch.Tensor:
        q = unpack(self.packed, self.n, self.k, layout or kernel_layout())
        if self.symmetric:
            s = self.scales.float().t()
            return dequantize(q, s, torch.zeros_like(s), self.group_size)
        sz = self.scales.float()
        return dequantize(q, sz[..., 0].t(), sz[..., 1].t(), self.group_size)


def check_shape(n: int, k: int, group_size: int, what: str = "weight") -> None:
    """Raise ValueError unless [n, k] can be stored as int4 with this group size."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"{what}: input dim {k} is not a multiple of group size {group_size}")
    if n % 16:
        raise ValueError(f"{what}: output dim {n} is not a multiple of 16 (int4 kernel blocks)")


def default_group_size(*dims: int, preferred: int = 128) -> int:
    """The largest group size up to `preferred` that divides every input dim."""
    for g in sorted(GROUP_SIZES, reverse=True):
        if g <= preferred and all(d % g == 0 for d in dims):
            return g
    return preferred  # nothing fits: check_shape will say why


def quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K] float -> (q uint8 [N, K] in 0..15, scales [N, K/G], zeros [N, K/G]) in float32."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo = g.amin(-1)
    hi = g.amax(-1)
    scales = ((hi - lo) / 15).clamp_min(1e-8)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp_(0, 15)
    zeros = lo + 8 * scales
    return q.to(torch.uint8).reshape(n, k), scales, zeros


def quantize_symmetric(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] float -> (q uint8 [N, K] in 0..15, scales [N, K/G] float32 holding float16
    values) with w ~= (q - 8) * scale, rounded as GGUF's Q4_0 reference rounds (at group 32
    the same nibbles and scales): the weight of largest magnitude in a group is -8 steps of
    a float32 scale, the others are truncated from 8.5 steps up, the scale kept in float16."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    big = g.gather(-1, g.abs().argmax(-1, keepdim=True))
    d = big / -8
    inv = torch.where(d == 0, 0.0, 1 / d)
    q = torch.trunc(g * inv + 8.5).clamp_(0, 15)
    return q.to(torch.uint8).reshape(n, k), d[..., 0].to(torch.float16).float()


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Reference: (q - 8) * scale + zero, float32 [N, K]."""
    n, k = q.shape
    g = q.float().reshape(n, k // group_size, group_size) - 8
    return (g * scales[..., None] + zeros[..., None]).reshape(n, k)


def pack_scales_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype=torch.bfloat16):
    """[N, K/G] scales and zeros -> the kernel's [K/G, N, 2]."""
    return torch.stack([scales, zeros], -1).transpose(0, 1).contiguous().to(dtype)


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """A symmetric weight's [N, K/G] scales -> the kernels' float16 [K/G, N]."""
    return scales.t().contiguous().to(torch.float16)


def pack(q: torch.Tensor, layout: str) -> torch.Tensor:
    """q uint8 [N, K] in 0..15 -> packed uint8 [N, K/2] in `layout`."""
    block, mode = LAYOUTS[layout]
    n, k = q.shape
    q = q.to(torch.uint8)
    full = n // block * block
    out = []
    if full:
        b = q[:full].reshape(full // block, block, k).permute(0, 2, 1)  # [NB, K, block]
        if mode == "halves":
            lo, hi = b[..., : block // 2], b[..., block // 2 :]
        else:
            lo, hi = b[..., 0::2], b[..., 1::2]
        out.append((hi << 4 | lo).reshape(-1))
    if full < n:
        t = q[full:].t()  # [K, tail]
        out.append((t[:, 1::2] << 4 | t[:, 0::2]).reshape(-1))
    return torch.cat(out).reshape(n, k // 2)


def unpack(packed: torch.Tensor, n: int, k: int, layout: str) -> torch.Tensor:
    """Inverse of `pack`: packed uint8 [N, K/2] -> q uint8 [N, K]."""
    block, mode = LAYOUTS[layout]
    flat = packed.reshape(-1)
    full = n // block * block
    parts = []
    if full:
        b = flat[: full * k // 2].reshape(full // block, k, block // 2)
        lo, hi = b & 15, b >> 4
        if mode == "halves":
            cols = torch.cat([lo, hi], -1)
        else:
            cols = torch.stack([lo, hi], -1).reshape(full // block, k, block)
        parts.append(cols.permute(0, 2, 1).reshape(full, k))
    if full < n:
        t = flat[full * k // 2 :].reshape(k, (n - full) // 2)
        cols = torch.stack([t & 15, t >> 4], -1).reshape(k, n - full)
        parts.append(cols.t())
    return torch.cat(parts).contiguous()


@functools.cache
def kernel_layout() -> str:
    """The packed layout this PyTorch build's CPU int4 kernel expects, found by probing it."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (64 * 2 + 16, 64), generator=gen, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for name in LAYOUTS:
        if torch.equal(packed.reshape(-1), pack(probe.to(torch.uint8), name).reshape(-1)):
            return name
    raise RuntimeError("this PyTorch build packs int4 weights in a layout mer does not know")


def encode(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (packed uint8 [N, K/2] in this machine's layout, (scale, zero) pairs bf16
    [K/G, N, 2])."""
    q, scales, zeros = quantize(w, group_size)
    return pack(q, kernel_layout()), pack_scales_zeros(scales, zeros)


def reference_matmul(x: torch.Tensor, lin: Int4Linear) -> torch.Tensor:
    """x @ dequantize(W).T in float32: the slow path the kernel is tested against."""
    return (x.float() @ lin.dequantize().t()).to(x.dtype)
