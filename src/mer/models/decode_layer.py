"""A lone decode token through a layer's attention half in one C call.

Between its matrix products a decode token of a many-expert model crossed a dozen Python
wrappers a layer (two norms, the q/k/v and o projections with their path lookups, the
attention call, the residual add, the router), each cheap alone but together about a
tenth of a Qwen3-30B-A3B-shaped token once every weight is in RAM. Where a layer is the
default families' (their attention and router, q, k and v stacked into one int4 matrix and
o int4, both on the int8-activation kernel for one token, `mer.quant.dense_paths`),
`rowops.c`'s decode_attention_bf16 runs it all: norm, projection, `rowops.attend_decode`'s
steps, o, the residual added into x in place, the FFN norm and the router's top k. Each
step is the kernel its own call runs, so the bits are the Python path's (tests compare
them); a layer or a step where anything differs keeps the Python path.

What a layer's call reads is set once (`DecodeLayer`, one per layer and thread with that
thread's scratch); a call passes only the token's x, its cache row and mask.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from mer.models import rowops
from mer.models.family import Family
from mer.quant import dense_paths, int4_paths
from mer.quant.dense import Int4Weight

BF16 = torch.bfloat16
_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class DecodeLayer(ctypes.Structure):
    """rowops.c's decode_layer: pointers and sizes of one layer, one thread's scratch."""

    _fields_ = [
        *((n, _p) for n in ("attn_norm", "ffn_norm", "q_norm", "k_norm", "router")),
        *((n, _p) for n in ("qkv_packed", "qkv_scales", "o_packed", "o_scales")),
        ("qkv_linear", _p), ("o_linear", _p),
        *((n, _i64) for n in ("qkv_group", "o_group", "qkv_threads", "o_threads",
                               "route_threads", "H", "Hq", "Hkv", "D", "Dv", "E", "top_k",
                               "renormalise")),
        ("eps", _f32), ("scale", _f32),
        *((n, _p) for n in ("xf", "sx", "xs", "y", "logits", "xq", "qkv", "qr", "attn", "o")),
    ]  # fmt: skip


@dataclass(frozen=True)
class _Plan:
    """One layer's part of a DecodeLayer that every thread shares, and what keeps it alive."""

    fields: dict
    keep: tuple
    sizes: dict  # scratch sizes (elements)


def _c_int8(w, x_width: int) -> tuple | None:
    """(Int4Linear, threads) where `w` is an int4 weight whose one-token path is the
    int8-activation C kernel, else None."""
    if not isinstance(w, Int4Weight):
        return None
    lin = w.linear
    if lin.k != x_width or not int4_paths.int8_available(lin.symmetric):
        return None
    path = dense_paths.path_for(lin, torch.zeros(1, lin.k, dtype=BF16))
    if path not in ("c-int8", "c-int8-1"):
        return None
    return lin, 1 if path.endswith("-1") else int4_paths.threads_for(lin.packed.nbytes)


def _bf16(t, shape) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == BF16 and t.is_contiguous() and (
        tuple(t.shape) == tuple(shape))  # fmt: skip


def plan(m, i: int) -> _Plan | None:
    """Layer `i` of model `m` as the C call runs it, or None where it does not apply."""
    cfg, w, fam, p = m.config, m.w, m.family, f"layers.{i}."
    cls = type(fam)  # what the C call computes is the defaults' attention (and router)
    defaults = fam._default_attention and cls.attention is Family.attention
    if m.dtype != BF16 or not (defaults and cls._attend_decode is Family._attend_decode):
        return None
    if rowops._lib() is None or p + "qkv_bias" in w or i not in m.qkv_rows:
        return None
    (hkv, d), (hkv_v, dv) = fam.kv_shapes(cfg)
    hq, hidden = cfg.num_attention_heads, cfg.hidden_size
    if hkv != hkv_v or m.qkv_rows[i] != [hq * d, hkv * d, hkv * dv]:
        return None
    if d % 2 or d > 512 or dv > 512 or hq % hkv or hq // hkv > 64:
        return None
    qkv, o = _c_int8(w.get(p + "qkv"), hidden), _c_int8(w.get(p + "o"), hq * dv)
    if qkv is None or o is None or o[0].n != hidden:
        return None
    norms = [w.get(p + "attn_norm"), w.get(p + "ffn_norm")]
    if not all(_bf16(n, (hidden,)) for n in norms):
        return None
    qk = [w.get(p + "q_norm"), w.get(p + "k_norm")] if cfg.qk_norm == "head" else [None, None]
    if cfg.qk_norm == "head" and not all(_bf16(n, (d,)) for n in qk):
        return None
    router, e = None, 0
    if cfg.is_moe_layer(i) and cls.route is Family.route:
        r = w.get(p + "router")
        if isinstance(r, torch.Tensor) and _bf16(r, (r.shape[0], hidden)):
            if 0 < cfg.num_experts_per_tok <= r.shape[0] <= 4096:  # route_bf16's limits
                router, e = r, r.shape[0]
    fns = {s: ctypes.cast(int4_paths._lib(s).int4_linear_i8_bf16, _p).value for s in (
        qkv[0].symmetric, o[0].symmetric)}  # fmt: skip
    fields = dict(
        attn_norm=norms[0].data_ptr(), ffn_norm=norms[1].data_ptr(),
        q_norm=qk[0].data_ptr() if qk[0] is not None else None,
        k_norm=qk[1].data_ptr() if qk[1] is not None else None,
        router=router.data_ptr() if router is not None else None,
        qkv_packed=qkv[0].packed.data_ptr(), qkv_scales=qkv[0].scales.data_ptr(),
        o_packed=o[0].packed.data_ptr(), o_scales=o[0].scales.data_ptr(),
        qkv_linear=fns[qkv[0].symmetric], o_linear=fns[o[0].symmetric],
        qkv_group=qkv[0].group_size, o_group=o[0].group_size,
        qkv_threads=qkv[1], o_threads=o[1],
        route_threads=rowops._threads(e * hidden), H=hidden, Hq=hq, Hkv=hkv, D=d, Dv=dv, E=e,
        top_k=cfg.num_experts_per_tok if router is not None else 0,
        renormalise=int(bool(cfg.norm_topk_prob)), eps=cfg.rms_norm_eps, scale=d**-0.5,
    )  # fmt: skip
    widths = (hidden, hq * dv)
    groups = min(qkv[0].group_size, o[0].group_size)
    sizes = dict(xf=max(widths), sx=max(widths) // groups, xs=max(widths) // groups,
                 y=max(qkv[0].n, hidden), logits=max(e, 1), xq=max(widths),
                 qkv=qkv[0].n, qr=hq * d, attn=hq * dv, o=hidden)  # fmt: skip
    return _Plan(fields, (norms, qk, router, qkv[0], o[0]), sizes)


