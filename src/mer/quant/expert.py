"""One expert's bytes: how an expert FFN is laid out in its extent, and how to run it.

An expert is gate (w1), up (w3) and down (w2), with optional biases. Gate and up
are stored fused as one [2*ffn, hidden] matrix, gate rows first, so one kernel
call computes both. How each of the two matrices is stored is its scheme's
business (`quant/schemes/`: int4, int8, bf16, mxfp4); this module lays their
parts out kind by kind (every matrix's first part, then every matrix's second,
...), then the biases, each part 64-byte aligned, the extent padded to a
multiple of 4096 bytes so an O_DIRECT read lands it in a slot whole. `view`
turns a slot's bytes into ready-to-run weights without copying. The format
knows nothing about files: the store places extents, the cache owns slots. It
knows nothing about activations either: `ExpertWeights` exposes the two linear
maps, and its own call is the SwiGLU FFN most families use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mer.quant.schemes import REGISTRY, Linear, scheme

SCHEMES = tuple(REGISTRY)
BIAS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
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
class BiasedLinear:
    """y = x @ W.T + b, the bias added in x's dtype."""

    linear: Linear
    bias: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.bias.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.linear.dequantize()


@dataclass(frozen=True)
class ExpertWeights:
    """A runnable expert: the linear maps gate_up (x -> [gate | up]) and down, and by
    default the SwiGLU FFN down(silu(gate) * up)."""

    gate_up: Linear
    down: Linear
    ffn: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)  # [T, 2*ffn]
        return self.down(F.silu(h[:, : self.ffn]) * h[:, self.ffn :])


