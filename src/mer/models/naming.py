"""Which resident tensors a model has, their shapes, and their names in a family's checkpoint.

mer names every resident tensor the same way whatever the family (`embed`,
`layers.3.q`, `layers.3.shared.down`, ...). What exists follows from the
config (biases, QK-norm, shared expert, dense layers); a family file only
supplies the Hugging Face name template of each, so the converter can map
them once, offline.
"""

from __future__ import annotations

from types import ModuleType

from mer.config import ModelConfig


def global_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, v = cfg.hidden_size, cfg.vocab_size
    return {"embed": (v, h), "norm": (h,), "lm_head": (v, h)}


def layer_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Short name (without `layers.{i}.`) -> shape, for every resident tensor of layer i."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {
        "attn_norm": (h,),
        "q": (q, h),
        "k": (kv, h),
        "v": (kv, h),
        "o": (h, q),
        "ffn_norm": (h,),
    }
    if cfg.qkv_bias:
        shapes.update({"q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,)})
    if cfg.qk_norm == "head":
        shapes.update({"q_norm": (d,), "k_norm": (d,)})
    elif cfg.qk_norm == "full":
        shapes.update({"q_norm": (q,), "k_norm": (kv,)})
    if cfg.is_moe_layer(i):
        shapes["router"] = (cfg.num_local_experts, h)
        s = cfg.shared_expert_intermediate_size
        if s:
            shapes.update({
                "shared.gate": (s, h), "shared.up": (s, h), "shared.down": (h, s),
                "shared_gate": (1, h),
            })  # fmt: skip
    else:
        f = cfg.dense_intermediate_size
        shapes.update({"mlp.gate": (f, h), "mlp.up": (f, h), "mlp.down": (h, f)})
    return shapes


def dense_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """mer name -> shape for every resident tensor."""
    shapes = global_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        shapes.update({f"layers.{i}.{k}": s for k, s in layer_shapes(cfg, i).items()})
    return shapes


def dense_names(fam: ModuleType, cfg: ModelConfig) -> dict[str, str]:
    """Hugging Face name -> mer name for every resident tensor of this config."""
    names = {fam.GLOBAL[k]: k for k in global_shapes(cfg)}
    for i in range(cfg.num_hidden_layers):
        for short in layer_shapes(cfg, i):
            names[fam.LAYER[short].format(i=i)] = f"layers.{i}.{short}"
    return names


def expert_names(fam: ModuleType, layer: int, expert: int) -> dict[str, str]:
    """w1 (gate), w2 (down), w3 (up) -> Hugging Face names of one routed expert."""
    return {w: hf.format(i=layer, e=expert) for w, hf in fam.EXPERT.items()}


def expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    h, f = cfg.hidden_size, cfg.intermediate_size
    return {"w1": (f, h), "w2": (h, f), "w3": (f, h)}