class DecodeAttention:
    """A model's layers as decode_attention_bf16 runs them: `run` is the call."""

    def __init__(self, m) -> None:
        self.threads = torch.get_num_threads()
        self.plans = [plan(m, i) for i in range(m.config.num_hidden_layers)]
        self._local = threading.local()
        lib = rowops._lib()
        self._fn = lib.decode_attention_bf16 if lib is not None and any(self.plans) else None

    def applies(self, i: int) -> bool:
        return self._fn is not None and self.plans[i] is not None

    def _layer(self, i: int) -> DecodeLayer:
        """Layer i's struct for this thread (its scratch shared by the thread's layers)."""
        mine = getattr(self._local, "layers", None)
        if mine is None:
            mine = self._local.layers = {}
        layer = mine.get(i)
        if layer is None:
            plan_ = self.plans[i]
            scratch = getattr(self._local, "scratch", {})
            dtypes = {"xq": torch.int8, "qkv": BF16, "qr": BF16, "attn": BF16, "o": BF16}
            for name, n in plan_.sizes.items():
                have = scratch.get(name)
                if have is None or have.numel() < n:
                    scratch[name] = torch.empty(n, dtype=dtypes.get(name, torch.float32))
            self._local.scratch = scratch
            layer = DecodeLayer(**plan_.fields, **{n: scratch[n].data_ptr() for n in plan_.sizes})
            # a grown scratch buffer must not leave an earlier layer's struct pointing at freed
            # memory: the structs hold their buffers
            layer.held = tuple(scratch[n] for n in plan_.sizes)
            mine[i] = layer
        return layer

    def run(self, i: int, x: torch.Tensor, kv, mask: torch.Tensor, rope, route: bool):
        """Layer i's attention half for x [1, H] (updated in place: x += attention) of a
        sequence whose cache `kv` has room for it: (h [1, H] the FFN-normed x, (weights,
        ids) of the router or None where the layer does not route here or `route` is
        False). The caller checked `applies(i)`."""
        cos, sin = rope
        buffers = getattr(kv, "layer", None)
        pos = kv.length
        if buffers is None or pos >= kv.capacity or mask.shape != (1, pos + 1):
            return None
        if mask.dtype != torch.bool or not mask.is_cpu:
            return None
        layer = self._layer(i)
        if cos.numel() != layer.D or not (cos.is_contiguous() and sin.is_contiguous()):
            return None
        hq, d, dv = layer.Hq, layer.D, layer.Dv
        scores = getattr(self._local, "scores", None)
        if scores is None or scores.numel() < hq * (pos + 1):  # grown by doubling
            scores = self._local.scores = torch.empty(hq * max(2 * (pos + 1), 256))
        h = torch.empty(1, layer.H, dtype=BF16)
        routed = None
        weights = ids = None
        if route and layer.router:
            weights = torch.empty(1, layer.top_k)
            ids = torch.empty(1, layer.top_k, dtype=torch.int64)
            routed = (weights, ids)
        kc, vc = buffers(i)
        mask = mask.contiguous()
        self._fn(ctypes.byref(layer), x.data_ptr(), h.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                 kc.data_ptr(), vc.data_ptr(), pos, mask.data_ptr(), scores.data_ptr(),
                 None if weights is None else weights.data_ptr(),
                 None if ids is None else ids.data_ptr(),
                 rowops._threads(hq * (pos + 1) * (d + dv)))  # fmt: skip
        return h, routed
