"""The int4-sym scheme: int4 with a float16 scale per group and no zero (GGUF's Q4_0).

Parts: `packed` uint8 [n, k/2] in the nibble layout the format records (as int4's), and
`scales` float16 [k/G, n]: w = (q - 8) * scale. At group 32 that is 4.5 bits a weight
against int4's 5 (a bf16 scale and zero), so a decode step reads 10% fewer expert bytes,
and a Q4_0 GGUF's experts are kept bit for bit (the file's fp16 scales as they are). mer's
C kernels read it in a build of their own (`int4_paths`); elsewhere PyTorch's int4 kernel
runs it from (scale, zero) pairs made per call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mer.quant import int4
from mer.quant.schemes import int4 as asymmetric

if TYPE_CHECKING:
    from mer.quant.expert import ExpertFormat

NAME = "int4-sym"
BIASED_EXPERTS = asymmetric.BIASED_EXPERTS

machine_fields = asymmetric.machine_fields
check = asymmetric.check
expert = asymmetric.expert


def parts(fmt: ExpertFormat, n: int, k: int) -> list:
    return [
        ("packed", torch.uint8, (n, k // 2)),
        ("scales", torch.float16, (k // fmt.group_size, n)),
    ]


def encode(fmt: ExpertFormat, w: torch.Tensor) -> dict[str, torch.Tensor]:
    q, scales = int4.quantize_symmetric(w, fmt.group_size)
    return {"packed": int4.pack(q, fmt.layout), "scales": int4.pack_scales(scales)}


def view(fmt: ExpertFormat, t: dict[str, torch.Tensor], n: int, k: int) -> int4.Int4Linear:
    return int4.Int4Linear(asymmetric.packed_for_machine(fmt, t["packed"], n, k),
                           t["scales"], fmt.group_size, n, k)  # fmt: skip
