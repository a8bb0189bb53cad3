"""The bf16 scheme: weights as they are, in bfloat16, for parity checks.

Part: `w` bf16 [n, k]. The view computes in the activations' dtype, so
float32 runs are exact against a float32 reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mer.quant.expert import ExpertFormat

NAME = "bf16"


@dataclass(frozen=True)
class DenseLinear:
    """y = x @ W.T computed in x's dtype (so float32 runs give exact parity checks)."""

    w: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w.to(x.dtype))

    def dequantize(self) -> torch.Tensor:
        return self.w.float()


def machine_fields(group_size: int) -> dict:
    return {}


def check(fmt: ExpertFormat, n: int, k: int, what: str) -> None:
    pass  # any shape


def parts(fmt: ExpertFormat, n: int, k: int) -> list:
    return [("w", torch.bfloat16, (n, k))]


def encode(fmt: ExpertFormat, w: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"w": w.to(torch.bfloat16)}


def view(fmt: ExpertFormat, t: dict[str, torch.Tensor], n: int, k: int) -> DenseLinear:
    return DenseLinear(t["w"])
