"""GLM-4.5 and GLM-4.5-Air (`Glm4MoeForCausalLM`).

Attention is the shared GQA attention with q/k/v biases (`attention_bias`), an
optional per-head QK RMSNorm (`use_qk_norm`: GLM-4.5 has it, Air does not) and a
partial rotary embedding: only the first `partial_rotary_factor` of each head's
dimensions rotate (rotate-half, not interleaved), the rest pass unchanged.
Routing is DeepSeek-V3's: sigmoid scores, `e_score_correction_bias` steering the
choice only, groups by their top-2 sum, renormalised top-k times
`routed_scaling_factor`; ungated shared experts and dense first layers spelled as
DeepSeek spells them. The multi-token-prediction layer that GLM checkpoints
append (`num_nextn_predict_layers`) is not part of the model and is not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mer.errors import ConfigError
from mer.models.config import ModelConfig
from mer.models.deepseek import DeepseekV2, normalise_experts
from mer.models.family import Family, Shape
from mer.models.layers import Rotary, apply_rotary, route_grouped
from mer.models.qwen_moe import Qwen2Moe


@dataclass(frozen=True)
class GlmMoeConfig(ModelConfig):
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    partial_rotary_factor: float = 0.5

    def validate(self, where: str = "config") -> None:
        super().validate(where)
        if self.n_group < 1 or self.num_local_experts % self.n_group:
            raise ConfigError(f"{where}: n_group ({self.n_group}) does not divide the experts")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"{where}: topk_group must be in 1..n_group ({self.n_group})")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(f"{where}: partial_rotary_factor gives {self.rotary_dim} dims")

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dimensions rotate (the first ones)."""
        return int(self.head_dim * self.partial_rotary_factor)


class Glm4Moe(Family):
    name = "glm4_moe"
    model_types = ("glm4_moe",)
    architectures = ("Glm4MoeForCausalLM",)
    gguf_architectures = ("glm4moe",)
    config_class = GlmMoeConfig
    defaults = {"norm_topk_prob": True, "n_shared_experts": 1, "first_k_dense_replace": 1}
    keep_float32 = frozenset({"router", "router_bias"})  # the reference routes in float32
    GLOBAL = Qwen2Moe.GLOBAL
    LAYER = {
        **{k: v for k, v in Qwen2Moe.LAYER.items() if not k.startswith("shared")},
        **{k: v for k, v in DeepseekV2.LAYER.items() if k.startswith(("shared", "router"))},
    }
    EXPERT = DeepseekV2.EXPERT

    def normalise(self, values: dict[str, Any], where: str) -> dict[str, Any]:
        values = normalise_experts(values)
        if "attention_bias" in values:  # on q, k and v; never on o
            values["qkv_bias"] = bool(values["attention_bias"])
        if "use_qk_norm" in values:
            values["qk_norm"] = "head" if values["use_qk_norm"] else "none"
        rope = values.get("rope_parameters") or {}
        if "partial_rotary_factor" in rope:  # where transformers writes it
            values["partial_rotary_factor"] = rope["partial_rotary_factor"]
        return values

    def ffn_shapes(self, cfg: GlmMoeConfig, i: int) -> dict[str, Shape]:
        shapes = super().ffn_shapes(cfg, i)
        if "router" in shapes:
            shapes["router_bias"] = (cfg.num_local_experts,)
        return shapes

    def rotary(self, cfg: GlmMoeConfig) -> Rotary:
        return Rotary(cfg.rotary_dim, cfg.rope_theta, cfg.max_position_embeddings)

    def attention(self, m, i: int, h: torch.Tensor, rope, spans) -> torch.Tensor:
        q, k, v = self.qkv(m, i, h)
        d = m.config.rotary_dim
        q = torch.cat([apply_rotary(q[..., :d], *rope), q[..., d:]], -1)
        k = torch.cat([apply_rotary(k[..., :d], *rope), k[..., d:]], -1)
        return self.attend(m, i, q, k, v, spans)

    def router_scores(self, m, i: int, h: torch.Tensor) -> torch.Tensor:
        """Sigmoid scores of the router logits, what the weights are made of (the correction
        bias only steers the choice; group limits aside, as for a draft)."""
        return F.linear(h.float(), m.w[f"layers.{i}.router"].float()).sigmoid()

    def route(self, m, i: int, h: torch.Tensor, allowed: torch.Tensor | None):
        cfg: GlmMoeConfig = m.config
        return route_grouped(
            h,
            m.w[f"layers.{i}.router"],
            cfg.num_experts_per_tok,
            scoring="sigmoid",
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            group_score="top2",
            bias=m.w[f"layers.{i}.router_bias"],
            renormalise=cfg.norm_topk_prob,
            scale=cfg.routed_scaling_factor,
            allowed=allowed,
        )


_GLM = {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "partial_rotary_factor": 0.5, "attention_bias": True,
        "norm_topk_prob": True, "num_nextn_predict_layers": 1}  # fmt: skip
Glm4Moe.presets = {
    "glm-4.5-air": {**_GLM, "num_hidden_layers": 46, "hidden_size": 4096,
                    "intermediate_size": 10944, "moe_intermediate_size": 1408,
                    "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
                    "n_routed_experts": 128, "n_shared_experts": 1, "num_experts_per_tok": 8,
                    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                    "routed_scaling_factor": 1.0, "use_qk_norm": False, "vocab_size": 151552,
                    "max_position_embeddings": 131072},
    # Every quirk: QK norm, biases, half the head rotating, group-limited biased sigmoid
    # routing scaled by 2.5, a shared expert, a dense first layer, heads wider than H / n.
    "tiny-glm-4.5": {**_GLM, "num_hidden_layers": 3, "hidden_size": 64,
                     "intermediate_size": 96, "moe_intermediate_size": 32,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                     "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 3,
                     "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
                     "routed_scaling_factor": 2.5, "use_qk_norm": True, "vocab_size": 512,
                     "max_position_embeddings": 512},
}  # fmt: skip

FAMILIES = (Glm4Moe(),)
