"""The MoE decoder forward pass over resident weights and an expert provider.

Weights arrive as a dict under mer's tensor names (the converter mapped them
once); experts are never held here, only asked for per layer through the
provider. One call runs one sequence's new tokens and appends their keys and
values to the KV cache it is given.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mer.config import ModelConfig
from mer.models.kv_cache import KVCache
from mer.models.layers import ExpertProvider, Rotary, attention, moe, rms_norm, route

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

    def new_kv_cache(self, capacity: int) -> KVCache:
        return KVCache(self.config, capacity, self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, kv: KVCache, all_logits: bool = False) -> torch.Tensor:
        """tokens [T] -> float32 logits [T, V] (or [1, V] for the last token only)."""
        cfg, w = self.config, self.w
        t = tokens.shape[0]
        pos = torch.arange(kv.length, kv.length + t)
        x = w["embed"][tokens]  # [T, H]
        for i in range(cfg.num_hidden_layers):
            p = f"layers.{i}."
            h = rms_norm(x, w[p + "attn_norm"], cfg.rms_norm_eps)
            q = F.linear(h, w[p + "q"]).view(t, cfg.num_attention_heads, cfg.head_dim)
            k = F.linear(h, w[p + "k"]).view(t, cfg.num_key_value_heads, cfg.head_dim)
            v = F.linear(h, w[p + "v"]).view(t, cfg.num_key_value_heads, cfg.head_dim)
            q, k = self.rotary(q, pos), self.rotary(k, pos)
            keys, values = kv.append(i, k, v)
            x = x + F.linear(attention(q, keys, values, pos, cfg.sliding_window), w[p + "o"])
            h = rms_norm(x, w[p + "ffn_norm"], cfg.rms_norm_eps)
            weights, ids = route(h, w[p + "router"], cfg.num_experts_per_tok)
            for observe in self.observers:
                observe(i, ids, weights)
            if self.lookahead:
                self.experts.cancel_prefetches(i, keep=ids.unique().tolist())
                if i + 1 < cfg.num_hidden_layers:
                    _, guess = route(h, w[f"layers.{i + 1}.router"], cfg.num_experts_per_tok)
                    self.experts.prefetch(i + 1, guess.unique().tolist())
            x = x + moe(h, weights, ids, i, self.experts)
        kv.advance(t)
        self.experts.next_step()
        if not all_logits:
            x = x[-1:]
        return F.linear(rms_norm(x, w["norm"], cfg.rms_norm_eps), w["lm_head"]).float()
