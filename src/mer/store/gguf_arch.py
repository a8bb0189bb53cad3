"""GGUF architectures as mer families: the metadata -> config map and the tensor-name table.

llama.cpp names an architecture (`general.architecture`) and writes the model's
hyperparameters under `<arch>.<key>` and its tensors under fixed names
(`blk.{i}.attn_q.weight`, `blk.{i}.ffn_gate_exps.weight`, ...). This module is
the one place those names are translated: `hf_config` rebuilds the Hugging Face
config dict `ModelConfig.from_hf` already understands, and `DENSE_NAMES` maps
each resident tensor onto mer's own names. A new family is one `GGUFArch` entry
here plus its mer family; `deepseek2` (V2 and V3) and `glm4moe` write their MoE
settings DeepSeek's way and have their own config readers (`_deepseek2_config`,
`_glm4moe_config`).

What GGUF does not record is derived from the tensors present, as llama.cpp
itself does: a layer without a router (`ffn_gate_inp`) is a dense layer, a
file without `output.weight` ties its embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mer.errors import ConvertError


@dataclass(frozen=True)
class GGUFArch:
    """How one `general.architecture` maps onto a mer family."""

    model_type: str  # mer / Hugging Face model_type
    architecture: str  # the Hugging Face class name recorded in hf_config
    defaults: dict[str, Any] = field(default_factory=dict)  # what llama.cpp assumes unwritten
    # llama.cpp's converter reorders the rows of q_proj/k_proj of llama-arch models from
    # Hugging Face's rotate-half RoPE to interleaved pairs; mer computes rotate-half, so undo it.
    permute_qk: bool = False
    # Accepts the file only if this holds (llama is a MoE only with experts).
    accepts: Callable[[dict[str, Any]], str | None] = lambda meta: None
    # GGUF name -> mer name of layer tensors this architecture names its own way.
    layer_names: dict[str, str] = field(default_factory=dict)


def _llama_is_moe(meta: dict[str, Any]) -> str | None:
    if int(meta.get("llama.expert_count", 0) or 0) > 0:
        return None
    return "a dense llama model (llama.expert_count is 0 or absent): mer runs MoE models only"


ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch(
        "mixtral", "MixtralForCausalLM", {"norm_topk_prob": True}, True, _llama_is_moe
    ),
    "qwen2moe": GGUFArch("qwen2_moe", "Qwen2MoeForCausalLM", {"norm_topk_prob": False}),
    "qwen3moe": GGUFArch("qwen3_moe", "Qwen3MoeForCausalLM", {"norm_topk_prob": True}),
    "olmoe": GGUFArch("olmoe", "OlmoeForCausalLM", {"norm_topk_prob": False}),
    # gpt-oss: what llama.cpp does not write is what it assumes (alternating sliding/full
    # layers from the first, SwiGLU alpha 1.702 and limit 7, the published YaRN without
    # truncation of the ramp, as transformers runs openai/gpt-oss-*).
    "gpt-oss": GGUFArch(
        "gpt_oss",
        "GptOssForCausalLM",
        {"norm_topk_prob": True, "swiglu_limit": 7.0, "attention_bias": True},
        layer_names={"post_attention_norm.weight": "ffn_norm"},
    ),
    # DeepSeek-V2 and V3 share the name; V3 is the one routing by sigmoid
    # (`expert_gating_func` 2). Its config is built by `_deepseek2_config`.
    "deepseek2": GGUFArch(
        "deepseek_v2", "DeepseekV2ForCausalLM", layer_names={"exp_probs_b.bias": "router_bias"}
    ),
    # GLM-4.5: DeepSeek-V3's routing and spellings over GQA attention; the multi-token-
    # prediction layer llama.cpp appends (`nextn_predict_layers`) is not read.
    "glm4moe": GGUFArch(
        "glm4_moe",
        "Glm4MoeForCausalLM",
        layer_names={"post_attention_norm.weight": "ffn_norm", "exp_probs_b.bias": "router_bias"},
    ),
}
GATING_SIGMOID = 2  # gguf's ExpertGatingFuncType.SIGMOID

# `<arch>.<key>` -> Hugging Face config field. Required keys first.
REQUIRED_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
}
OPTIONAL_KEYS = {
    "context_length": "max_position_embeddings",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "attention.clamp_kqv": "clip_qkv",
    "expert_weights_norm": "norm_topk_prob",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
}

# GGUF name -> mer name of every resident tensor a file may hold ({i}: the layer).
GLOBAL_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "norm",
                "output.weight": "lm_head"}  # fmt: skip
LAYER_NAMES = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "q",
    "attn_k.weight": "k",
    "attn_v.weight": "v",
    "attn_output.weight": "o",
    "attn_output.bias": "o_bias",
    "attn_sinks.weight": "sinks",
    "attn_q.bias": "q_bias",
    "attn_k.bias": "k_bias",
    "attn_v.bias": "v_bias",
    "attn_q_norm.weight": "q_norm",
    "attn_k_norm.weight": "k_norm",
    "ffn_norm.weight": "ffn_norm",
    "ffn_gate_inp.weight": "router",
    "ffn_gate_inp.bias": "router_bias",
    "attn_q_a.weight": "q_a",
    "attn_q_a_norm.weight": "q_a_norm",
    "attn_q_b.weight": "q_b",
    "attn_kv_a_mqa.weight": "kv_a",
    "attn_kv_a_norm.weight": "kv_a_norm",
    "attn_kv_b.weight": "kv_b",
    "ffn_gate_shexp.weight": "shared.gate",
    "ffn_up_shexp.weight": "shared.up",
    "ffn_down_shexp.weight": "shared.down",
    "ffn_gate_inp_shexp.weight": "shared_gate",
    "ffn_gate.weight": "mlp.gate",
    "ffn_up.weight": "mlp.up",
    "ffn_down.weight": "mlp.down",
}
# Routed experts, stacked [n_expert, rows, cols] per layer: split gate/up, or fused gate_up.
EXPERT_NAMES = {
    "w1": "blk.{i}.ffn_gate_exps.weight",
    "w3": "blk.{i}.ffn_up_exps.weight",
    "w2": "blk.{i}.ffn_down_exps.weight",
}
FUSED_GATE_UP = "blk.{i}.ffn_gate_up_exps.weight"
EXPERT_BIAS_NAMES = {
    "b1": "blk.{i}.ffn_gate_exps.bias",
    "b3": "blk.{i}.ffn_up_exps.bias",
    "b2": "blk.{i}.ffn_down_exps.bias",
}
# Mixtral files written before llama.cpp stacked experts (early 2024): one tensor per expert.
PER_EXPERT_NAMES = {
    "w1": "blk.{i}.ffn_gate.{{e}}.weight",
    "w3": "blk.{i}.ffn_up.{{e}}.weight",
    "w2": "blk.{i}.ffn_down.{{e}}.weight",
}


def gguf_names(
    mer_names: set[str] | list[str], n_layers: int, arch: GGUFArch | None = None
) -> dict[str, str]:
    """mer name -> GGUF name for the given resident tensors (`arch`'s own names first)."""
    table = {ours: g for g, ours in GLOBAL_NAMES.items()}
    own = arch.layer_names if arch else {}
    layer = {g: s for g, s in LAYER_NAMES.items() if s not in own.values()} | own
    for i in range(n_layers):
        for g, short in layer.items():
            table[f"layers.{i}.{short}"] = f"blk.{i}.{g}"
    return {n: table[n] for n in mer_names}


def arch_of(meta: dict[str, Any], where: str) -> GGUFArch:
    name = meta.get("general.architecture")
    if name is None:
        raise ConvertError(f"{where}: missing metadata general.architecture")
    arch = ARCHS.get(name)
    if arch is None:
        raise ConvertError(
            f"{where}: unsupported GGUF architecture {name!r} (supported: {', '.join(ARCHS)})"
        )
    reason = arch.accepts(meta)
    if reason:
        raise ConvertError(f"{where}: {reason}")
    return arch


def hf_config(
    meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str
) -> dict[str, Any]:
    """The Hugging Face config dict this file's metadata and tensors describe.

    `shapes` maps GGUF tensor names to their shapes in Hugging Face (row-major) order.
    """
    name = meta["general.architecture"]
    arch = arch_of(meta, where)
    if name == "deepseek2":
        return _deepseek2_config(meta, shapes, where)
    if name == "glm4moe":
        return _glm4moe_config(meta, shapes, where)
    cfg: dict[str, Any] = {"model_type": arch.model_type, "architectures": [arch.architecture]}
    cfg.update(arch.defaults)
    for key, hf in REQUIRED_KEYS.items():
        full = f"{name}.{key}"
        if full not in meta:
            raise ConvertError(f"{where}: missing metadata {full}")
        cfg[hf] = int(meta[full])
    for key, hf in OPTIONAL_KEYS.items():
        v = meta.get(f"{name}.{key}")
        if v is not None:
            cfg[hf] = v
    if cfg.get("clip_qkv") in (0, 0.0):
        cfg["clip_qkv"] = None
    scaling = meta.get(f"{name}.rope.scaling.type")
    if scaling not in (None, "", "none"):  # ModelConfig refuses what mer does not compute
        factor = meta.get(f"{name}.rope.scaling.factor")
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": factor}
        for key, hf_key in (
            ("original_context_length", "original_max_position_embeddings"),
            ("yarn_beta_fast", "beta_fast"),
            ("yarn_beta_slow", "beta_slow"),
        ):
            v = meta.get(f"{name}.rope.scaling.{key}")
            if v is not None:
                cfg["rope_scaling"][hf_key] = v
        if arch.model_type == "gpt_oss":
            cfg["rope_scaling"].setdefault("truncate", False)
    if arch.model_type == "gpt_oss":  # llama.cpp: sliding, full, sliding, ... from layer 0
        window = meta.get(f"{name}.attention.sliding_window")
        if window is None:
            raise ConvertError(f"{where}: missing metadata {name}.attention.sliding_window")
        cfg["sliding_window"] = int(window)
    n = cfg["num_hidden_layers"]
    if "token_embd.weight" not in shapes:
        raise ConvertError(f"{where}: missing tensor token_embd.weight")
    cfg["vocab_size"] = shapes["token_embd.weight"][0]
    cfg["tie_word_embeddings"] = "output.weight" not in shapes
    # Expert width from the expert tensors themselves: the key is absent in Mixtral files.
    moe = [i for i in range(n) if f"blk.{i}.ffn_gate_inp.weight" in shapes]
    if not moe:
        raise ConvertError(f"{where}: no layer has a router (blk.N.ffn_gate_inp.weight)")
    down = EXPERT_NAMES["w2"].format(i=moe[0])
    if down not in shapes:
        down = PER_EXPERT_NAMES["w2"].format(i=moe[0]).format(e=0)
    if down not in shapes:
        raise ConvertError(f"{where}: missing tensor {EXPERT_NAMES['w2'].format(i=moe[0])}")
    ffn = shapes[down][-1]
    dense = [i for i in range(n) if i not in moe]
    dense_ffn = int(meta.get(f"{name}.feed_forward_length", 0) or 0)
    if dense:
        up = f"blk.{dense[0]}.ffn_up.weight"
        dense_ffn = shapes[up][0] if up in shapes else dense_ffn
    if arch.model_type in ("mixtral", "gpt_oss"):
        cfg["intermediate_size"] = ffn
    else:
        cfg["moe_intermediate_size"] = ffn
        cfg["intermediate_size"] = dense_ffn or ffn
        cfg["mlp_only_layers"] = dense
    if dense and arch.model_type in ("mixtral", "olmoe", "gpt_oss"):
        raise ConvertError(f"{where}: layers {dense} have no router; {name} is all-MoE")
    for i in moe:  # a shared expert is all or nothing in our families
        if "shared_expert_intermediate_size" not in cfg and (
            f"blk.{i}.ffn_down_shexp.weight" in shapes
        ):
            cfg["shared_expert_intermediate_size"] = shapes[f"blk.{i}.ffn_down_shexp.weight"][-1]
    if "bos_token_id" not in cfg:
        cfg["bos_token_id"] = meta.get("tokenizer.ggml.bos_token_id")
        cfg["eos_token_id"] = meta.get("tokenizer.ggml.eos_token_id")
    return cfg


def _deepseek2_config(
    meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str
) -> dict[str, Any]:
    """DeepSeek-V2/V3's config.json from a `deepseek2` file. llama.cpp writes the latent
    attention as MQA over [latent | rope key] (key_length = kv_lora_rank + rope dims) and
    the real head widths as key_length_mla/value_length_mla (older files: key_length and
    value_length are the heads' own)."""

    get = _getter(meta, "deepseek2", where)
    n = int(get("block_count"))
    v3 = int(get("expert_gating_func", 1)) == GATING_SIGMOID
    rope = int(get("rope.dimension_count"))
    if get("attention.key_length_mla", None) is not None:
        qk, v = int(get("attention.key_length_mla")), int(get("attention.value_length_mla"))
    else:
        qk, v = int(get("attention.key_length")), int(get("attention.value_length"))
    cfg = _v3_moe(get, meta, shapes, n, where)
    n_group = cfg["n_group"]
    cfg |= {
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "q_lora_rank": get("attention.q_lora_rank", None),
        "kv_lora_rank": int(get("attention.kv_lora_rank")),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": qk - rope,
        "v_head_dim": v,
        "topk_method": "noaux_tc" if v3 else "group_limited_greedy" if n_group > 1 else "greedy",
    }
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    scaling = get("rope.scaling.type", None)
    if scaling not in (None, "", "none"):
        y: dict[str, Any] = {"rope_type": scaling, "factor": get("rope.scaling.factor", None)}
        for key, hf_key in (
            ("original_context_length", "original_max_position_embeddings"),
            ("yarn_beta_fast", "beta_fast"),
            ("yarn_beta_slow", "beta_slow"),
        ):
            if get(f"rope.scaling.{key}", None) is not None:
                y[hf_key] = get(f"rope.scaling.{key}")
        log_mul = get("rope.scaling.yarn_log_multiplier", None)
        if log_mul:  # llama.cpp writes 0.1 * mscale_all_dim (published: mscale == it)
            y["mscale"] = y["mscale_all_dim"] = round(float(log_mul) / 0.1, 6)
        cfg["rope_scaling"] = y
    return cfg


def _getter(meta: dict[str, Any], arch: str, where: str) -> Callable[..., Any]:
    def get(key: str, default: Any = ...) -> Any:
        v = meta.get(f"{arch}.{key}")
        if v is None:
            if default is ...:
                raise ConvertError(f"{where}: missing metadata {arch}.{key}")
            return default
        return v

    return get


def _v3_moe(get, meta: dict[str, Any], shapes: dict, n: int, where: str) -> dict[str, Any]:
    """The config fields DeepSeek and GLM-4.5 share: sizes, leading dense layers, shared
    experts and the grouped, scaled routing, in DeepSeek's config.json spellings."""
    if "token_embd.weight" not in shapes:
        raise ConvertError(f"{where}: missing tensor token_embd.weight")
    moe = [i for i in range(n) if f"blk.{i}.ffn_gate_inp.weight" in shapes]
    first = int(get("leading_dense_block_count", 0))
    if moe != list(range(first, n)):
        raise ConvertError(
            f"{where}: routers in layers {moe}, but leading_dense_block_count says {first}"
        )
    down = EXPERT_NAMES["w2"].format(i=first)
    if down not in shapes:
        raise ConvertError(f"{where}: missing tensor {down}")
    up = "blk.0.ffn_up.weight"
    dense_ffn = int(get("feed_forward_length", 0) or shapes[down][-1])
    return {
        "num_hidden_layers": n,
        "hidden_size": int(get("embedding_length")),
        "num_attention_heads": int(get("attention.head_count")),
        "n_routed_experts": int(get("expert_count")),
        "num_experts_per_tok": int(get("expert_used_count")),
        "max_position_embeddings": int(get("context_length", 4096)),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0),
        "vocab_size": shapes["token_embd.weight"][0],
        "tie_word_embeddings": "output.weight" not in shapes,
        "moe_intermediate_size": shapes[down][-1],
        "intermediate_size": shapes[up][0] if first and up in shapes else dense_ffn,
        "n_shared_experts": int(get("expert_shared_count", 0)),
        "first_k_dense_replace": first,
        "routed_scaling_factor": float(get("expert_weights_scale", 1.0) or 1.0),
        "norm_topk_prob": bool(get("expert_weights_norm", False)),
        "n_group": int(get("expert_group_count", 1) or 1),
        "topk_group": int(get("expert_group_used_count", 1) or 1),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }


