"""Synthetic Mixtral checkpoints in the real Hugging Face layout, from tiny to full size.

What is written is what a downloaded checkpoint holds (config.json,
generation_config.json, safetensors shards with their index, tokenizer.json
and tokenizer_config.json), so synthetic and real models take the same path
through `mer convert`. Weights are random but shaped like a trained model's
(unit-scale activations through any depth), deterministic per (seed, tensor
name) whatever the sharding. Writing streams tensor by tensor: memory stays
within one tensor at any model size.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch

from mer.config import ModelConfig
from mer.errors import ConfigError
from mer.models import naming
from mer.models.registry import family
from mer.progress import progress_bar
from mer.store.staging import Staging
from mer.synth.tokenizer import build_tokenizer, write_tokenizer_files

# Mixtral-architecture shapes: (layers, experts, top_k, hidden, ffn, heads, kv_heads, vocab,
# max_positions).
_MIXTRAL = {
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
_MIXTRAL_BASE = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "sliding_window": None,
}
_QWEN2_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "use_sliding_window": False,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}
_QWEN3_MOE = {**_QWEN2_MOE, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
              "norm_topk_prob": True}  # fmt: skip
_OLMOE = {
    "architectures": ["OlmoeForCausalLM"],
    "model_type": "olmoe",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "norm_topk_prob": False,
    "clip_qkv": None,
}
PRESETS: dict[str, dict] = {
    **{name: {**_MIXTRAL_BASE, **dict(zip(_FIELDS, shape, strict=True))}
       for name, shape in _MIXTRAL.items()},
    # The published full-size shapes of each family's best-known checkpoint.
    "qwen2-moe-a2.7b": {**_QWEN2_MOE, "num_hidden_layers": 24, "num_experts": 60,
                        "num_experts_per_tok": 4, "hidden_size": 2048,
                        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                        "intermediate_size": 5632, "num_attention_heads": 16,
                        "num_key_value_heads": 16, "vocab_size": 151936,
                        "max_position_embeddings": 8192},
    "qwen3-moe-30b-a3b": {**_QWEN3_MOE, "num_hidden_layers": 48, "num_experts": 128,
                          "num_experts_per_tok": 8, "hidden_size": 2048, "head_dim": 128,
                          "moe_intermediate_size": 768, "intermediate_size": 6144,
                          "num_attention_heads": 32, "num_key_value_heads": 4,
                          "vocab_size": 151936, "max_position_embeddings": 40960},
    "olmoe-1b-7b": {**_OLMOE, "num_hidden_layers": 16, "num_experts": 64,
                    "num_experts_per_tok": 8, "hidden_size": 2048, "intermediate_size": 1024,
                    "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 50304,
                    "max_position_embeddings": 4096},
    # DeepSeek-V2-Lite's expert shapes and counts (the shared trace's model) as a Qwen2-MoE
    # until a DeepSeek family exists: 26 MoE layers after a dense one, 64 routed experts of
    # 2048 x 1408, top-6, two shared experts (one of 2 x 1408); plain attention, not MLA.
    "dsv2-lite-shape": {**_QWEN2_MOE, "num_hidden_layers": 27, "mlp_only_layers": [0],
                        "num_experts": 64, "num_experts_per_tok": 6, "hidden_size": 2048,
                        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 2816,
                        "intermediate_size": 10944, "num_attention_heads": 16,
                        "num_key_value_heads": 16, "vocab_size": 102400,
                        "max_position_embeddings": 4096},
    # Tiny ones of each, with every quirk switched on, for tests.
    "tiny-qwen2-moe": {**_QWEN2_MOE, "num_hidden_layers": 3, "num_experts": 4,
                       "num_experts_per_tok": 2, "hidden_size": 64, "moe_intermediate_size": 64,
                       "shared_expert_intermediate_size": 96, "intermediate_size": 128,
                       "mlp_only_layers": [1], "num_attention_heads": 4,
                       "num_key_value_heads": 2, "vocab_size": 512,
                       "max_position_embeddings": 512, "tie_word_embeddings": True},
    "tiny-qwen3-moe": {**_QWEN3_MOE, "num_hidden_layers": 4, "num_experts": 8,
                       "num_experts_per_tok": 2, "hidden_size": 64, "head_dim": 32,
                       "moe_intermediate_size": 64, "intermediate_size": 128,
                       "decoder_sparse_step": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "vocab_size": 512,
                       "max_position_embeddings": 512},
    "tiny-olmoe": {**_OLMOE, "num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2,
                   "hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512,
                   "clip_qkv": 3.0},
}  # fmt: skip
# CLI flag -> Hugging Face config field (ffn: the routed experts' width in every family).
OVERRIDE_FLAGS = {
    "layers": "num_hidden_layers",
    "experts": "num_local_experts",
    "top_k": "num_experts_per_tok",
    "hidden": "hidden_size",
    "ffn": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "vocab": "vocab_size",
}


def hf_config(preset: str = "tiny", **overrides) -> dict:
    """A complete config.json dict for a preset, with overrides by Hugging Face field name."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    cfg = {
        **PRESETS[preset],
        "hidden_act": "silu",
        "tie_word_embeddings": PRESETS[preset].get("tie_word_embeddings", False),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "output_router_logits": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }
    # Families name the expert count and width differently; overrides use one spelling.
    aliases = {"num_local_experts": "num_experts", "intermediate_size": "moe_intermediate_size"}
    for ours, theirs in aliases.items():
        if ours in overrides and theirs in cfg and ours not in PRESETS[preset]:
            overrides[theirs] = overrides.pop(ours)
    unknown = set(overrides) - set(cfg) - set(_FIELDS)
    if unknown:
        raise ConfigError(f"unknown config fields {sorted(unknown)}")
    cfg.update(overrides)
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    return cfg


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint under its Hugging Face name, in file order."""
    config = ModelConfig.from_hf(cfg)
    fam = family(config.model_type)
    names = naming.dense_names(fam, config)
    if config.tie_word_embeddings:
        names = {hf: ours for hf, ours in names.items() if ours != "lm_head"}
    shapes = naming.dense_shapes(config)
    eshapes = naming.expert_shapes(config)
    by_layer: dict[int, list] = {i: [] for i in range(config.num_hidden_layers)}
    head, tail = [], []
    for hf, ours in names.items():
        if ours.startswith("layers."):
            by_layer[int(ours.split(".")[1])].append((hf, shapes[ours]))
        else:
            (head if ours == "embed" else tail).append((hf, shapes[ours]))
    for layer, e in config.expert_keys():
        by_layer[layer] += [
            (hf, eshapes[w]) for w, hf in naming.expert_names(fam, layer, e).items()
        ]
    return head + [spec for i in sorted(by_layer) for spec in by_layer[i]] + tail


def _std(name: str, shape: tuple[int, ...], layers: int) -> float:
    fan_in = shape[-1]
    if name.endswith(("o_proj.weight", "w2.weight", "down_proj.weight")):
        # Outputs added to the residual stream: shrink so depth does not blow it up.
        return 1 / math.sqrt(fan_in * 2 * layers)
    if name == "model.embed_tokens.weight":
        return 1.0
    return 1 / math.sqrt(fan_in)


def random_tensor(
    name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, seed: int = 0,
    layers: int = 1,
) -> torch.Tensor:  # fmt: skip
    """Deterministic in (seed, name): the same weights whatever order or shard they land in."""
    gen.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))  # the CPU generator keeps 32 bits
    if name.endswith(".bias"):
        return (0.02 * torch.randn(shape, generator=gen)).to(dtype)
    if len(shape) == 1:  # norm weights
        return (1 + 0.05 * torch.randn(shape, generator=gen)).to(dtype)
    return (torch.randn(shape, generator=gen) * _std(name, shape, layers)).to(dtype)


SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def write_safetensors(path: Path, specs, dtype: torch.dtype, make):
    """Write a .safetensors file one tensor at a time; yields (name, tensor) as each is written.

    The format is an 8-byte little-endian header length, a JSON header giving each
    tensor's dtype, shape and byte range, then the raw data. Shapes are known up front, so
    the header goes first and no more than one tensor is ever in memory.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in specs:
            t = make(name, shape).contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy())
            yield name, t


