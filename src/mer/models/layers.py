"""Shared transformer pieces as plain functions over tensors: norm, rotary, attention, MoE.

Families assemble these; none of them owns weights or knows where experts
come from. The MoE block takes an expert provider (`ExpertProvider`), so the same
code runs against the SSD-backed cache or, in tests, experts held in memory.
"""

from __future__ import annotations

import functools
import math
from contextlib import ExitStack
from typing import Protocol

import torch
import torch.nn.functional as F

from mer.models import rowops
from mer.quant.dense import linear
from mer.quant.int4_paths import decode_group


class ExpertProvider(Protocol):
    """Where the MoE block gets experts, addressed by (layer, expert)."""

    def use(self, layer: int, expert: int): ...  # context manager yielding a callable FFN

    def is_resident(self, layer: int, expert: int) -> bool: ...

    def fetch(self, layer: int, experts) -> int: ...  # start reading these: needed now

    def next_step(self) -> None: ...  # one forward pass ends, the next begins

    # Optional: acquire_resident(layer, experts) -> [weights] | None holds every one of them
    # at once if all are in RAM (else holds nothing), release_all(layer, experts) lets go.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as the reference implementations do: bfloat16 rows in one
    C call (`rowops`), others by `rms_norm_torch`."""
    out = rowops.rms_norm(x, weight, eps)
    return rms_norm_torch(x, weight, eps) if out is None else out


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Rotary:
    """Rotate-half RoPE with cos/sin tables built once for the model's context.

    `inv_freq` replaces the plain frequencies (a scaled rope's, e.g. `yarn`), and
    `attention_factor` multiplies both tables, as the reference implementations do."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        max_positions: int,
        inv_freq: torch.Tensor | None = None,
        attention_factor: float = 1.0,
    ) -> None:
        if inv_freq is None:
            inv_freq = 1.0 / theta ** (
                torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
            )
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], -1)  # [P, D]
        self.cos, self.sin = emb.cos(), emb.sin()
        if attention_factor != 1.0:
            self.cos, self.sin = self.cos * attention_factor, self.sin * attention_factor

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """(cos, sin) [T, 1, D] for `positions`, sin's first half negated (`apply_rotary`):
        gathered once per forward, used by every layer."""
        cos, sin = self.cos[positions], self._sin_signed[positions]
        return cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)

    @functools.cached_property
    def _sin_signed(self) -> torch.Tensor:
        half = self.sin.shape[-1] // 2
        return torch.cat([-self.sin[:, :half], self.sin[:, half:]], -1)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched `scale` times."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn(dim: int, theta: float, p: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN rope scaling (arXiv 2309.00071): (inv_freq [dim/2], attention factor) from the
    config's parameters `p` (factor, original_max_position_embeddings, beta_fast, beta_slow,
    mscale, mscale_all_dim, attention_factor, truncate), as transformers computes them.
    Low frequencies are interpolated by `factor`, high ones kept, a linear ramp between."""
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_positions / orig
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    keep = 1 - ramp  # share of the original (extrapolated) frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention_factor)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by tables from `Rotary.tables`: rotate-half, x * cos +
    (-x2, x1) * sin, written as x * cos + (x2, x1) * (-sin1, sin2), the same bits in four ops
    instead of seven; bfloat16 in one C call with the same bits (`rowops.rope`)."""
    out = rowops.rope(x, cos, sin)
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin if out is None else out


def causal_mask(q_positions: torch.Tensor, kv_len: int, sliding_window: int | None):
    """[T, S] bool: which of positions 0..S-1 each query may attend to, the last
    `sliding_window` positions up to its own if given."""
    kv_pos = torch.arange(kv_len)
    allowed = kv_pos[None, :] <= q_positions[:, None]
    if sliding_window is not None:
        allowed &= kv_pos[None, :] > q_positions[:, None] - sliding_window
    return allowed


