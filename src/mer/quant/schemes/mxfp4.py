"""The MXFP4 scheme: gpt-oss's own expert format, kept 4-bit and bit-exact in the store.

Parts: `blocks` uint8 [n, k/32, 16] and `scales` uint8 [n, k/32], byte for byte
as a gpt-oss checkpoint ships one expert's `*_blocks` and `*_scales` (pass
them to `ExpertFormat.encode_native`), or as `quant.mxfp4.quantize` rounds
float weights (`ExpertFormat.encode`). The view runs them with the MXFP4
kernel, no copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mer.quant import mxfp4

if TYPE_CHECKING:
    from mer.quant.expert import ExpertFormat

NAME = "mxfp4"


def machine_fields(group_size: int) -> dict:
    return {}  # the block of 32 is the format's own


def check(fmt: ExpertFormat, n: int, k: int, what: str) -> None:
    mxfp4.check_shape(k, what)


def parts(fmt: ExpertFormat, n: int, k: int) -> list:
    nb = k // mxfp4.BLOCK
    return [("blocks", torch.uint8, (n, nb, 16)), ("scales", torch.uint8, (n, nb))]


def encode(fmt: ExpertFormat, w: torch.Tensor) -> dict[str, torch.Tensor]:
    blocks, scales = mxfp4.quantize(w)
    return {"blocks": blocks, "scales": scales}


def view(fmt: ExpertFormat, t: dict[str, torch.Tensor], n: int, k: int) -> mxfp4.Mxfp4Linear:
    return mxfp4.Mxfp4Linear(t["blocks"], t["scales"], n, k)
