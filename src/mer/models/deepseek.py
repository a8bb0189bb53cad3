"""DeepSeek-V2 and V3 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`, also R1).

Multi-head latent attention (MLA): queries come from `q_proj`, or through a
low-rank `q_a_proj` -> RMSNorm -> `q_b_proj` when `q_lora_rank` is set; keys and
values come from one latent per token, `kv_a_proj_with_mqa` -> [latent
(`kv_lora_rank`) | rope key (`qk_rope_head_dim`, one for all heads)], the latent
RMSNormed and expanded per head by `kv_b_proj` into the no-rope key part
(`qk_nope_head_dim`) and the value (`v_head_dim`: K and V differ in width).
The rope part is rotated in interleaved pairs, with YaRN scaling.

The KV cache holds the latent and the rope key, not K and V: for
DeepSeek-V2-Lite (16 heads, 192-wide keys, 128-wide values) 512 + 64 = 576
numbers per token and layer instead of 16 x (192 + 128) = 5120, 8.9x less.
Attention runs on the latent directly: `kv_b_proj`'s key half is absorbed into
the query and its value half applied after the softmax, so nothing is expanded
per cached token. `mla_cache="full"` caches expanded K and V instead (the
layout of plain attention), against which the latent cache is tested. Every
projection goes through `mer.quant.dense.linear`, so compact dense weights
(`--dense-quant`) cover MLA too; the absorbed `kv_b_proj` is used per head as a
matrix, so a quantized one is dequantized for each pass, one layer at a time.

Routing: V2 takes the softmax's top-k, optionally within the `topk_group` best
of `n_group` groups (`group_limited_greedy`, a group scored by its best expert);
V3 takes sigmoid scores, chooses by score plus `e_score_correction_bias` within
groups scored by their best two, and weights by the renormalised scores. Both
multiply by `routed_scaling_factor`; both add `n_shared_experts` ungated shared
experts; the first `first_k_dense_replace` layers are dense.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mer.errors import ConfigError
from mer.models.config import ModelConfig
from mer.models.family import Family, Shape
from mer.models.layers import Rotary, apply_rotary, attention, rms_norm, route_grouped, yarn
from mer.models.layers import yarn_mscale as mscale
from mer.quant.dense import linear

_P = "model.layers.{i}."
_A = _P + "self_attn."
_LORA_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm: the reference's default, not the config's


@dataclass(frozen=True)
class DeepseekConfig(ModelConfig):
    q_lora_rank: int | None = None  # None: a plain q_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    topk_method: str = "greedy"  # greedy | group_limited_greedy (V2) | noaux_tc (V3)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    rope_scaling: dict | None = None  # YaRN's parameters, rope_type "yarn"
    rope_interleave: bool = True
    mla_cache: str = "latent"  # what the KV cache holds: "latent" or "full" K and V

    def validate(self, where: str = "config") -> None:
        super().validate(where)
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ConfigError(f"{where}: topk_method {self.topk_method!r} is not supported")
        if self.n_group < 1 or self.num_local_experts % self.n_group:
            raise ConfigError(f"{where}: n_group ({self.n_group}) does not divide the experts")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"{where}: topk_group must be in 1..n_group ({self.n_group})")
        dims = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        for name in (*dims, "q_lora_rank") if self.q_lora_rank is not None else dims:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{where}: {name} must be a positive integer, got {v!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{where}: qk_rope_head_dim must be even")
        if self.mla_cache not in ("latent", "full"):
            raise ConfigError(f"{where}: mla_cache {self.mla_cache!r} is not latent or full")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class DeepseekV2(Family):
    name = "deepseek_v2"
    model_types = ("deepseek_v2",)
    architectures = ("DeepseekV2ForCausalLM",)
    gguf_architectures = ("deepseek2",)
    config_class = DeepseekConfig
    defaults = {"norm_topk_prob": False, "n_shared_experts": 2, "rms_norm_eps": 1e-6}
    rope_types = ("default", "yarn")
    keep_float32 = frozenset({"router", "router_bias"})  # the reference routes in float32
    GLOBAL = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
              "lm_head": "lm_head.weight"}  # fmt: skip
    LAYER = {
        "attn_norm": _P + "input_layernorm.weight",
        "q": _A + "q_proj.weight",
        "q_a": _A + "q_a_proj.weight",
        "q_a_norm": _A + "q_a_layernorm.weight",
        "q_b": _A + "q_b_proj.weight",
        "kv_a": _A + "kv_a_proj_with_mqa.weight",
        "kv_a_norm": _A + "kv_a_layernorm.weight",
        "kv_b": _A + "kv_b_proj.weight",
        "o": _A + "o_proj.weight",
        "ffn_norm": _P + "post_attention_layernorm.weight",
        "router": _P + "mlp.gate.weight",
        "router_bias": _P + "mlp.gate.e_score_correction_bias",
        "shared.gate": _P + "mlp.shared_experts.gate_proj.weight",
        "shared.up": _P + "mlp.shared_experts.up_proj.weight",
        "shared.down": _P + "mlp.shared_experts.down_proj.weight",
        "mlp.gate": _P + "mlp.gate_proj.weight",
        "mlp.up": _P + "mlp.up_proj.weight",
        "mlp.down": _P + "mlp.down_proj.weight",
    }
    EXPERT = {
        "w1": _P + "mlp.experts.{e}.gate_proj.weight",
        "w2": _P + "mlp.experts.{e}.down_proj.weight",
        "w3": _P + "mlp.experts.{e}.up_proj.weight",
    }

    def normalise(self, values: dict[str, Any], where: str) -> dict[str, Any]:
        values = normalise_deepseek(values, where)
        values["norm_topk_prob"] = False  # transformers' V2 never renormalises
        return values

    def attention_shapes(self, cfg: DeepseekConfig) -> dict[str, Shape]:
        h, heads, r = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
        shapes: dict[str, Shape] = {}
        if cfg.q_lora_rank:
            q = cfg.q_lora_rank
            shapes.update({"q_a": (q, h), "q_a_norm": (q,), "q_b": (heads * cfg.qk_head_dim, q)})
        else:
            shapes["q"] = (heads * cfg.qk_head_dim, h)
        return {
            **shapes,
            "kv_a": (r + cfg.qk_rope_head_dim, h),
            "kv_a_norm": (r,),
            "kv_b": (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), r),
            "o": (h, heads * cfg.v_head_dim),
        }

    def kv_shapes(self, cfg: DeepseekConfig) -> tuple[Shape, Shape]:
        if cfg.mla_cache == "full":
            heads = cfg.num_attention_heads
            return (heads, cfg.qk_head_dim), (heads, cfg.v_head_dim)
        return (cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)

    def rotary(self, cfg: DeepseekConfig) -> Rotary:
        d, theta, n = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.max_position_embeddings
        if cfg.rope_scaling:
            return Rotary(d, theta, n, *yarn(d, theta, cfg.rope_scaling, n))
        return Rotary(d, theta, n)

    def attention(self, m, i: int, h: torch.Tensor, rope, spans) -> torch.Tensor:
        cfg: DeepseekConfig = m.config
        w, p = m.w, f"layers.{i}."
        t, nope, dr = h.shape[0], cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            q_a = rms_norm(linear(h, w[p + "q_a"]), w[p + "q_a_norm"], _LORA_EPS)
            q = linear(q_a, w[p + "q_b"])
        else:
            q = linear(h, w[p + "q"])
        q_nope, q_pe = q.view(t, cfg.num_attention_heads, -1).split([nope, dr], -1)
        latent, k_pe = linear(h, w[p + "kv_a"]).split([cfg.kv_lora_rank, dr], -1)
        latent = rms_norm(latent, w[p + "kv_a_norm"], _LORA_EPS)  # [T, r]
        q_pe, k_pe = self._rotate(cfg, q_pe, rope), self._rotate(cfg, k_pe[:, None], rope)
        attend = _attend_full if cfg.mla_cache == "full" else _attend_latent
        out = attend(cfg, i, w[p + "kv_b"], q_nope, q_pe, latent, k_pe, spans)  # [T, H*Dv]
        return linear(out, w[p + "o"])

    @staticmethod
    def _rotate(cfg: DeepseekConfig, x: torch.Tensor, rope) -> torch.Tensor:
        """Rope over [..., dr]; DeepSeek's pairs are interleaved (x0, x1), (x2, x3), ...: gathered
        into halves first, which permutes q's and k's dimensions alike (dot products equal)."""
        if cfg.rope_interleave:
            x = torch.cat([x[..., 0::2], x[..., 1::2]], -1)
        return apply_rotary(x, *rope)

    def router_scores(self, m, i: int, h: torch.Tensor) -> torch.Tensor:
        """The scores the routing weights are made of: softmax (V2) or sigmoid (V3) of the
        router logits, without V3's correction bias (it steers the choice, not the weights);
        group limits aside, as for a draft."""
        logits = F.linear(h.float(), m.w[f"layers.{i}.router"].float())
        return logits.sigmoid() if m.config.topk_method == "noaux_tc" else logits.softmax(-1)

    def route(self, m, i: int, h: torch.Tensor, allowed: torch.Tensor | None):
        cfg: DeepseekConfig = m.config
        v3 = cfg.topk_method == "noaux_tc"
        return route_grouped(
            h,
            m.w[f"layers.{i}.router"],
            cfg.num_experts_per_tok,
            scoring="sigmoid" if v3 else "softmax",
            n_group=cfg.n_group if cfg.topk_method != "greedy" else 1,
            topk_group=cfg.topk_group if cfg.topk_method != "greedy" else 1,
            group_score="top2" if v3 else "max",
            bias=m.w.get(f"layers.{i}.router_bias"),
            renormalise=v3 and cfg.norm_topk_prob,
            scale=cfg.routed_scaling_factor,
            allowed=allowed,
        )


class DeepseekV3(DeepseekV2):
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)
    architectures = ("DeepseekV3ForCausalLM",)
    gguf_architectures = ()  # llama.cpp writes V3 as deepseek2 too: the V2 family answers it
    defaults = {"norm_topk_prob": True, "n_shared_experts": 1, "rms_norm_eps": 1e-6,
                "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5}  # fmt: skip

    def normalise(self, values: dict[str, Any], where: str) -> dict[str, Any]:
        values["topk_method"] = "noaux_tc"  # what transformers' V3 always does
        return normalise_deepseek(values, where)

    def ffn_shapes(self, cfg: DeepseekConfig, i: int) -> dict[str, Shape]:
        shapes = super().ffn_shapes(cfg, i)
        if "router" in shapes:
            shapes["router_bias"] = (cfg.num_local_experts,)
        return shapes


def _attend_latent(cfg: DeepseekConfig, i: int, kv_b, q_nope, q_pe, latent, k_pe, spans):
    """Attention on the cached latents c [S, r] and rope keys [S, dr], nothing expanded:
    q_nope . (W_uk c) = (q_nope W_uk) . c, and the value W_uv c is applied after the softmax.
    q_nope [T, H, nope], q_pe [T, H, dr], latent [T, r], k_pe [T, 1, dr] -> [T, H*Dv]."""
    heads, nope, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    if not isinstance(kv_b, torch.Tensor):  # quantized: both halves are needed as matrices
        kv_b = kv_b.dequantize().to(latent.dtype)
    kv_b = kv_b.view(heads, nope + dv, cfg.kv_lora_rank)  # per head: [W_uk; W_uv]
    q_lat = torch.bmm(q_nope.transpose(0, 1), kv_b[:, :nope]).float()  # [H, T, r]
    q_pe = q_pe.transpose(0, 1).float()  # [H, T, dr]
    scale = softmax_scale(cfg)
    out = torch.empty(latent.shape[0], heads * dv, dtype=latent.dtype)
    for span, kv, mask in spans:
        c, kr = (z.float() for z in kv.append(i, latent[span], k_pe[span, 0]))  # [S, r], [S, dr]
        scores = (q_lat[:, span] @ c.T + q_pe[:, span] @ kr.T).mul_(scale)  # [H, T_i, S]
        probs = torch.softmax(scores.masked_fill_(~mask, float("-inf")), -1)
        o = torch.bmm((probs @ c).to(latent.dtype), kv_b[:, nope:].transpose(1, 2))  # [H, T_i, Dv]
        out[span] = o.transpose(0, 1).reshape(-1, heads * dv)
    return out


def _attend_full(cfg: DeepseekConfig, i: int, kv_b, q_nope, q_pe, latent, k_pe, spans):
    """Plain attention on expanded keys [H, nope + dr] and values [H, Dv], cached so."""
    t, heads = latent.shape[0], cfg.num_attention_heads
    k_nope, v = (
        linear(latent, kv_b).view(t, heads, -1).split([cfg.qk_nope_head_dim, cfg.v_head_dim], -1)
    )
    k = torch.cat([k_nope, k_pe.expand(t, heads, -1)], -1)
    q = torch.cat([q_nope, q_pe], -1)
    out = torch.empty(t, heads * cfg.v_head_dim, dtype=latent.dtype)
    for span, kv, mask in spans:
        out[span] = attention(
            q[span], *kv.append(i, k[span], v[span]), mask, scale=softmax_scale(cfg)
        )
    return out


def normalise_deepseek(values: dict[str, Any], where: str) -> dict[str, Any]:
    """DeepSeek's config.json spellings -> ours."""
    if values.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias is not supported for DeepSeek")
    values = normalise_experts(values)
    if "qk_nope_head_dim" in values or "qk_rope_head_dim" in values:
        fields = {f.name: f.default for f in dataclasses.fields(DeepseekConfig)}
        nope = values.get("qk_nope_head_dim", fields["qk_nope_head_dim"])
        values["head_dim"] = nope + values.get("qk_rope_head_dim", fields["qk_rope_head_dim"])
        values["num_key_value_heads"] = values.get("num_attention_heads")
    rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "yarn":
        keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim", "attention_factor", "truncate")  # fmt: skip
        values["rope_scaling"] = {"rope_type": "yarn", **{k: rope[k] for k in keys if k in rope}}
        if "original_max_position_embeddings" not in values["rope_scaling"]:
            raise ConfigError(f"{where}: yarn rope scaling needs original_max_position_embeddings")
    else:
        values["rope_scaling"] = None
    return values


