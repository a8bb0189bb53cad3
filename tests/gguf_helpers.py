"""Tiny GGUF files from tiny transformers checkpoints, and the transformers model that runs
exactly what a GGUF holds (each tensor dequantized by the `gguf` package itself)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from mer.config import ModelConfig
from mer.models import naming
from mer.models.registry import family
from mer.store import gguf_arch
from mer.store.safetensors_source import SafetensorsSource
from mer.synth.gguf import permute_qk, to_gguf, write_gguf
from mer.synth.tokenizer import CHAT_TEMPLATE, build_tokenizer

COMMON = dict(
    vocab_size=512, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, rope_theta=10000.0, num_experts_per_tok=2,
)  # fmt: skip


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**COMMON, num_hidden_layers=2, num_local_experts=4,
                                            intermediate_size=256))  # fmt: skip


def qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(**COMMON, num_hidden_layers=3, num_experts=4, moe_intermediate_size=256,
                         shared_expert_intermediate_size=256, intermediate_size=512,
                         mlp_only_layers=[1], norm_topk_prob=False,
                         tie_word_embeddings=True)  # fmt: skip
    return Qwen2MoeForCausalLM(cfg)


def qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**COMMON, num_hidden_layers=4, num_experts=8, moe_intermediate_size=256,
                         intermediate_size=512, head_dim=64, decoder_sparse_step=2,
                         norm_topk_prob=True)  # fmt: skip
    return Qwen3MoeForCausalLM(cfg)


def olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(**COMMON, num_hidden_layers=2, num_experts=8, intermediate_size=256,
                      clip_qkv=3.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    return OlmoeForCausalLM(cfg)


FAMILIES = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "olmoe": olmoe}


def save_tiny(name: str, path: Path, seed: int = 0):
    """A random tiny model of family `name` with a trained-like spread, saved by transformers."""
    torch.manual_seed(seed)
    model = FAMILIES[name]().eval()
    with torch.no_grad():
        for p in model.parameters():
            q = p * 4 if p.dim() > 1 else p + 0.1 * torch.randn_like(p)
            p.copy_(q.to(torch.bfloat16).float())
    model.save_pretrained(path)
    return model


class CheckpointTensors:
    """`write_gguf`'s source over a saved checkpoint: what llama.cpp's converter would write,
    matrices in `qtype` (Q4_K falls back to Q8_0 for rows not a multiple of 256)."""

    def __init__(self, ckpt: Path, qtype: str) -> None:
        self.hf = json.loads((ckpt / "config.json").read_text())
        self.cfg = ModelConfig.from_hf(self.hf)
        self.fam = family(self.cfg.model_type)
        self.src = SafetensorsSource(ckpt)
        self.qtype = qtype
        hf_of = {ours: hf for hf, ours in naming.dense_names(self.fam, self.cfg).items()}
        to_gguf_name = gguf_arch.gguf_names(list(hf_of), self.cfg.num_hidden_layers)
        self.hf_of = {g: hf_of[ours] for ours, g in to_gguf_name.items()}

    def type_of(self, name: str, shape: tuple[int, ...], role: str) -> str:
        if role in ("norm", "router"):
            return "F32"
        if self.qtype == "Q4_K" and shape[-1] % 256:
            return "Q8_0"
        return self.qtype

    def floats(self, name: str, shape: tuple[int, ...], role: str) -> np.ndarray:
        per_expert = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight", name)
        if per_expert:  # the layout of Mixtral files from before stacked experts
            layer, kind, e = int(per_expert[1]), per_expert[2], int(per_expert[3])
            w = {"gate": "w1", "up": "w3", "down": "w2"}[kind]
            return self.src.get(naming.expert_names(self.fam, layer, e)[w]).float().numpy()
        if role == "experts":
            layer = int(name.split(".")[1])
            kind = name.split(".")[2]
            if kind == "ffn_gate_up_exps":  # fused: gate rows, then up rows
                gate, up = (
                    self.floats(name.replace("gate_up", k), shape, role) for k in ("gate", "up")
                )
                return np.concatenate([gate, up], axis=1)
            w = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}[kind]
            return np.stack([
                self.src.get(naming.expert_names(self.fam, layer, e)[w]).float().numpy()
                for e in range(self.cfg.num_local_experts)
            ])  # fmt: skip
        x = self.src.get(self.hf_of[name]).float().numpy().reshape(shape)
        if self.cfg.model_type == "mixtral" and name.endswith(("attn_q.weight", "attn_k.weight")):
            q = name.endswith("attn_q.weight")
            x = permute_qk(x, self.cfg.num_attention_heads if q else self.cfg.num_key_value_heads)
        return x

    def __call__(self, name: str, shape: tuple[int, ...], role: str) -> np.ndarray:
        x = self.floats(name, shape, role)
        kind = self.type_of(name, shape, role)
        return x.astype(np.float32) if kind == "F32" else to_gguf(x, kind)


def per_expert_list(hf: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """`tensor_list` with each stacked expert tensor as one tensor per expert (old Mixtral)."""
    from mer.synth.gguf import tensor_list

    out = []
    for name, shape, role in tensor_list(hf):
        if role != "experts":
            out.append((name, shape, role))
            continue
        layer, kind = name.split(".")[1], name.split(".")[2].removesuffix("_exps")
        out += [(f"blk.{layer}.{kind}.{e}.weight", shape[1:], "matrix") for e in range(shape[0])]
    return out


def write_tiny_gguf(
    ckpt: Path, out: Path, qtype: str, split_max_tensors: int = 0, tensors=None
) -> list[Path]:
    """`ckpt` as GGUF in `qtype`; `tensors` overrides the tensor list (name, shape, role)."""
    source = CheckpointTensors(ckpt, qtype)
    tok = build_tokenizer(source.cfg.vocab_size)
    return write_gguf(
        out, source.hf, source, tok, CHAT_TEMPLATE, split_max_tensors, tensors=tensors
    )


def gguf_reference(files: list[Path], ckpt: Path, out: Path):
    """The transformers model of `ckpt` holding every weight as the `gguf` package dequantizes
    it from `files` (q/k of llama-arch un-permuted), in float32."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    source = CheckpointTensors(ckpt, "F32")
    cfg, fam = source.cfg, source.fam
    weights = {}
    for f in files:
        for t in GGUFReader(f).tensors:
            shape = tuple(reversed([int(d) for d in t.shape]))
            w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).reshape(shape)
            parts = t.name.split(".")
            if "_exps" in t.name:
                layer, kind = int(parts[1]), parts[2]
                which = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}[kind]
                for e in range(cfg.num_local_experts):
                    weights[naming.expert_names(fam, layer, e)[which]] = w[e].clone()
                continue
            if cfg.model_type == "mixtral" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
                n = cfg.num_attention_heads if "attn_q" in t.name else cfg.num_key_value_heads
                w = w.reshape(n, -1, 2, shape[-1]).transpose(1, 2).reshape(shape)
            hf_name = source.hf_of[t.name]
            weights[hf_name] = w.reshape(source.src.info(hf_name)[0]).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    source.src.close()
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
