"""Compact dense weights: the resident matrices (attention, shared experts, dense layers,
the output head) held at 8 or 4 bits with the CPU kernels PyTorch has.

`linear(x, w, bias)` is the one seam the model calls: `w` is a plain tensor
(F.linear, unchanged: bf16 dense weights and float32 runs stay exact) or a
quantized weight, which computes x @ W.T itself. Int8 is symmetric per output
channel (`aten._weight_int8pack_mm`); int4 is group-wise asymmetric, the same
layout as int4 experts (`mer.quant.int4`, `aten._weight_int4pack_mm_for_cpu`).
`quantize_dense` chooses what is quantized: only the matrices named in
`QUANTIZED`; norms, routers, biases, the embedding table and anything a family
keeps in float32 stay exact. It knows nothing about stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mer.quant import dense_paths, int4

DENSE_QUANTS = ("bf16", "int8", "int4")
# Short names (after `layers.{i}.`) and global names of the matrices that may be quantized.
QUANTIZED = frozenset(
    {"q", "k", "v", "o", "shared.gate", "shared.up", "shared.down", "mlp.gate", "mlp.up"}
    | {"mlp.down", "lm_head"}
)


@dataclass(frozen=True)
class Int8Weight:
    """W [n, k] ~= data (int8) * scales[:, None] (float32, per output channel)."""

    data: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8Weight:
        w = w.float()
        scales = (w.abs().amax(1) / 127).clamp_min(1e-10)
        data = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(data, scales)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, x.shape[-1]).contiguous(), self.data, self.scales.to(x.dtype)
        )
        return y.view(*lead, -1)

    def dequantize(self) -> torch.Tensor:
        return self.data.float() * self.scales[:, None]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.data, self.scales


@dataclass(frozen=True)
class Int4Weight:
    """W [n, k] as group-wise int4 (`mer.quant.int4.Int4Linear`)."""

    linear: int4.Int4Linear

    @classmethod
    def quantize(cls, w: torch.Tensor, preferred_group: int = 128) -> Int4Weight:
        n, k = w.shape
        g = int4.default_group_size(k, preferred=preferred_group)
        int4.check_shape(n, k, g)
        packed, scales_zeros = int4.encode(w.float(), g)
        return cls(int4.Int4Linear(packed, scales_zeros, g, n, k))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.linear.n, self.linear.k))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.linear(x.reshape(-1, x.shape[-1]).contiguous()).view(*lead, -1)

    def dequantize(self) -> torch.Tensor:
        return self.linear.dequantize()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.linear.packed, self.linear.scales_zeros


QuantWeight = Int8Weight | Int4Weight


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) for a plain tensor or a quantized weight."""
    if isinstance(w, torch.Tensor):
        y = dense_paths.gemv(x, w)  # one bf16 token: the faster measured GEMV
        if y is not None:
            return y if bias is None else y + bias
        return F.linear(x, w, bias)
    y = w(x)
    return y if bias is None else y + bias


def quantizable(name: str, t: torch.Tensor) -> bool:
    short = name.split(".", 2)[2] if name.startswith("layers.") else name
    return short in QUANTIZED and t.dim() == 2


def quantize(t: torch.Tensor, scheme: str) -> torch.Tensor | QuantWeight:
    """One matrix in `scheme` ("bf16" leaves it as it is)."""
    if scheme == "int8":
        return Int8Weight.quantize(t)
    if scheme == "int4":
        n, k = t.shape
        if n % 16 == 0 and k % 32 == 0:
            return Int4Weight.quantize(t)
        return Int8Weight.quantize(t)  # a shape the int4 kernel cannot take
    return t
