"""The int4 scheme: group-wise asymmetric int4 in the packed layout of PyTorch's CPU kernel.

Parts: `packed` uint8 [n, k/2] in the nibble layout the format records, and
`scales_zeros` bf16 [k/G, n, 2]. A view feeds the bytes to the kernel as they
lie, unless the store was packed for another CPU family's kernel: then each
view repacks (correct, slower) and says so once.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from mer.quant import int4

if TYPE_CHECKING:
    from mer.quant.expert import ExpertFormat

NAME = "int4"


def machine_fields(group_size: int) -> dict:
    return {"group_size": group_size, "layout": int4.kernel_layout()}


def check(fmt: ExpertFormat, n: int, k: int, what: str) -> None:
    int4.check_shape(n, k, fmt.group_size, what)
    if fmt.layout not in int4.LAYOUTS:
        raise ValueError(f"unknown int4 layout {fmt.layout!r}")


def parts(fmt: ExpertFormat, n: int, k: int) -> list:
    return [
        ("packed", torch.uint8, (n, k // 2)),
        ("scales_zeros", torch.bfloat16, (k // fmt.group_size, n, 2)),
    ]


def encode(fmt: ExpertFormat, w: torch.Tensor) -> dict[str, torch.Tensor]:
    q, scales, zeros = int4.quantize(w, fmt.group_size)
    return {
        "packed": int4.pack(q, fmt.layout),
        "scales_zeros": int4.pack_scales_zeros(scales, zeros),
    }


def view(fmt: ExpertFormat, t: dict[str, torch.Tensor], n: int, k: int) -> int4.Int4Linear:
    packed = packed_for_machine(fmt, t["packed"], n, k)
    return int4.Int4Linear(packed, t["scales_zeros"], fmt.group_size, n, k)


def packed_for_machine(fmt: ExpertFormat, packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The nibbles in this machine's kernel layout: as they lie, or repacked (correct, but
    each read pays it) from a store written on another CPU family."""
    machine = int4.kernel_layout()
    if fmt.layout == machine:
        return packed
    _warn_repack(fmt.layout, machine)
    return int4.pack(int4.unpack(packed, n, k, fmt.layout), machine)


BIASED_EXPERTS = True  # `expert` takes BiasedLinear maps too


def expert(gate_up, down, ffn: int):
    """The SwiGLU expert over these weights (Int4Linear, or BiasedLinear of one: gpt-oss),
    whose linear maps take the path measured fastest here per token count
    (quant/int4_paths.py)."""
    # int4_paths builds on quant.expert, which imports us
    from mer.quant.int4_paths import Int4Expert, biased_expert

    if isinstance(gate_up, int4.Int4Linear):
        return Int4Expert(gate_up, down, ffn)
    return biased_expert(gate_up.linear, gate_up.bias, down.linear, down.bias, ffn)


_warned: set[tuple[str, str]] = set()


def _warn_repack(stored: str, machine: str) -> None:
    if (stored, machine) not in _warned:
        _warned.add((stored, machine))
        warnings.warn(
            f"store packs int4 as {stored}, this CPU's kernel wants {machine}: "
            "experts are repacked on every read (re-convert the store on this machine to avoid it)",
            stacklevel=5,
        )
