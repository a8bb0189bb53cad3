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
from mer.models.registry import families, family
from mer.progress import progress_bar
from mer.store.staging import Staging
from mer.synth.tokenizer import build_tokenizer, write_tokenizer_files

# Every family's presets (`Family.presets`): the published full-size shapes of its best-known
# checkpoints and tiny ones with every quirk switched on, for tests.
PRESETS: dict[str, dict] = {name: hf for f in families() for name, hf in f.presets.items()}
_FIELDS = (
    "num_hidden_layers", "num_local_experts", "num_experts_per_tok", "hidden_size",
    "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
    "max_position_embeddings",
)  # fmt: skip
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


def presets() -> dict[str, dict]:
    """Every preset: the ones above and those the registered families bring (`Family.presets`)."""
    return PRESETS | {name: p for f in families() for name, p in f.presets.items()}


def hf_config(preset: str = "tiny", **overrides) -> dict:
    """A complete config.json dict for a preset, with overrides by Hugging Face field name."""
    known = presets()
    if preset not in known:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(known)})")
    cfg = {
        **known[preset],
        "hidden_act": "silu",
        "tie_word_embeddings": known[preset].get("tie_word_embeddings", False),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "output_router_logits": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }
    # Families name the expert count and width differently; overrides use one spelling.
    aliases = [("num_local_experts", "num_experts"), ("num_local_experts", "n_routed_experts"),
               ("intermediate_size", "moe_intermediate_size")]  # fmt: skip
    for ours, theirs in aliases:
        if ours in overrides and theirs in cfg:
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
    by_layer: dict[int, list] = {i: [] for i in range(config.num_hidden_layers)}
    head, tail = [], []
    for hf, ours in names.items():
        if ours.startswith("layers."):
            by_layer[int(ours.split(".")[1])].append((hf, shapes[ours]))
        else:
            (head if ours == "embed" else tail).append((hf, shapes[ours]))
    for layer in config.moe_layers:
        by_layer[layer] += [(hf, s) for hf, (s, _) in fam.expert_tensors(config, layer).items()]
    return head + [spec for i in sorted(by_layer) for spec in by_layer[i]] + tail


def _std(name: str, shape: tuple[int, ...], layers: int) -> float:
    # gpt-oss stacks its experts as x @ W: [E, in, out]
    fan_in = (
        shape[-2] if name.endswith(("experts.gate_up_proj", "experts.down_proj")) else shape[-1]
    )
    if name.endswith(("o_proj.weight", "w2.weight", "down_proj.weight", "experts.down_proj")):
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
    if name.endswith((".bias", "_proj_bias")):
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