@dataclass(frozen=True)
class ExpertFormat:
    scheme: str
    hidden: int
    ffn: int
    group_size: int = 0  # int4 only
    layout: str = ""  # int4 only: packed nibble order the bytes were written in
    bias: str = ""  # "" for none, else the dtype ("float32", "bfloat16") of both biases
    parts: tuple[Part, ...] = field(init=False)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        s = scheme(self.scheme)
        if self.bias and self.bias not in BIAS_DTYPES:
            raise ValueError(f"unknown bias dtype {self.bias!r} (choose from float32, bfloat16)")
        for _, n, k, what in self._linears():
            s.check(self, n, k, what)
        specs = [[(f"{name}.{sfx}", dt, shape) for sfx, dt, shape in s.parts(self, n, k)]
                 for name, n, k, _ in self._linears()]  # fmt: skip
        ordered = [spec for kind in zip(*specs, strict=True) for spec in kind]
        if self.bias:
            dt = BIAS_DTYPES[self.bias]
            ordered += [("gate_up.bias", dt, (2 * self.ffn,)), ("down.bias", dt, (self.hidden,))]
        parts, off = [], 0
        for name, dtype, shape in ordered:
            p = Part(name, dtype, shape, off)
            parts.append(p)
            off = _align(off + p.nbytes, PART_ALIGN)
        object.__setattr__(self, "parts", tuple(parts))
        object.__setattr__(self, "nbytes", _align(off, EXTENT_ALIGN))

    def _linears(self) -> tuple[tuple[str, int, int, str], ...]:
        """(name, out dim, in dim, what to call it in errors) of the two matrices."""
        return (
            ("gate_up", 2 * self.ffn, self.hidden, "gate/up projection"),
            ("down", self.hidden, self.ffn, "down projection"),
        )

    @classmethod
    def for_machine(
        cls, scheme_name: str, hidden: int, ffn: int, group_size: int = 128, bias: str = ""
    ) -> ExpertFormat:
        """The format this machine's kernels consume directly."""
        fields = scheme(scheme_name).machine_fields(group_size)
        return cls(scheme_name, hidden, ffn, bias=bias, **fields)

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme,
            "hidden": self.hidden,
            "ffn": self.ffn,
            "group_size": self.group_size,
            "layout": self.layout,
            "bias": self.bias,
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ExpertFormat:
        return cls(
            d["scheme"],
            d["hidden"],
            d["ffn"],
            d.get("group_size", 0),
            d.get("layout", ""),
            d.get("bias", ""),
        )

    def encode_parts(
        self,
        w1: torch.Tensor,
        w2: torch.Tensor,
        w3: torch.Tensor,
        gate_up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
    ) -> dict:
        """Quantize one expert's HF weights (w1, w3 [ffn, hidden]; w2 [hidden, ffn]) into parts."""
        s = scheme(self.scheme)
        out = {}
        for name, w in (("gate_up", torch.cat([w1, w3], 0)), ("down", w2)):
            out.update({f"{name}.{sfx}": t for sfx, t in s.encode(self, w).items()})
        return out | self._bias_parts(gate_up_bias, down_bias)

    def _bias_parts(self, gate_up: torch.Tensor | None, down: torch.Tensor | None) -> dict:
        if not self.bias:
            if gate_up is not None or down is not None:
                raise ValueError("this expert format has no biases: give none")
            return {}
        if gate_up is None or down is None:
            raise ValueError("this expert format carries biases: give gate_up_bias and down_bias")
        dt = BIAS_DTYPES[self.bias]
        return {"gate_up.bias": gate_up.to(dt), "down.bias": down.to(dt)}

    def assemble(self, parts: dict) -> torch.Tensor:
        """Parts -> one zero-padded uint8 extent of `nbytes`."""
        unknown = set(parts) - {p.name for p in self.parts}
        if unknown:
            raise ValueError(f"{self.scheme} extent has no part {sorted(unknown)[0]}")
        buf = torch.zeros(self.nbytes, dtype=torch.uint8)
        for p in self.parts:
            t = parts.get(p.name)
            if t is None:
                raise ValueError(f"part {p.name}: missing")
            if t.dtype != p.dtype or tuple(t.shape) != p.shape:
                raise ValueError(
                    f"part {p.name}: got {t.dtype} {tuple(t.shape)}, want {p.dtype} {p.shape}"
                )
            buf[p.offset : p.offset + p.nbytes] = t.contiguous().reshape(-1).view(torch.uint8)
        return buf

    def encode(
        self,
        w1: torch.Tensor,
        w2: torch.Tensor,
        w3: torch.Tensor,
        gate_up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.assemble(self.encode_parts(w1, w2, w3, gate_up_bias, down_bias))

    def encode_native(
        self,
        gate_up: dict[str, torch.Tensor],
        down: dict[str, torch.Tensor],
        gate_up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """An extent from weights already in this scheme's own parts, kept bit for bit
        (e.g. a checkpoint's MXFP4 {"blocks", "scales"}, gate rows before up rows)."""
        parts = {f"gate_up.{k}": v for k, v in gate_up.items()}
        parts |= {f"down.{k}": v for k, v in down.items()}
        return self.assemble(parts | self._bias_parts(gate_up_bias, down_bias))

    def view(self, buf: torch.Tensor) -> ExpertWeights:
        """A slot's bytes (uint8, at least `nbytes`) -> runnable weights sharing that memory."""
        t = {
            p.name: buf[p.offset : p.offset + p.nbytes].view(p.dtype).view(p.shape)
            for p in self.parts
        }
        s = scheme(self.scheme)
        lin = {}
        for name, n, k, _ in self._linears():
            own = {sfx: t[f"{name}.{sfx}"] for sfx, _, _ in s.parts(self, n, k)}
            lin[name] = s.view(self, own, n, k)
            if self.bias:
                lin[name] = BiasedLinear(lin[name], t[f"{name}.bias"])
        expert = getattr(s, "expert", None)  # a scheme's own SwiGLU (int4: kernel per shape)
        if expert is not None and (not self.bias or getattr(s, "BIASED_EXPERTS", False)):
            return expert(lin["gate_up"], lin["down"], self.ffn)
        return ExpertWeights(lin["gate_up"], lin["down"], self.ffn)