# Attention scores (query heads x queries x keys) computed at once, at most: more queries
# go in chunks of as many as fit (see `attention`).
SMALL_ATTENTION = 1 << 22


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    sinks: torch.Tensor | None = None,
    scale: float | None = None,
):
    """GQA attention. q [T, Hq, D]; k [S, Hkv, D]; v [S, Hkv, Dv]; mask [T, S] -> [T, Hq*Dv].
    Scores are scaled by `scale`, by default D ** -0.5.

    Grouped heads share keys and values (no copy of the cache per head). Plain batched
    matmuls in float32, on as many queries at a time as keep the scores within 16 MiB of
    float32: on the 2-core test machine they ran 2-4x faster than PyTorch's fused kernel
    in bf16 for decode steps and prefill chunks alike, and are at least as exact; in chunks
    past that, still about 2x (256 queries over 1280 keys, 32 heads over 4: 39 against
    62 ms; 2048 over 2048: 0.50 against 0.98 s), where the fused kernel had been taken.

    `sinks` [Hq] (gpt-oss): a learned logit per head that joins each softmax's
    denominator and attends to nothing, so a head may give less than all of its
    weight to the keys.

    One bfloat16 query (a decode step's) takes one C call (`rowops.attend_one`), whether
    its sequence decodes alone or beside others."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = rowops.attend_one(q, k, v, mask, sinks, scale)
    return attention_torch(q, k, v, mask, sinks, scale) if out is None else out


def attention_torch(q, k, v, mask, sinks, scale: float) -> torch.Tensor:
    """`attention` in PyTorch ops."""
    t, hq, d = q.shape
    s, hkv, dv = k.shape[0], k.shape[1], v.shape[2]
    if t > 1 and hq * t * s > SMALL_ATTENTION:
        step = max(1, SMALL_ATTENTION // (hq * s))
        chunks = [
            attention_torch(q[a : a + step], k, v, mask[a : a + step], sinks, scale)
            for a in range(0, t, step)
        ]
        return torch.cat(chunks)
    g = hq // hkv
    qg = q.float().view(t, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * t, d)
    scores = torch.bmm(qg, k.float().permute(1, 2, 0)).mul_(scale)  # [Hkv, G*T, S]
    scores = scores.view(hkv, g, t, s).masked_fill_(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(hkv, g, 1, 1).expand(hkv, g, t, 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), dim=-1)[..., :s]
        probs = probs.reshape(hkv, g * t, s)
    else:
        probs = torch.softmax(scores, dim=-1).view(hkv, g * t, s)
    out = torch.bmm(probs, v.float().transpose(0, 1))  # [Hkv, G*T, Dv]
    return out.view(hkv, g, t, dv).permute(2, 0, 1, 3).reshape(t, hq * dv).to(q.dtype)


def route(
    x: torch.Tensor,
    gate: torch.Tensor,
    top_k: int,
    renormalise: bool = True,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep top-k, optionally renormalise: (weights [T, k] fp32, ids).

    `allowed` (bool [E]) restricts the choice to those experts, as if the others did not
    exist (fewer than top-k if fewer are allowed). BFloat16 rows take one C call
    (`rowops.route`), each row alone, so a token routes alike in any batch."""
    out = rowops.route(x, gate, top_k, renormalise) if allowed is None else None
    return route_torch(x, gate, top_k, renormalise, allowed) if out is None else out


