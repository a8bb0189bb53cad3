"""The int8 scheme: per-output-row symmetric int8 for PyTorch's int8 weight-only kernel.

Parts: `q` int8 [n, k] and `scales` bf16 [n]. Mainly a quality yardstick
between int4 and bf16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mer.quant import int8

if TYPE_CHECKING:
    from mer.quant.expert import ExpertFormat

NAME = "int8"


def machine_fields(group_size: int) -> dict:
    return {}


def check(fmt: ExpertFormat, n: int, k: int, what: str) -> None:
    pass  # any shape


def parts(fmt: ExpertFormat, n: int, k: int) -> list:
    return [("q", torch.int8, (n, k)), ("scales", torch.bfloat16, (n,))]


def encode(fmt: ExpertFormat, w: torch.Tensor) -> dict[str, torch.Tensor]:
    q, scales = int8.encode(w)
    return {"q": q, "scales": scales}


def view(fmt: ExpertFormat, t: dict[str, torch.Tensor], n: int, k: int) -> int8.Int8Linear:
    return int8.Int8Linear(t["q"], t["scales"])