def mtp_layers(meta: dict[str, Any]) -> int:
    """Multi-token-prediction layers a glm4moe file appends after the model's own."""
    if meta.get("general.architecture") != "glm4moe":
        return 0
    return int(meta.get("glm4moe.nextn_predict_layers", 0) or 0)


def _glm4moe_config(
    meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str
) -> dict[str, Any]:
    """GLM-4.5's config.json from a `glm4moe` file: block_count counts the appended MTP
    layers; biases and QK norms are as the tensors present say; the rotating part of each
    head is rope.dimension_count (partial_rotary_factor)."""
    get = _getter(meta, "glm4moe", where)
    n = int(get("block_count")) - mtp_layers(meta)
    if int(get("expert_gating_func", GATING_SIGMOID)) != GATING_SIGMOID:
        raise ConvertError(f"{where}: glm4moe routing other than sigmoid is not supported")
    cfg = _v3_moe(get, meta, shapes, n, where)
    heads = cfg["num_attention_heads"]
    head_dim = int(get("attention.key_length", cfg["hidden_size"] // heads))
    cfg |= {
        "model_type": "glm4_moe",
        "architectures": ["Glm4MoeForCausalLM"],
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "partial_rotary_factor": int(get("rope.dimension_count", head_dim // 2)) / head_dim,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "use_qk_norm": "blk.0.attn_q_norm.weight" in shapes,
    }
    scaling = get("rope.scaling.type", None)
    if scaling not in (None, "", "none"):  # ModelConfig refuses what mer does not compute
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": get("rope.scaling.factor", None)}
    return cfg
