"""Qwen2-MoE and Qwen3-MoE (`Qwen2MoeForCausalLM`, `Qwen3MoeForCausalLM`).

Qwen2-MoE has q/k/v biases and a sigmoid-gated shared expert; Qwen3-MoE has
per-head QK RMSNorm; both may have dense layers (`mlp_only_layers`,
`decoder_sparse_step`), call the routed experts' width `moe_intermediate_size`
(their `intermediate_size` is the dense layers'), and renormalise top-k weights
only with `norm_topk_prob`. One name table serves both: a tensor a config lacks
is simply never asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mer.errors import ConfigError
from mer.models.family import Family, Shape
from mer.models.layers import swiglu

_P = "model.layers.{i}."


class Qwen2Moe(Family):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
    architectures = ("Qwen2MoeForCausalLM",)
    gguf_architectures = ("qwen2moe",)
    defaults = {"norm_topk_prob": False, "qk_norm": "none", "qkv_bias": True}
    GLOBAL = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
              "lm_head": "lm_head.weight"}  # fmt: skip
    LAYER = {
        "attn_norm": _P + "input_layernorm.weight",
        "q": _P + "self_attn.q_proj.weight",
        "k": _P + "self_attn.k_proj.weight",
        "v": _P + "self_attn.v_proj.weight",
        "o": _P + "self_attn.o_proj.weight",
        "q_bias": _P + "self_attn.q_proj.bias",
        "k_bias": _P + "self_attn.k_proj.bias",
        "v_bias": _P + "self_attn.v_proj.bias",
        "q_norm": _P + "self_attn.q_norm.weight",
        "k_norm": _P + "self_attn.k_norm.weight",
        "ffn_norm": _P + "post_attention_layernorm.weight",
        "router": _P + "mlp.gate.weight",
        "shared.gate": _P + "mlp.shared_expert.gate_proj.weight",
        "shared.up": _P + "mlp.shared_expert.up_proj.weight",
        "shared.down": _P + "mlp.shared_expert.down_proj.weight",
        "shared_gate": _P + "mlp.shared_expert_gate.weight",
        "mlp.gate": _P + "mlp.gate_proj.weight",
        "mlp.up": _P + "mlp.up_proj.weight",
        "mlp.down": _P + "mlp.down_proj.weight",
    }
    EXPERT = {
        "w1": _P + "mlp.experts.{e}.gate_proj.weight",
        "w2": _P + "mlp.experts.{e}.down_proj.weight",
        "w3": _P + "mlp.experts.{e}.up_proj.weight",
    }

    def normalise(self, values: dict, where: str) -> dict:
        if "moe_intermediate_size" in values:  # intermediate_size is the dense MLP's
            values.setdefault("dense_intermediate_size", values.get("intermediate_size"))
            values["intermediate_size"] = values["moe_intermediate_size"]
        if "dense_layers" not in values:
            step = values.get("decoder_sparse_step") or 1
            only = set(values.get("mlp_only_layers") or ())
            n = values.get("num_hidden_layers", 0)
            values["dense_layers"] = [i for i in range(n) if i in only or (i + 1) % step]
        if values.get("use_sliding_window") is False:
            values["sliding_window"] = None  # Qwen configs carry a window they do not use
        elif values.get("use_sliding_window"):
            raise ConfigError(f"{where}: per-layer sliding windows are not supported")
        return values

    def ffn_shapes(self, cfg, i: int) -> dict[str, Shape]:
        shapes = super().ffn_shapes(cfg, i)
        if "shared.gate" in shapes:
            shapes["shared_gate"] = (1, cfg.hidden_size)
        return shapes

    def shared(self, m, i: int, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The shared expert, scaled by a sigmoid gate of the token."""
        if m.config.shared_expert_intermediate_size:
            w, p = m.w, f"layers.{i}."
            shared = swiglu(h, w[p + "shared.gate"], w[p + "shared.up"], w[p + "shared.down"])
            out = out + torch.sigmoid(F.linear(h, w[p + "shared_gate"])) * shared
        return out


class Qwen3Moe(Qwen2Moe):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
    architectures = ("Qwen3MoeForCausalLM",)
    gguf_architectures = ("qwen3moe",)
    defaults = {"norm_topk_prob": False, "qk_norm": "head", "qkv_bias": False}


_QWEN2 = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
          "rms_norm_eps": 1e-6, "rope_theta": 1e6, "use_sliding_window": False,
          "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": []}  # fmt: skip
_QWEN3 = {**_QWEN2, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
          "norm_topk_prob": True}  # fmt: skip
Qwen2Moe.presets = {
    "qwen2-moe-a2.7b": {**_QWEN2, "num_hidden_layers": 24, "num_experts": 60,
                        "num_experts_per_tok": 4, "hidden_size": 2048,
                        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                        "intermediate_size": 5632, "num_attention_heads": 16,
                        "num_key_value_heads": 16, "vocab_size": 151936,
                        "max_position_embeddings": 8192},
    # DeepSeek-V2-Lite's expert shapes and counts (the shared trace's model) in Qwen2-MoE's
    # form: 26 MoE layers after a dense one, 64 routed experts of 2048 x 1408, top-6, two
    # shared experts (one of 2 x 1408); plain attention, not MLA (see deepseek-v2-lite).
    "dsv2-lite-shape": {**_QWEN2, "num_hidden_layers": 27, "mlp_only_layers": [0],
                        "num_experts": 64, "num_experts_per_tok": 6, "hidden_size": 2048,
                        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 2816,
                        "intermediate_size": 10944, "num_attention_heads": 16,
                        "num_key_value_heads": 16, "vocab_size": 102400,
                        "max_position_embeddings": 4096},
    "tiny-qwen2-moe": {**_QWEN2, "num_hidden_layers": 3, "num_experts": 4,
                       "num_experts_per_tok": 2, "hidden_size": 64, "moe_intermediate_size": 64,
                       "shared_expert_intermediate_size": 96, "intermediate_size": 128,
                       "mlp_only_layers": [1], "num_attention_heads": 4,
                       "num_key_value_heads": 2, "vocab_size": 512,
                       "max_position_embeddings": 512, "tie_word_embeddings": True},
}  # fmt: skip
Qwen3Moe.presets = {
    "qwen3-moe-30b-a3b": {**_QWEN3, "num_hidden_layers": 48, "num_experts": 128,
                          "num_experts_per_tok": 8, "hidden_size": 2048, "head_dim": 128,
                          "moe_intermediate_size": 768, "intermediate_size": 6144,
                          "num_attention_heads": 32, "num_key_value_heads": 4,
                          "vocab_size": 151936, "max_position_embeddings": 40960},
    "tiny-qwen3-moe": {**_QWEN3, "num_hidden_layers": 4, "num_experts": 8,
                       "num_experts_per_tok": 2, "hidden_size": 64, "head_dim": 32,
                       "moe_intermediate_size": 64, "intermediate_size": 128,
                       "decoder_sparse_step": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "vocab_size": 512,
                       "max_position_embeddings": 512},
}  # fmt: skip

FAMILIES = (Qwen2Moe(), Qwen3Moe())
