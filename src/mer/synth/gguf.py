"""GGUF files written the way llama.cpp lays them out, from a Hugging Face config.

Two users: `mer synth --gguf` (random but valid blocks in the real shapes of
our presets, for benchmarks) and the tests (real weights of tiny transformers
models, quantized). Both share the metadata, the tensor list and the
tokenizer metadata here; tensors are written one at a time in file order, so a
file of any size is written in bounded memory.

Layout as llama.cpp's converter writes it: dims reversed (the `gguf` writer
does that from row-major shapes), experts stacked [n_expert, rows, cols] per
layer, llama-arch q/k rows permuted for interleaved RoPE, norms and routers in
F32, every other matrix in the chosen type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from mer.errors import ConfigError
from mer.store.gguf_arch import ARCHS

GGUF_ARCH = {a.model_type: name for name, a in ARCHS.items()} | {"deepseek_v3": "deepseek2"}
SYNTH_TYPES = ("Q4_0", "Q4_K", "Q8_0")
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5


class TensorSource(Protocol):
    """What `write_gguf` asks for each tensor: its GGUF type name, then its data (float32 or
    float16 for F32/F16, else quantized bytes in `to_gguf`'s row layout)."""

    def type_of(self, name: str, shape: tuple[int, ...], role: str) -> str: ...

    def __call__(self, name: str, shape: tuple[int, ...], role: str) -> np.ndarray: ...


def tensor_list(
    hf: dict, fused_gate_up: bool = False, split_kv_b: bool = True
) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, row-major shape, role) of every tensor, in file order.
    role: "norm" (1-D), "router", "matrix", "experts" (stacked). `fused_gate_up` writes
    each layer's gate and up experts as one `ffn_gate_up_exps` stack (gate rows first);
    `split_kv_b` DeepSeek's kv_b as attn_k_b and attn_v_b (llama.cpp's newer files)."""
    from mer.config import ModelConfig

    cfg = ModelConfig.from_hf(hf)
    if cfg.model_type.startswith(("deepseek", "glm4")):
        return _tensor_list_from_shapes(cfg, split_kv_b)
    h, d, v = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    q, kv, e, f = (
        cfg.num_attention_heads * d,
        cfg.num_key_value_heads * d,
        cfg.num_local_experts,
        cfg.intermediate_size,
    )
    oss = cfg.model_type == "gpt_oss"  # biases, sinks, post_attention_norm, expert biases
    out = [("token_embd.weight", (v, h), "matrix")]
    for i in range(cfg.num_hidden_layers):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", (h,), "norm"),
            (p + "attn_q.weight", (q, h), "matrix"),
            (p + "attn_k.weight", (kv, h), "matrix"),
            (p + "attn_v.weight", (kv, h), "matrix"),
        ]
        if cfg.qkv_bias:
            out += [
                (p + "attn_q.bias", (q,), "norm"),
                (p + "attn_k.bias", (kv,), "norm"),
                (p + "attn_v.bias", (kv,), "norm"),
            ]
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            out += [
                (p + "attn_q_norm.weight", (q if full else d,), "norm"),
                (p + "attn_k_norm.weight", (kv if full else d,), "norm"),
            ]
        out.append((p + "attn_output.weight", (h, q), "matrix"))
        if oss:
            out += [
                (p + "attn_output.bias", (h,), "norm"),
                (p + "attn_sinks.weight", (cfg.num_attention_heads,), "norm"),
            ]
        out.append((p + ("post_attention_norm" if oss else "ffn_norm") + ".weight", (h,), "norm"))
        if cfg.is_moe_layer(i):
            out.append((p + "ffn_gate_inp.weight", (e, h), "router"))
            if oss:
                out.append((p + "ffn_gate_inp.bias", (e,), "norm"))
            out += [
                *(
                    [(p + "ffn_gate_up_exps.weight", (e, 2 * f, h), "experts")]
                    if fused_gate_up
                    else [
                        (p + "ffn_gate_exps.weight", (e, f, h), "experts"),
                        (p + "ffn_up_exps.weight", (e, f, h), "experts"),
                    ]
                ),
                (p + "ffn_down_exps.weight", (e, h, f), "experts"),
            ]
            if oss:
                out += [
                    (p + "ffn_gate_exps.bias", (e, f), "norm"),
                    (p + "ffn_up_exps.bias", (e, f), "norm"),
                    (p + "ffn_down_exps.bias", (e, h), "norm"),
                ]
            s = cfg.shared_expert_intermediate_size
            if s:
                out += [
                    (p + "ffn_gate_inp_shexp.weight", (h,), "norm"),
                    (p + "ffn_gate_shexp.weight", (s, h), "matrix"),
                    (p + "ffn_up_shexp.weight", (s, h), "matrix"),
                    (p + "ffn_down_shexp.weight", (h, s), "matrix"),
                ]
        else:
            g = cfg.dense_intermediate_size
            out += [
                (p + "ffn_gate.weight", (g, h), "matrix"),
                (p + "ffn_up.weight", (g, h), "matrix"),
                (p + "ffn_down.weight", (h, g), "matrix"),
            ]
    out.append(("output_norm.weight", (h,), "norm"))
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", (v, h), "matrix"))
    return out


def _tensor_list_from_shapes(cfg, split_kv_b: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """DeepSeek's latent attention and GLM-4.5's spellings, from mer's own tensor shapes and
    the GGUF names of `gguf_arch`, layer by layer, then the layer's expert stacks."""
    from mer.models import naming
    from mer.store.gguf_arch import gguf_names

    arch = ARCHS[GGUF_ARCH[cfg.model_type]]
    shapes = naming.dense_shapes(cfg)
    names = gguf_names(list(shapes), cfg.num_hidden_layers, arch)
    e, h, f = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    layers: dict[int | None, list] = {}
    for ours, g in names.items():
        shape = shapes[ours]
        role = "norm" if len(shape) == 1 else "router" if ours.endswith("router") else "matrix"
        layer = int(ours.split(".")[1]) if ours.startswith("layers.") else None
        rows = layers.setdefault(layer, [])
        if split_kv_b and g.endswith("attn_kv_b.weight"):
            heads, r = cfg.num_attention_heads, cfg.kv_lora_rank
            rows.append((g.replace("kv_b", "k_b"), (heads, r, cfg.qk_nope_head_dim), "matrix"))
            rows.append((g.replace("kv_b", "v_b"), (heads, cfg.v_head_dim, r), "matrix"))
        else:
            rows.append((g, shape, role))
    for i in cfg.moe_layers:
        layers[i] += [
            (f"blk.{i}.ffn_gate_exps.weight", (e, f, h), "experts"),
            (f"blk.{i}.ffn_up_exps.weight", (e, f, h), "experts"),
            (f"blk.{i}.ffn_down_exps.weight", (e, h, f), "experts"),
        ]
    glob = layers.pop(None)
    out = [t for t in glob if t[0] == "token_embd.weight"]
    for i in range(cfg.num_hidden_layers):
        out += layers[i]
    return out + [t for t in glob if t[0] != "token_embd.weight"]


