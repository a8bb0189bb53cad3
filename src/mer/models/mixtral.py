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


FAMILIES = (Mixtral(),)