def _plan_shards(specs, itemsize: int, max_shard_bytes: int) -> list[list[tuple]]:
    shards, current, size = [], [], 0
    for name, shape in specs:
        n = math.prod(shape) * itemsize
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    shards.append(current)
    return shards


def write_hf_checkpoint(
    out_dir: Path,
    cfg: dict,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_bytes: int = 5 * 10**9,
    progress: bool = True,
) -> Path:
    """Write a random checkpoint of config `cfg` to `out_dir` (which must not exist)."""
    out_dir = Path(out_dir)
    specs = tensor_specs(cfg)
    itemsize = dtype.itemsize
    shards = _plan_shards(specs, itemsize, max_shard_bytes)
    total = sum(math.prod(s) for _, s in specs) * itemsize
    # Staging: one writer at a time, a free-space check, a full disk as one line, a temp
    # directory that disappears on any failure (and is cleaned up after a kill).
    with Staging(out_dir, total + (1 << 20) + 4096 * len(shards)) as staging:
        tmp = staging.tmp
        gen = torch.Generator()
        layers = cfg["num_hidden_layers"]
        weight_map = {}
        with progress_bar(total, f"synth {out_dir.name}", progress) as bar:
            for i, shard in enumerate(shards):
                fname = (
                    "model.safetensors"
                    if len(shards) == 1
                    else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                )
                for name, t in write_safetensors(
                    tmp / fname,
                    shard,
                    dtype,
                    lambda name, shape: random_tensor(name, shape, gen, dtype, seed, layers),
                ):
                    weight_map[name] = fname
                    bar.advance(t.nbytes)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        cfg = {**cfg, "torch_dtype": str(dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        generation = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tok = build_tokenizer(cfg["vocab_size"])
        write_tokenizer_files(tmp, tok, cfg["max_position_embeddings"])
        staging.publish()
    return out_dir
