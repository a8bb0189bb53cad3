"""Per-output-channel symmetric int8 weights for PyTorch's CPU int8 weight-only kernel.

w ~= q * scale with q in -127..127 and one scale per output row: the
convention of `torch._weight_int8pack_mm`. Mainly a quality yardstick between
int4 and bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Int8Linear:
    """y = x @ W.T for W [n, k] = q [n, k] int8 * scales [n]."""

    q: torch.Tensor
    scales: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.scales if x.dtype == self.scales.dtype else self.scales.to(x.dtype)
        return torch._weight_int8pack_mm(x, self.q, scales)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales.float()[:, None]


def encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q int8 [N, K], scales bf16 [N])."""
    w = w.float()
    scales = (w.abs().amax(1) / 127).clamp_min(1e-8).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales
