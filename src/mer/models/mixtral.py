"""Mixtral (`MixtralForCausalLM`): the Hugging Face tensor names mapped onto mer's names.

The plain architecture the shared transformer implements: pre-norm GQA
attention with RoPE (optional sliding window) and a softmax top-k routed
SwiGLU MoE in every layer. No shared expert, no QK-norm, no biases.
"""

from __future__ import annotations

from mer.config import ModelConfig

MODEL_TYPE = "mixtral"

GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "lm_head",
}
LAYER_TENSORS = {
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.q",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.k",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.v",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.o",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm",
    "model.layers.{i}.block_sparse_moe.gate.weight": "layers.{i}.router",
}
EXPERT_TENSORS = {
    "w1": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",  # gate [ffn, hidden]
    "w2": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",  # down [hidden, ffn]
    "w3": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",  # up   [ffn, hidden]
}


def dense_names(cfg: ModelConfig) -> dict[str, str]:
    """HF name -> mer name for every resident tensor."""
    names = dict(GLOBAL_TENSORS)
    for i in range(cfg.num_hidden_layers):
        names.update({hf.format(i=i): ours.format(i=i) for hf, ours in LAYER_TENSORS.items()})
    return names


def expert_names(layer: int, expert: int) -> dict[str, str]:
    return {w: hf.format(i=layer, e=expert) for w, hf in EXPERT_TENSORS.items()}


def dense_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """mer name -> expected shape, to check a checkpoint before converting it."""
    h, d = cfg.hidden_size, cfg.head_dim
    shapes = {"embed": (cfg.vocab_size, h), "norm": (h,), "lm_head": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        shapes.update({
            f"layers.{i}.attn_norm": (h,),
            f"layers.{i}.q": (cfg.num_attention_heads * d, h),
            f"layers.{i}.k": (cfg.num_key_value_heads * d, h),
            f"layers.{i}.v": (cfg.num_key_value_heads * d, h),
            f"layers.{i}.o": (h, cfg.num_attention_heads * d),
            f"layers.{i}.ffn_norm": (h,),
            f"layers.{i}.router": (cfg.num_local_experts, h),
        })  # fmt: skip
    return shapes


def expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    h, f = cfg.hidden_size, cfg.intermediate_size
    return {"w1": (f, h), "w2": (h, f), "w3": (f, h)}
