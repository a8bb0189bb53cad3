"""Mixtral (`MixtralForCausalLM`): the plain architecture, every default of `Family`: every
layer routed (softmax top-k, renormalised), no shared expert, no QK-norm, no biases."""

from __future__ import annotations

from mer.models.family import Family


class Mixtral(Family):
    name = "mixtral"
    model_types = ("mixtral",)
    architectures = ("MixtralForCausalLM",)
    gguf_architectures = ("llama",)  # llama.cpp writes Mixtral as llama with experts
    defaults = {"norm_topk_prob": True, "qk_norm": "none", "qkv_bias": False}
    GLOBAL = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
              "lm_head": "lm_head.weight"}  # fmt: skip
    LAYER = {
        "attn_norm": "model.layers.{i}.input_layernorm.weight",
        "q": "model.layers.{i}.self_attn.q_proj.weight",
        "k": "model.layers.{i}.self_attn.k_proj.weight",
        "v": "model.layers.{i}.self_attn.v_proj.weight",
        "o": "model.layers.{i}.self_attn.o_proj.weight",
        "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
        "router": "model.layers.{i}.block_sparse_moe.gate.weight",
    }
    EXPERT = {
        "w1": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",  # gate
        "w2": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",  # down
        "w3": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",  # up
    }


# (layers, experts, top_k, hidden, ffn, heads, kv_heads, vocab, max_positions)
_SHAPES = {
    "tiny": (2, 4, 2, 64, 128, 4, 2, 512, 512),
    "small": (4, 8, 2, 256, 512, 8, 2, 4096, 4096),
    "demo": (8, 8, 2, 1024, 2816, 16, 4, 8192, 4096),
    "medium": (16, 8, 2, 2048, 5632, 16, 4, 32000, 32768),
    "mixtral-8x7b": (32, 8, 2, 4096, 14336, 32, 8, 32000, 32768),
}
_FIELDS = (
    "num_hidden_layers", "num_local_experts", "num_experts_per_tok", "hidden_size",
    "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
    "max_position_embeddings",
)  # fmt: skip
_BASE = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "rms_norm_eps": 1e-5,
         "rope_theta": 1e6, "sliding_window": None}  # fmt: skip
Mixtral.presets = {
    name: {**_BASE, **dict(zip(_FIELDS, shape, strict=True))} for name, shape in _SHAPES.items()
}

FAMILIES = (Mixtral(),)