def add_metadata(w, hf: dict) -> None:
    """The `<arch>.*` keys llama.cpp's converter writes for this config."""
    from mer.config import ModelConfig

    cfg = ModelConfig.from_hf(hf)
    w.add_name(hf.get("_name_or_path") or f"mer synthetic {cfg.model_type}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.dense_intermediate_size or cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    mla = cfg.model_type.startswith("deepseek")  # latent attention: MQA in llama.cpp's terms
    w.add_head_count_kv(1 if mla else cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if mla:
        return _deepseek2_metadata(w, cfg)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(getattr(cfg, "rotary_dim", cfg.head_dim))  # GLM: partial
    if cfg.model_type != "mixtral":
        w.add_expert_feed_forward_length(cfg.intermediate_size)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
    if cfg.shared_expert_intermediate_size:
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if cfg.clip_qkv:
        w.add_clamp_kqv(float(cfg.clip_qkv))
    if cfg.model_type == "glm4_moe":  # DeepSeek-V3's routing and dense first layers
        from gguf import ExpertGatingFuncType

        w.add_leading_dense_block_count(len(cfg.dense_layers))
        w.add_expert_shared_count(cfg.shared_expert_intermediate_size // cfg.intermediate_size)
        w.add_expert_weights_scale(float(cfg.routed_scaling_factor))
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    if cfg.model_type == "gpt_oss":
        w.add_sliding_window(cfg.sliding_window)
    if getattr(cfg, "rope_type", "default") == "yarn":  # as llama.cpp writes gpt-oss's
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(cfg.rope_factor))
        w.add_rope_scaling_orig_ctx_len(cfg.rope_original_max_positions)


def _deepseek2_metadata(w, cfg) -> None:
    """DeepSeek-V2/V3 as llama.cpp writes it: latent attention as MQA over [latent | rope
    key], the heads' widths as key_length_mla/value_length_mla, V3 routing by sigmoid."""
    from gguf import ExpertGatingFuncType

    r, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    w.add_key_length(r + rope)
    w.add_value_length(r)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_kv_lora_rank(r)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_rope_dimension_count(rope)
    w.add_leading_dense_block_count(len(cfg.dense_layers))
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    w.add_expert_shared_count(cfg.shared_expert_intermediate_size // cfg.intermediate_size)
    w.add_expert_weights_scale(float(cfg.routed_scaling_factor))
    if cfg.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    v3 = cfg.topk_method == "noaux_tc"
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if v3 else ExpertGatingFuncType.SOFTMAX)
    y = cfg.rope_scaling
    if y:
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(y["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(y["original_max_position_embeddings"]))
        for key, setter in (
            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
        ):
            if y.get(key) is not None:
                setter(float(y[key]))
        if y.get("mscale_all_dim"):
            w.add_rope_scaling_yarn_log_mul(0.1 * y["mscale_all_dim"])


def add_tokenizer(w, tok, vocab_size: int, chat_template: str | None) -> None:
    """A byte-level BPE (`tokenizers.Tokenizer`) as `tokenizer.ggml.*` metadata ("gpt2" model).
    The list is padded to the model's vocabulary with unused tokens, as llama.cpp expects."""
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    special = {a.content for a in tok.get_added_tokens_decoder().values() if a.special}
    types = [TOKEN_CONTROL if t in special else TOKEN_NORMAL for t in tokens]
    pad = vocab_size - len(tokens)
    tokens += [f"<|unused{i}|>" for i in range(pad)]
    types += [TOKEN_UNUSED] * pad
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for name, setter in (
        ("<s>", w.add_bos_token_id),
        ("</s>", w.add_eos_token_id),
        ("<unk>", w.add_unk_token_id),
    ):
        if name in model["vocab"]:
            setter(model["vocab"][name])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a llama q/k projection from rotate-half to interleaved RoPE order (llama.cpp's)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """float [rows, cols] -> Q4_K blocks uint8 [rows, cols/256*144].

    Simple min/max per 32-weight sub-block, 6-bit scales and mins against the
    block's d and dmin: valid Q4_K, less careful than llama.cpp's search."""
    rows, cols = w.shape
    x = w.astype(np.float32).reshape(rows, cols // 256, 8, 32)
    lo = np.minimum(x.min(-1), 0)  # Q4_K subtracts a non-negative min
    hi = x.max(-1)
    sub_scale = (hi - lo) / 15
    mins = -lo
    d = (sub_scale.max(-1) / 63).astype(np.float16)  # [rows, nb]
    dmin = (mins.max(-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[..., None], dmin.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.round(sub_scale / df), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dminf > 0, np.round(mins / dminf), 0).clip(0, 63).astype(np.uint8)
        step = (df * sc)[..., None]
        q = np.where(step > 0, np.round((x + (dminf * mn)[..., None]) / step), 0)
    q = q.clip(0, 15).astype(np.uint8)  # [rows, nb, 8, 32]
    scales = np.empty((rows, cols // 256, 12), np.uint8)
    scales[..., 0:4] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    scales[..., 4:8] = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    scales[..., 8:12] = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    qs = q.reshape(rows, -1, 4, 2, 32)
    qs = (qs[..., 0, :] | (qs[..., 1, :] << 4)).reshape(rows, -1, 128)
    blocks = np.concatenate(
        [
            d.view(np.uint8).reshape(rows, -1, 2),
            dmin.view(np.uint8).reshape(rows, -1, 2),
            scales,
            qs,
        ],
        axis=-1,
    )
    return blocks.reshape(rows, -1)


def to_gguf(w: np.ndarray, type_name: str) -> np.ndarray:
    """float weights (any rank, rows last) -> the bytes (or floats) GGUF stores as `type_name`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if type_name in ("F32", "F16"):
        return w.astype(np.float32 if type_name == "F32" else np.float16)
    if type_name == "Q4_K":
        return quantize_q4_k(w.reshape(-1, w.shape[-1])).reshape(*w.shape[:-1], -1)
    return quantize(w.astype(np.float32), GGMLQuantizationType[type_name])


def random_blocks(type_name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks of `type_name` for a weight of `shape`, weights within about +-0.05
    (float types: N(0, 0.02) values). Every byte is random but the block scales."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if type_name in ("F32", "F16", "BF16"):
        return to_gguf((0.02 * rng.standard_normal(shape)).astype(np.float32), type_name)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    n = rows * cols // block
    out = rng.integers(0, 256, (n, size), dtype=np.uint8)  # nibbles / int8s / packed 6-bit scales

    def f16(lo, hi):
        return rng.uniform(lo, hi, (n, 1)).astype(np.float16).view(np.uint8)

    if type_name == "Q4_0":
        out[:, 0:2] = f16(0.002, 0.006)
    elif type_name == "Q8_0":
        out[:, 0:2] = f16(0.0001, 0.0003)
    elif type_name == "Q4_1":
        out[:, 0:2] = f16(0.002, 0.006)
        out[:, 2:4] = f16(-0.04, -0.02)  # the block's minimum
    elif type_name in ("Q4_K", "Q5_K"):
        top = 0.0002 if type_name == "Q4_K" else 0.0001  # times 6-bit scales, 4- or 5-bit q
        out[:, 0:2] = f16(top / 2, top)  # d
        out[:, 2:4] = f16(0.0001, 0.0002)  # dmin
    elif type_name == "Q6_K":
        out[:, 208:210] = f16(0.00001, 0.00002)  # d, times int8 scales, times q - 32
    elif type_name == "MXFP4":
        out[:, 0] = rng.integers(119, 122, n)  # e8m0: 2^(e - 127) * (up to +-6)
    else:
        raise ConfigError(f"--gguf-type must be one of {', '.join(SYNTH_TYPES)}, got {type_name}")
    return out.reshape(*shape[:-1], -1)


def write_gguf(
    path: Path,
    hf: dict,
    source: TensorSource,
    tokenizer=None,
    chat_template: str | None = None,
    split_max_tensors: int = 0,
    progress: bool = False,
    tensors: list[tuple[str, tuple[int, ...], str]] | None = None,
    extra_metadata: dict[str, str | bool | float | int | list] | None = None,
) -> list[Path]:
    """Write a GGUF (or a split set) for config `hf`, its tensors (default `tensor_list(hf)`)
    in order, each asked of `source` when its turn comes; `extra_metadata` adds keys
    (str, bool, float32, uint32, or arrays). Returns the files written."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    from mer.progress import progress_bar

    model_type = hf.get("model_type")
    if model_type not in GGUF_ARCH:
        raise ConfigError(f"no GGUF architecture for model type {model_type!r}")
    w = GGUFWriter(path, GGUF_ARCH[model_type], split_max_tensors=split_max_tensors)
    add_metadata(w, hf)
    if tokenizer is not None:
        add_tokenizer(w, tokenizer, hf["vocab_size"], chat_template)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    listing = tensor_list(hf) if tensors is None else tensors
    # The header lists every tensor's type and size before any data is written.
    for name, shape, role in listing:
        qt = GGMLQuantizationType[source.type_of(name, shape, role)]
        block, size = GGML_QUANT_SIZES[qt]
        nbytes = int(np.prod(shape)) * size // block
        # An element shape with the raw type given (a uint8 dtype would mean a byte shape).
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = sum(int(np.prod(s)) for _, s, _ in listing)
    with progress_bar(total, f"write {path.name}", progress) as bar:
        for name, shape, role in listing:
            w.write_tensor_data(np.ascontiguousarray(source(name, shape, role)))
            bar.advance(int(np.prod(shape)))
    files = w.format_shard_names(path)
    w.close()
    return files


class RandomTensors:
    """`write_gguf`'s tensor source for synthetic files: random valid blocks of one type."""

    def __init__(self, type_name: str, seed: int = 0) -> None:
        if type_name not in SYNTH_TYPES:
            raise ConfigError(
                f"--gguf-type must be one of {', '.join(SYNTH_TYPES)}, got {type_name}"
            )
        self.type_name = type_name
        self.rng = np.random.default_rng(seed)

    def type_of(self, name: str, shape: tuple[int, ...], role: str) -> str:
        if role in ("norm", "router"):
            return "F32"
        if shape[-1] % 32:  # rows not whole blocks (DeepSeek's narrow heads): F16, as llama.cpp
            return "F16"
        return self.type_name if shape[-1] % 256 == 0 or self.type_name != "Q4_K" else "Q8_0"

    def __call__(self, name: str, shape: tuple[int, ...], role: str) -> np.ndarray:
        if role == "norm":
            return (1 + 0.1 * self.rng.standard_normal(shape)).astype(np.float32)
        if role == "router":
            return (0.02 * self.rng.standard_normal(shape)).astype(np.float32)
        return random_blocks(self.type_of(name, shape, role), shape, self.rng)


def write_synthetic_gguf(
    out: str | Path, hf: dict, type_name: str = "Q4_K", seed: int = 0, progress: bool = True
) -> list[Path]:
    """A synthetic GGUF of config `hf` (e.g. `mer.synth.checkpoint.hf_config(preset)`) with
    random blocks of `type_name`, and the synthetic byte-level tokenizer with a chat template."""
    from mer.synth.tokenizer import CHAT_TEMPLATE, build_tokenizer

    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out}: already exists")
    tensors = RandomTensors(type_name, seed)
    tok = build_tokenizer(hf["vocab_size"])
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        files = write_gguf(tmp, hf, tensors, tok, CHAT_TEMPLATE, progress=progress)
        tmp.rename(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return [out] if files == [tmp] else files