def normalise_experts(values: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek's expert spellings (GLM-4.5 shares them): n_routed_experts,
    moe_intermediate_size (the dense layers' is intermediate_size), n_shared_experts of that
    width, dense first_k_dense_replace layers (and those off moe_layer_freq).
    """
    if "n_routed_experts" in values:
        values["num_local_experts"] = values["n_routed_experts"]
    if "moe_intermediate_size" in values:  # intermediate_size is the dense layers'
        moe = values["moe_intermediate_size"]
        values.setdefault("dense_intermediate_size", values.get("intermediate_size"))
        values["intermediate_size"] = moe
        values["shared_expert_intermediate_size"] = moe * (values.get("n_shared_experts") or 0)
    if "dense_layers" not in values:
        first, freq = values.get("first_k_dense_replace") or 0, values.get("moe_layer_freq") or 1
        n = values.get("num_hidden_layers", 0)
        values["dense_layers"] = [i for i in range(n) if i < first or i % freq]
    return values


def softmax_scale(cfg: DeepseekConfig) -> float:
    """qk_head_dim ** -0.5, times YaRN's mscale(factor, mscale_all_dim) squared."""
    scale = cfg.qk_head_dim**-0.5
    y = cfg.rope_scaling
    if y and y.get("mscale_all_dim"):
        factor = (
            y.get("factor") or cfg.max_position_embeddings / y["original_max_position_embeddings"]
        )
        scale *= mscale(factor, y["mscale_all_dim"]) ** 2
    return scale


_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}  # fmt: skip
_V2 = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
       "rms_norm_eps": 1e-6, "rope_theta": 10000, "moe_layer_freq": 1, "scoring_func": "softmax",
       "norm_topk_prob": False, "attention_bias": False}  # fmt: skip
