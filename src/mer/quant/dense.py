"""Compact dense weights: the resident matrices (attention, shared experts, dense layers,
the output head) held at 8 or 4 bits, run by PyTorch's CPU kernels or mer's C kernels.

`linear(x, w, bias)` is the one seam the model calls: `w` is a plain tensor
(F.linear, unchanged: bf16 dense weights and float32 runs stay exact) or a
quantized weight, which computes x @ W.T itself. Int8 is symmetric per output
channel (`aten._weight_int8pack_mm`, or for one bf16 token mer's VNNI GEMV where it measures
faster, `mer.quant.int8_gemv`); int4 is group-wise asymmetric, the same
layout as int4 experts (`mer.quant.int4`), run by PyTorch's int4 kernel or mer's C kernels
(float32, or int8 activations), whichever measures faster for the shape and token count
(`mer.quant.dense_paths`; `prepare` measures a model's one-token paths as it opens).
`quantize_dense` chooses what is quantized: only the matrices named in
`QUANTIZED`; norms, routers, biases, the embedding table and anything a family
keeps in float32 stay exact. Quantizing goes a block of rows at a time, so a matrix
is never held in float32 whole (the output head of a 32k vocabulary would be 0.5 GiB).
`named_parts` / `from_parts` give a weight's tensors and what describes them, for a
store to write and read back; this module knows nothing about files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mer.quant import bf16_gemv, dense_paths, int4, int8_gemv

DENSE_QUANTS = ("bf16", "int8", "int4")
ROWS_PER_BLOCK = 1024  # rows quantized at a time (a multiple of every int4 layout's block)
# Short names (after `layers.{i}.`) and global names of the matrices that may be quantized.
QUANTIZED = frozenset(
    {"q", "k", "v", "o", "shared.gate", "shared.up", "shared.down", "mlp.gate", "mlp.up"}
    | {"mlp.down", "lm_head"}
    | {"q_a", "q_b", "kv_a", "kv_b"}  # DeepSeek's latent attention (MLA)
)


@dataclass(frozen=True)
class Int8Weight:
    """W [n, k] ~= data (int8) * scales[:, None] (float32, per output channel)."""

    data: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8Weight:
        data = torch.empty(w.shape, dtype=torch.int8)
        scales = torch.empty(w.shape[0], dtype=torch.float32)
        for rows in _blocks(w.shape[0]):
            b = w[rows].float()
            s = (b.abs().amax(1) / 127).clamp_min(1e-10)
            data[rows] = torch.round(b / s[:, None]).clamp_(-127, 127).to(torch.int8)
            scales[rows] = s
        return cls(data, scales)

    def named_parts(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"scheme": "int8"}, {"data": self.data, "scales": self.scales}

    @classmethod
    def from_parts(cls, meta: dict, parts: dict[str, torch.Tensor]) -> Int8Weight:
        return cls(parts["data"], parts["scales"])

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_gemv.gemv(x, self.data, self.scales)  # one bf16 token: the faster measured
        if y is not None:
            return y
        lead = x.shape[:-1]
        x2 = int8_gemv.rounded_like_gemv(x.reshape(-1, x.shape[-1]), self.data, self.scales)
        y = int8_gemv.torch_int8(x2.contiguous(), self.data, self.scales)
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
        # Blocks of whole kernel blocks pack as the matrix would whole (only the last may
        # end in a partial block, as the whole matrix's last does).
        packed = torch.empty(n, k // 2, dtype=torch.uint8)
        scales_zeros = torch.empty(k // g, n, 2, dtype=torch.bfloat16)
        for rows in _blocks(n):
            packed[rows], scales_zeros[:, rows] = int4.encode(w[rows].float(), g)
        return cls(int4.Int4Linear(packed, scales_zeros, g, n, k))

    def named_parts(self) -> tuple[dict, dict[str, torch.Tensor]]:
        lin = self.linear
        meta = {"scheme": "int4", "group_size": lin.group_size, "layout": int4.kernel_layout()}
        return meta, {"packed": lin.packed, "scales_zeros": lin.scales}

    @classmethod
    def from_parts(cls, meta: dict, parts: dict[str, torch.Tensor]) -> Int4Weight:
        """From stored parts; packed for another CPU's layout, repacked for this one's."""
        packed, sz = parts["packed"], parts["scales_zeros"]
        n, k = packed.shape[0], packed.shape[1] * 2
        if meta["layout"] != int4.kernel_layout():
            packed = int4.pack(int4.unpack(packed, n, k, meta["layout"]), int4.kernel_layout())
        return cls(int4.Int4Linear(packed, sz, meta["group_size"], n, k))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.linear.n, self.linear.k))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = dense_paths.matmul(self.linear, x.reshape(-1, x.shape[-1]).contiguous())
        return y.view(*lead, -1)

    def dequantize(self) -> torch.Tensor:
        return self.linear.dequantize()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.linear.packed, self.linear.scales


QuantWeight = Int8Weight | Int4Weight
SCHEMES = {"int8": Int8Weight, "int4": Int4Weight}  # a stored weight's scheme -> its type
# Each scheme's parts: name -> (dtype, shape for a weight [n, k] with int4 group size g).
PARTS = {
    "int8": {"data": (torch.int8, lambda n, k, g: [n, k]),
             "scales": (torch.float32, lambda n, k, g: [n])},
    "int4": {"packed": (torch.uint8, lambda n, k, g: [n, k // 2]),
             "scales_zeros": (torch.bfloat16, lambda n, k, g: [k // g, n, 2])},
}  # fmt: skip


def _blocks(n: int):
    for start in range(0, n, ROWS_PER_BLOCK):
        yield slice(start, min(n, start + ROWS_PER_BLOCK))


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) for a plain tensor or a quantized weight."""
    if isinstance(w, torch.Tensor):
        y = bf16_gemv.gemv(x, w)  # one bf16 token: the faster measured GEMV
        if y is not None:
            return y if bias is None else y + bias
        return F.linear(x, w, bias)
    y = w(x)
    return y if bias is None else y + bias