def route_torch(x, gate, top_k: int, renormalise: bool = True, allowed=None):
    """`route` in PyTorch ops."""
    logits = F.linear(x, gate).float()  # [T, E]
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
        top_k = min(top_k, int(allowed.sum()))
    probs = F.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def route_grouped(
    x: torch.Tensor,
    gate: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    bias: torch.Tensor | None = None,
    renormalise: bool = False,
    scale: float = 1.0,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's router, in float32: (weights [T, k], ids [T, k]).

    Scores are the softmax (DeepSeek-V2) or the sigmoid (V3, R1, GLM-4.5) of the
    router logits. Experts are chosen by score plus `bias` (V3's correction bias:
    it steers the choice, never the weights) within the `topk_group` best of
    `n_group` groups, a group scored by its best expert (`max`, V2) or its best two
    (`top2`, V3). The weights are the chosen experts' scores, renormalised if asked,
    times `scale` (`routed_scaling_factor`). `allowed` (bool [E], a draft's) limits
    the choice to those experts, groups aside: a draft's routing only approximates."""
    logits = F.linear(x.float(), gate.float())  # [T, E]
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
        top_k = min(top_k, int(allowed.sum()))
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias
    t, e = choice.shape
    if allowed is not None:
        choice = choice.masked_fill(~allowed, float("-inf"))
    elif topk_group < n_group:
        groups = choice.view(t, n_group, e // n_group)
        if group_score == "max":
            group_scores = groups.max(-1).values  # [T, G]
        else:
            group_scores = groups.topk(2, dim=-1).values.sum(-1)
        best = torch.topk(group_scores, topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalise:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scale, ids


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
    """A resident SwiGLU MLP: down(silu(gate(x)) * up(x))."""
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    layer: int,
    experts: ExpertProvider,
) -> torch.Tensor:
    """Sum of each token's experts weighted by the router. x [T, H] -> [T, H].

    Each distinct expert of the batch is acquired once and runs on all of its
    tokens. Experts already in RAM are held first, so that reading the missing
    ones cannot evict them before their turn; then the missing ones are all
    asked for at once, so their reads run in parallel (and behind the resident
    experts' compute) instead of one after another.

    Each token's expert outputs are summed in expert order, whatever was cached:
    the result never depends on the cache. The token-expert pairs are sorted by
    expert once, so each expert runs on a contiguous slice (a gather and a scatter
    per layer, not per expert); a single token needs neither (`_moe_one`).
    """
    t, k = ids.shape
    if k == 0:  # no expert allowed (a draft pass with none of the layer's in RAM)
        return torch.zeros_like(x)
    if t == 1:
        chosen = ids[0].tolist()
        if len(set(chosen)) == k:
            weight = dict(sorted(zip(chosen, weights[0].tolist(), strict=True)))
            return _moe_one(x, weight, layer, experts)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    wanted, counts = torch.unique_consecutive(flat[order], return_counts=True)
    ends = counts.cumsum(0).tolist()
    span = dict(zip(wanted.tolist(), zip([0, *ends[:-1]], ends, strict=True), strict=True))
    tok = order // k
    xs, w = x[tok], weights.reshape(-1)[order, None]
    ys = torch.empty_like(xs)

    def run(e: int, ffn) -> None:
        a, b = span[e]
        ys[a:b] = ffn(xs[a:b])

    run_resident_first(experts, layer, span, run)
    # Each token's weighted outputs back in (token, expert) order, then summed one expert
    # after another, rounding after each add as a single token's sum does (`_moe_one`):
    # index_add_ sums in an order of its own, and a token's output must not depend on the
    # batch it ran in.
    prod = torch.empty_like(ys)
    prod[order] = (ys * w).to(x.dtype)
    prod = prod.view(t, k, -1)[torch.arange(t)[:, None], ids.argsort(dim=1, stable=True)]
    out = prod[:, 0]
    for r in range(1, k):
        out = out + prod[:, r]
    return out


def _moe_one(
    x: torch.Tensor, weight: dict[int, float], layer: int, experts: ExpertProvider
) -> torch.Tensor:
    """`moe` for one token and its distinct experts (`weight`: expert -> router weight, in
    expert order), with Python lists rather than tensor sorts: a decode step's bookkeeping
    ran a dozen small tensor ops a layer, each slow on caches the experts' weights had just
    swept. Every expert in RAM: held at once where the provider can (`acquire_resident`,
    one lock instead of a context per expert) and one C call computes them and their
    weighted sum; else each expert's output is weighted, rounded and summed in expert order,
    as `moe` does for a batch (the same bits either way)."""
    ys: dict[int, torch.Tensor] = {}
    total: list[torch.Tensor] = []

    def run(e: int, ffn) -> None:
        ys[e] = (ffn(x) * weight[e]).to(x.dtype)

    def run_held(pairs: list) -> None:
        ffns = [ffn for _, ffn in pairs]
        if len(pairs) > 1 and len(pairs) == len(weight):  # all in RAM: their sum in one call
            out = decode_group(ffns, x, list(weight.values()))
            if out is not None:
                total.append(out)
                return
        elif len(pairs) > 1 and (outs := decode_group(ffns, x)) is not None:
            for (e, _), y in zip(pairs, outs, strict=True):
                ys[e] = (y * weight[e]).to(x.dtype)
            return
        for e, ffn in pairs:
            run(e, ffn)

    # Every expert in RAM: held under one lock. Asked of the provider's own class: a wrapper
    # that changes what `use` yields (gpt-oss's activation, a bench's timers) and passes
    # other attributes through must not hand out its inner provider's experts.
    hold = getattr(type(experts), "acquire_resident", None)
    if hold is not None and (ffns := hold(experts, layer, weight)) is not None:
        try:
            run_held(list(zip(weight, ffns, strict=True)))
        finally:
            experts.release_all(layer, weight)
    else:
        run_resident_first(experts, layer, weight, run, run_held)
    if total:
        return total[0]
    out = None
    for e in weight:
        out = ys[e] if out is None else out + ys[e]
    return out


def run_resident_first(experts: ExpertProvider, layer: int, wanted, run, run_held=None) -> None:
    """Call run(e, ffn) for each expert e of `wanted`: those already in RAM first, held so
    that reading the missing ones cannot evict them before their turn, while the missing
    ones, all asked for at once, are read in parallel behind that compute; then each
    missing one as it is read. `run_held([(e, ffn), ...])`, if given, runs the experts
    already in RAM in one go instead."""
    with ExitStack() as held:
        ffns = {
            e: held.enter_context(experts.use(layer, e))
            for e in wanted
            if experts.is_resident(layer, e)
        }
        missing = [e for e in wanted if e not in ffns]
        if missing:
            experts.fetch(layer, missing)
        if run_held is not None:
            run_held(list(ffns.items()))
        else:
            for e, ffn in ffns.items():
                run(e, ffn)
    for e in missing:
        with experts.use(layer, e) as ffn:
            run(e, ffn)
