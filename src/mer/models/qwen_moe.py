"""Qwen2-MoE and Qwen3-MoE (`Qwen2MoeForCausalLM`, `Qwen3MoeForCausalLM`): tensor names.

Their quirks live in the config: Qwen2-MoE has q/k/v biases and a sigmoid-gated
shared expert; Qwen3-MoE has per-head QK RMSNorm; both may have dense layers
(`mlp_only_layers`, `decoder_sparse_step`) and renormalise top-k weights only
with `norm_topk_prob`. One table serves both: a tensor a config lacks is
simply never asked for.
"""

_P = "model.layers.{i}."
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