def concat_rows(ws: list) -> torch.Tensor | QuantWeight | None:
    """The matrices `ws` (each [n_i, k]) stacked by rows into one [sum n_i, k] in their own
    scheme, so that one call computes every output (each row as its own matrix's row); None
    where they cannot be: mixed schemes, dtypes, widths or int4 groups, or an int4 part
    other than the last ending in a partial kernel block."""
    first = ws[0]
    if any(type(w) is not type(first) or w.shape[1] != first.shape[1] for w in ws):
        return None
    if isinstance(first, torch.Tensor):
        if first.dim() != 2 or any(w.dtype != first.dtype for w in ws):
            return None
        return torch.cat(ws)
    if isinstance(first, Int8Weight):
        return Int8Weight(torch.cat([w.data for w in ws]), torch.cat([w.scales for w in ws]))
    if isinstance(first, Int4Weight):
        lins = [w.linear for w in ws]
        block = int4.LAYOUTS[int4.kernel_layout()][0]
        if any(lin.group_size != lins[0].group_size for lin in lins):
            return None
        if any(lin.n % block for lin in lins[:-1]):
            return None
        packed = torch.cat([lin.packed for lin in lins])
        sz = torch.cat([lin.scales for lin in lins], 1)
        n = sum(lin.n for lin in lins)
        return Int4Weight(int4.Int4Linear(packed, sz, lins[0].group_size, n, lins[0].k))
    return None


def prepare(weights: dict[str, object], dtype: torch.dtype) -> None:
    """Choose now the one-token kernels of a model's dense matrices (`weights` by name, in
    the model's order; `dtype` its activations'), so its first decode step measures nothing:
    the bf16 and int8 GEMVs per shape (`bf16_gemv`, `int8_gemv`) and the int4 decode path
    by decode passes over the model's own matrices (`dense_paths.prepare`)."""
    bf16_gemv.prepare(weights.values())
    if dtype == torch.bfloat16:  # the int8 GEMV rounds activations: bf16 runs only
        for w in weights.values():
            if isinstance(w, Int8Weight) and w.data.shape[1] % int8_gemv.GROUP == 0:
                int8_gemv.c_is_faster(w.data, w.scales)
    dense_paths.prepare(weights.items(), dtype)


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
