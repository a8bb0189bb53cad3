"""One expert's bytes: how an expert FFN is laid out in its extent, and how to run it.

An expert is gate (w1), up (w3) and down (w2). Gate and up are stored fused as
one [2*ffn, hidden] matrix so one kernel call computes both. The extent is a
sequence of parts, each 64-byte aligned, padded to a multiple of 4096 bytes so
an O_DIRECT read lands it in a slot whole; `view` turns a slot's bytes into
ready-to-run weights without copying. The format knows nothing about files:
the store places extents, the cache owns slots.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mer.quant import int4, int8

SCHEMES = ("int4", "int8", "bf16")
EXTENT_ALIGN = 4096
PART_ALIGN = 64


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Part:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class DenseLinear:
    """y = x @ W.T computed in x's dtype (so float32 runs give exact parity checks)."""

    w: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w.to(x.dtype))

    def dequantize(self) -> torch.Tensor:
        return self.w.float()


@dataclass(frozen=True)
class ExpertWeights:
    """A runnable expert: SwiGLU FFN down(silu(gate(x)) * up(x))."""

    gate_up: object
    down: object
    ffn: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)  # [T, 2*ffn]
        return self.down(F.silu(h[:, : self.ffn]) * h[:, self.ffn :])


def _parts_for(scheme: str, hidden: int, ffn: int, group_size: int) -> list[tuple]:
    """(name, dtype, shape) of each part, in extent order."""
    if scheme == "int4":
        return [
            ("gate_up.packed", torch.uint8, (2 * ffn, hidden // 2)),
            ("down.packed", torch.uint8, (hidden, ffn // 2)),
            ("gate_up.scales_zeros", torch.bfloat16, (hidden // group_size, 2 * ffn, 2)),
            ("down.scales_zeros", torch.bfloat16, (ffn // group_size, hidden, 2)),
        ]
    if scheme == "int8":
        return [
            ("gate_up.q", torch.int8, (2 * ffn, hidden)),
            ("down.q", torch.int8, (hidden, ffn)),
            ("gate_up.scales", torch.bfloat16, (2 * ffn,)),
            ("down.scales", torch.bfloat16, (hidden,)),
        ]
    if scheme == "bf16":
        return [
            ("gate_up.w", torch.bfloat16, (2 * ffn, hidden)),
            ("down.w", torch.bfloat16, (hidden, ffn)),
        ]
    raise ValueError(f"unknown quantization scheme {scheme!r} (choose from {', '.join(SCHEMES)})")


@dataclass(frozen=True)
class ExpertFormat:
    scheme: str
    hidden: int
    ffn: int
    group_size: int = 0  # int4 only
    layout: str = ""  # int4 only: packed nibble order the bytes were written in
    parts: tuple[Part, ...] = field(init=False)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        if self.scheme == "int4":
            int4.check_shape(2 * self.ffn, self.hidden, self.group_size, "gate/up projection")
            int4.check_shape(self.hidden, self.ffn, self.group_size, "down projection")
            if self.layout not in int4.LAYOUTS:
                raise ValueError(f"unknown int4 layout {self.layout!r}")
        parts, off = [], 0
        for name, dtype, shape in _parts_for(self.scheme, self.hidden, self.ffn, self.group_size):
            p = Part(name, dtype, shape, off)
            parts.append(p)
            off = _align(off + p.nbytes, PART_ALIGN)
        object.__setattr__(self, "parts", tuple(parts))
        object.__setattr__(self, "nbytes", _align(off, EXTENT_ALIGN))

    @classmethod
    def for_machine(cls, scheme: str, hidden: int, ffn: int, group_size: int = 128):
        """The format this machine's kernels consume directly."""
        if scheme != "int4":
            return cls(scheme, hidden, ffn)
        return cls(scheme, hidden, ffn, group_size, int4.kernel_layout())

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme,
            "hidden": self.hidden,
            "ffn": self.ffn,
            "group_size": self.group_size,
            "layout": self.layout,
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ExpertFormat:
        return cls(d["scheme"], d["hidden"], d["ffn"], d.get("group_size", 0), d.get("layout", ""))

    def encode_parts(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> dict:
        """Quantize one expert's HF weights (w1, w3 [ffn, hidden]; w2 [hidden, ffn]) into parts."""
        gate_up = torch.cat([w1, w3], 0)
        if self.scheme == "int4":
            out = {}
            for name, w in (("gate_up", gate_up), ("down", w2)):
                q, scales, zeros = int4.quantize(w, self.group_size)
                out[f"{name}.packed"] = int4.pack(q, self.layout)
                out[f"{name}.scales_zeros"] = int4.pack_scales_zeros(scales, zeros)
            return out
        if self.scheme == "int8":
            (gq, gs), (dq, ds) = int8.encode(gate_up), int8.encode(w2)
            return {"gate_up.q": gq, "gate_up.scales": gs, "down.q": dq, "down.scales": ds}
        return {"gate_up.w": gate_up.to(torch.bfloat16), "down.w": w2.to(torch.bfloat16)}

    def assemble(self, parts: dict) -> torch.Tensor:
        """Parts -> one zero-padded uint8 extent of `nbytes`."""
        buf = torch.zeros(self.nbytes, dtype=torch.uint8)
        for p in self.parts:
            t = parts[p.name]
            if t.dtype != p.dtype or tuple(t.shape) != p.shape:
                raise ValueError(f"part {p.name}: got {t.dtype} {tuple(t.shape)}, want {p.shape}")
            buf[p.offset : p.offset + p.nbytes] = t.contiguous().reshape(-1).view(torch.uint8)
        return buf

    def encode(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
        return self.assemble(self.encode_parts(w1, w2, w3))

    def view(self, buf: torch.Tensor) -> ExpertWeights:
        """A slot's bytes (uint8, at least `nbytes`) -> runnable weights sharing that memory."""
        t = {
            p.name: buf[p.offset : p.offset + p.nbytes].view(p.dtype).view(p.shape)
            for p in self.parts
        }
        if self.scheme == "int4":
            gate_up = self._int4(
                t["gate_up.packed"], t["gate_up.scales_zeros"], 2 * self.ffn, self.hidden
            )
            down = self._int4(t["down.packed"], t["down.scales_zeros"], self.hidden, self.ffn)
        elif self.scheme == "int8":
            gate_up = int8.Int8Linear(t["gate_up.q"], t["gate_up.scales"])
            down = int8.Int8Linear(t["down.q"], t["down.scales"])
        else:
            gate_up, down = DenseLinear(t["gate_up.w"]), DenseLinear(t["down.w"])
        return ExpertWeights(gate_up, down, self.ffn)

    def _int4(self, packed, sz, n, k) -> int4.Int4Linear:
        machine = int4.kernel_layout()
        if self.layout != machine:
            # A store written on another CPU family: correct, but each read pays a repack.
            _warn_repack(self.layout, machine)
            packed = int4.pack(int4.unpack(packed, n, k, self.layout), machine)
        return int4.Int4Linear(packed, sz, self.group_size, n, k)


_warned: set[tuple[str, str]] = set()


def _warn_repack(stored: str, machine: str) -> None:
    if (stored, machine) not in _warned:
        _warned.add((stored, machine))
        warnings.warn(
            f"store packs int4 as {stored}, this CPU's kernel wants {machine}: "
            "experts are repacked on every read (re-convert the store on this machine to avoid it)",
            stacklevel=3,
        )
