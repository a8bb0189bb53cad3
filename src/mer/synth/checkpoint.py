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
import os
import shutil
import zlib
from pathlib import Path

import torch

from mer.errors import ConfigError, MerError
from mer.progress import progress_bar
from mer.synth.tokenizer import build_tokenizer, write_tokenizer_files

# name: (layers, experts, top_k, hidden, ffn, heads, kv_heads, vocab, max_positions)
_SHAPES = {
    "tiny": (2, 4, 2, 64, 128, 4, 2, 512, 512),
    "small": (4, 8, 2, 256, 512, 8, 2, 4096, 4096),
    "demo": (8, 8, 2, 1024, 2816, 16, 4, 8192, 4096),
    "medium": (16, 8, 2, 2048, 5632, 16, 4, 32000, 32768),
    "mixtral-8x7b": (32, 8, 2, 4096, 14336, 32, 8, 32000, 32768),
}
PRESETS: dict[str, dict] = {
    name: dict(
        zip(
            (
                "num_hidden_layers",
                "num_local_experts",
                "num_experts_per_tok",
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
                "max_position_embeddings",
            ),
            shape,
            strict=True,
        )
    )
    for name, shape in _SHAPES.items()
}
# CLI flag -> Hugging Face config field.
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
    """A complete MixtralForCausalLM config.json dict for a preset, with HF-named overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    cfg = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **PRESETS[preset],
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": None,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "router_aux_loss_coef": 0.02,
        "output_router_logits": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ConfigError(f"unknown config fields {sorted(unknown)}")
    cfg.update(overrides)
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in Hugging Face Mixtral naming, in file order."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    specs = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "block_sparse_moe.gate.weight", (cfg["num_local_experts"], h)),
        ]
        for e in range(cfg["num_local_experts"]):
            x = f"{p}block_sparse_moe.experts.{e}."
            specs += [
                (x + "w1.weight", (f, h)),
                (x + "w2.weight", (h, f)),
                (x + "w3.weight", (f, h)),
            ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def _std(name: str, shape: tuple[int, ...], layers: int) -> float:
    fan_in = shape[-1]
    if name.endswith(("o_proj.weight", "w2.weight")):
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
    if out_dir.exists():
        raise MerError(f"{out_dir}: already exists")
    specs = tensor_specs(cfg)
    itemsize = dtype.itemsize
    shards = _plan_shards(specs, itemsize, max_shard_bytes)
    total = sum(math.prod(s) for _, s in specs) * itemsize
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
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
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