# head_dim: as transformers writes it for DeepSeek, the rope part's width (we derive ours).
DeepseekV2.presets = {
    "deepseek-v2-lite": {**_V2, "num_hidden_layers": 27, "hidden_size": 2048,
                         "intermediate_size": 10944, "moe_intermediate_size": 1408,
                         "num_attention_heads": 16, "num_key_value_heads": 16,
                         "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
                         "first_k_dense_replace": 1, "q_lora_rank": None, "kv_lora_rank": 512,
                         "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                         "head_dim": 64, "v_head_dim": 128,
                         "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                         "routed_scaling_factor": 1.0, "vocab_size": 102400,
                         "max_position_embeddings": 163840, "rope_scaling": _YARN},
    # Every quirk: low-rank query, YaRN, group-limited routing scaled by 1.5, 2 shared experts,
    # a dense first layer, keys (24) and values (16) of different widths.
    "tiny-deepseek-v2": {**_V2, "num_hidden_layers": 3, "hidden_size": 64,
                         "intermediate_size": 96, "moe_intermediate_size": 32,
                         "num_attention_heads": 4, "num_key_value_heads": 4,
                         "n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 3,
                         "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 32,
                         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                         "head_dim": 8, "v_head_dim": 16,
                         "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                         "routed_scaling_factor": 1.5, "vocab_size": 512,
                         "max_position_embeddings": 512,
                         "rope_scaling": {**_YARN, "factor": 4,
                                          "original_max_position_embeddings": 128}},
}  # fmt: skip

