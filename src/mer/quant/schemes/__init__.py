"""The registry of expert quantization schemes: the one list of what a store can hold.

A scheme says how ONE linear map W [n, k] (out, in) is stored in an extent and
run from it: the parts it needs (name suffix, dtype, shape, in extent order),
how float weights become those parts, and how parts viewed in a slot become a
callable `x -> x @ W.T` that shares the slot's memory. It knows nothing about
experts (gate/up/down, biases, activation), files or slots: `quant/expert.py`
composes two linear maps into an extent, the store places extents, the cache
owns slots. Each scheme is one module here; a new one is added to `REGISTRY`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from mer.quant.schemes import bf16, int4, int4_sym, int8, mxfp4

if TYPE_CHECKING:
    from mer.quant.expert import ExpertFormat

PartSpec = tuple[str, torch.dtype, tuple[int, ...]]


class Linear(Protocol):
    """What a view returns: y = x @ W.T in x's dtype, and W itself in float32 for checks."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def dequantize(self) -> torch.Tensor: ...


class Scheme(Protocol):
    """The module interface every scheme implements (modules satisfy it structurally)."""

    NAME: str

    def machine_fields(self, group_size: int) -> dict:
        """ExpertFormat fields this machine's kernel wants (e.g. int4's group and layout)."""
        ...

    def check(self, fmt: ExpertFormat, n: int, k: int, what: str) -> None:
        """Raise ValueError unless W [n, k] can be stored under `fmt`."""
        ...

    def parts(self, fmt: ExpertFormat, n: int, k: int) -> list[PartSpec]: ...

    def encode(self, fmt: ExpertFormat, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float W [n, k] -> {suffix: tensor} matching `parts`."""
        ...

    def view(self, fmt: ExpertFormat, t: dict[str, torch.Tensor], n: int, k: int) -> Linear:
        """Parts viewed in a slot -> a runnable linear map sharing their memory."""
        ...


REGISTRY: dict[str, Scheme] = {m.NAME: m for m in (int4, int4_sym, int8, bf16, mxfp4)}


def scheme(name: str) -> Scheme:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown quantization scheme {name!r} (choose from {', '.join(REGISTRY)})"
        ) from None
