"""Mixtral (`MixtralForCausalLM`): Hugging Face tensor names. The plain architecture: every
layer routed (softmax top-k, renormalised), no shared expert, no QK-norm, no biases."""

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