_V3 = {**_V2, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
       "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
       "rope_scaling": {**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}}  # fmt: skip
DeepseekV3.presets = {
    # 671B: for store and I/O work (mer synth --store); its bf16 checkpoint would be 1.3 TB.
    "deepseek-v3": {**_V3, "num_hidden_layers": 61, "hidden_size": 7168,
                    "intermediate_size": 18432, "moe_intermediate_size": 2048,
                    "num_attention_heads": 128, "num_key_value_heads": 128,
                    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
                    "first_k_dense_replace": 3, "q_lora_rank": 1536, "kv_lora_rank": 512,
                    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                    "head_dim": 64, "v_head_dim": 128,
                    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
                    "vocab_size": 129280, "max_position_embeddings": 163840},
    # V3's routing (sigmoid, correction bias, groups by their top-2 sum, renormalised, x2.5)
    # on tiny-deepseek-v2's attention.
    "tiny-deepseek-v3": {**_V3, "num_hidden_layers": 3, "hidden_size": 64,
                         "intermediate_size": 96, "moe_intermediate_size": 32,
                         "num_attention_heads": 4, "num_key_value_heads": 4,
                         "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 3,
                         "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 32,
                         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                         "head_dim": 8, "v_head_dim": 20,
                         "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
                         "vocab_size": 512, "max_position_embeddings": 512,
                         "rope_scaling": {**_YARN, "factor": 4, "mscale": 1.0,
                                          "mscale_all_dim": 1.0,
                                          "original_max_position_embeddings": 128}},
}  # fmt: skip

FAMILIES = (DeepseekV2(), DeepseekV3())
