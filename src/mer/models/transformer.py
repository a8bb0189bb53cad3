"""The MoE decoder forward pass over resident weights and an expert provider.

Weights arrive as a dict under mer's tensor names (the converter mapped them
once); experts are never held here, only asked for per layer through the
provider. One call runs one sequence's new tokens and appends their keys and
values to the KV cache it is given.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mer.config import ModelConfig
from mer.models.kv_cache import KVCache
from mer.models.layers import (
    ExpertProvider,
    Rotary,
    apply_rotary,
    attention,
    causal_mask,
    moe,
    rms_norm,
    route,
    swiglu,
)

# Called per MoE layer with (layer, expert ids [T, k], router weights [T, k]).
RoutingObserver = Callable[[int, torch.Tensor, torch.Tensor], None]


class MoETransformer:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        experts: ExpertProvider,
        dtype: torch.dtype = torch.bfloat16,
        lookahead: bool = True,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.w = {name: t.to(dtype) for name, t in weights.items()}
        if "lm_head" not in self.w:  # tied embeddings
            self.w["lm_head"] = self.w["embed"]
        self.experts = experts
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.max_position_embeddings)
        self.observers: list[RoutingObserver] = []
        # Prefetch the next layer's experts by applying its router to this layer's hidden
        # state, so their reads overlap with this layer's expert compute.
        self.lookahead = lookahead
        moe_layers = config.moe_layers
        self._next_moe_layer = dict(itertools.pairwise(moe_layers))

    def new_kv_cache(self, capacity: int) -> KVCache:
        return KVCache(self.config, capacity, self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, kv: KVCache, all_logits: bool = False) -> torch.Tensor:
        """tokens [T] -> float32 logits [T, V] (or [1, V] for the last token only)."""
        cfg, w = self.config, self.w
        t = tokens.shape[0]
        pos = torch.arange(kv.length, kv.length + t)
        x = w["embed"][tokens]  # [T, H]
        rope = self.rotary.tables(pos, self.dtype)
        mask = causal_mask(pos, kv.length + t, cfg.sliding_window)  # [T, S]
        for i in range(cfg.num_hidden_layers):
            p = f"layers.{i}."
            h = rms_norm(x, w[p + "attn_norm"], cfg.rms_norm_eps)
            x = x + self._attention(i, h, rope, mask, kv)
            h = rms_norm(x, w[p + "ffn_norm"], cfg.rms_norm_eps)
            if cfg.is_moe_layer(i):
                x = x + self._moe(i, h)
            else:
                x = x + swiglu(h, w[p + "mlp.gate"], w[p + "mlp.up"], w[p + "mlp.down"])
        kv.advance(t)
        self.experts.next_step()
        if not all_logits:
            x = x[-1:]
        return F.linear(rms_norm(x, w["norm"], cfg.rms_norm_eps), w["lm_head"]).float()

    def _attention(self, i: int, h: torch.Tensor, rope, mask: torch.Tensor, kv: KVCache):
        cfg, w, p = self.config, self.w, f"layers.{i}."
        t, eps = h.shape[0], cfg.rms_norm_eps
        q = F.linear(h, w[p + "q"], w.get(p + "q_bias"))  # [T, Hq*D]
        k = F.linear(h, w[p + "k"], w.get(p + "k_bias"))  # [T, Hkv*D]
        v = F.linear(h, w[p + "v"], w.get(p + "v_bias"))
        if cfg.qk_norm == "full":
            q, k = rms_norm(q, w[p + "q_norm"], eps), rms_norm(k, w[p + "k_norm"], eps)
        if cfg.clip_qkv is not None:
            q, k, v = (z.clamp(-cfg.clip_qkv, cfg.clip_qkv) for z in (q, k, v))
        q = q.view(t, cfg.num_attention_heads, cfg.head_dim)
        k = k.view(t, cfg.num_key_value_heads, cfg.head_dim)
        v = v.view(t, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = rms_norm(q, w[p + "q_norm"], eps), rms_norm(k, w[p + "k_norm"], eps)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        keys, values = kv.append(i, k, v)
        return F.linear(attention(q, keys, values, mask), w[p + "o"])

    def _moe(self, i: int, h: torch.Tensor) -> torch.Tensor:
        cfg, w, p = self.config, self.w, f"layers.{i}."
        k = cfg.num_experts_per_tok
        weights, ids = route(h, w[p + "router"], k, cfg.norm_topk_prob)
        for observe in self.observers:
            observe(i, ids, weights)
        if self.lookahead:
            self.experts.cancel_prefetches(i, keep=ids.unique().tolist())
            nxt = self._next_moe_layer.get(i)
            if nxt is not None:
                _, guess = route(h, w[f"layers.{nxt}.router"], k)
                self.experts.prefetch(nxt, guess.unique().tolist())
        out = moe(h, weights, ids, i, self.experts)
        if cfg.shared_expert_intermediate_size:
            shared = swiglu(h, w[p + "shared.gate"], w[p + "shared.up"], w[p + "shared.down"])
            out = out + torch.sigmoid(F.linear(h, w[p + "shared_gate"])) * shared
        return out
