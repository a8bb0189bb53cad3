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
from mer.synth.gguf import GGUF_ARCH, permute_qk, to_gguf, write_gguf
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


# YaRN as DeepSeek configures it (mscale equal to mscale_all_dim, as llama.cpp assumes).
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707,
        "mscale_all_dim": 0.707, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1}  # fmt: skip
DEEPSEEK = dict(
    num_hidden_layers=3, n_routed_experts=8, moe_intermediate_size=256, intermediate_size=512,
    first_k_dense_replace=1, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, n_group=4, topk_group=2,
)  # fmt: skip


def deepseek_v2():
    """Plain q_proj, group-limited softmax routing scaled by 1.5, two shared experts, a dense
    first layer, YaRN; written with llama.cpp's older single attn_kv_b."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4, "num_experts_per_tok": 3},
                           **DEEPSEEK, n_shared_experts=2, q_lora_rank=None,
                           topk_method="group_limited_greedy", routed_scaling_factor=1.5,
                           rope_parameters=YARN)  # fmt: skip
    return DeepseekV2ForCausalLM(cfg)


def deepseek_v3():
    """Sigmoid routing with the correction bias (exp_probs_b), low-rank query; written with
    the newer split attn_k_b/attn_v_b."""
    from tests.test_families import with_correction_bias
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4, "num_experts_per_tok": 3},
                           **DEEPSEEK, n_shared_experts=1, q_lora_rank=64, norm_topk_prob=True,
                           routed_scaling_factor=2.5,
                           rope_parameters={**YARN, "mscale": 1.0,
                                            "mscale_all_dim": 1.0})  # fmt: skip
    return with_correction_bias(DeepseekV3ForCausalLM(cfg))


def glm4_moe():
    """GLM-4.5: V3's routing with the correction bias, q/k/v biases, per-head QK norm, half
    of each head rotating, a dense first layer, one shared expert."""
    from tests.test_families import with_correction_bias
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    cfg = Glm4MoeConfig(**{**COMMON, "num_experts_per_tok": 3}, num_hidden_layers=3,
                        n_routed_experts=8, moe_intermediate_size=256, intermediate_size=512,
                        head_dim=64, n_shared_experts=1, first_k_dense_replace=1, n_group=4,
                        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                        use_qk_norm=True, attention_bias=True,
                        partial_rotary_factor=0.5)  # fmt: skip
    return with_correction_bias(Glm4MoeForCausalLM(cfg))


FAMILIES = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "olmoe": olmoe,
            "deepseek_v2": deepseek_v2, "deepseek_v3": deepseek_v3,
            "glm4_moe": glm4_moe}  # fmt: skip
SPLIT_KV_B = {"deepseek_v3"}  # families written with attn_k_b/attn_v_b instead of attn_kv_b


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
        self.arch = gguf_arch.ARCHS[GGUF_ARCH[self.cfg.model_type]]
        to_gguf_name = gguf_arch.gguf_names(list(hf_of), self.cfg.num_hidden_layers, self.arch)
        self.hf_of = {g: hf_of[ours] for ours, g in to_gguf_name.items()}

    def type_of(self, name: str, shape: tuple[int, ...], role: str) -> str:
        if role in ("norm", "router"):
            return "F32"
        if self.qtype == "Q4_K" and shape[-1] % 256:
            return "Q8_0" if shape[-1] % 32 == 0 else "F16"
        if self.qtype != "F16" and shape[-1] % 32:  # rows not whole blocks: llama.cpp's F16
            return "F16"
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
        if name.endswith(("attn_k_b.weight", "attn_v_b.weight")):  # from kv_b, per head
            c = self.cfg
            kv_b = self.src.get(self.hf_of[name.replace(name.split(".")[2], "attn_kv_b")])
            kv_b = kv_b.float().view(c.num_attention_heads, -1, c.kv_lora_rank)
            k_b, v_b = kv_b.split([c.qk_nope_head_dim, c.v_head_dim], 1)
            return (k_b.transpose(1, 2) if "attn_k_b" in name else v_b).contiguous().numpy()
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


def listing(source: CheckpointTensors) -> list[tuple[str, tuple[int, ...], str]] | None:
    """The tensor list of DeepSeek (kv_b split as SPLIT_KV_B says) and GLM-4.5; None for the
    others (`write_gguf`'s default)."""
    from mer.synth.gguf import tensor_list

    if not source.cfg.model_type.startswith(("deepseek", "glm4")):
        return None
    return tensor_list(source.hf, split_kv_b=source.cfg.model_type in SPLIT_KV_B)


def write_tiny_gguf(
    ckpt: Path, out: Path, qtype: str, split_max_tensors: int = 0, tensors=None
) -> list[Path]:
    """`ckpt` as GGUF in `qtype`; `tensors` overrides the tensor list (name, shape, role)."""
    source = CheckpointTensors(ckpt, qtype)
    tensors = tensors if tensors is not None else listing(source)
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
    weights, heads_kv = {}, {}
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
            if t.name.endswith(("attn_k_b.weight", "attn_v_b.weight")):  # back into kv_b
                heads_kv.setdefault(int(parts[1]), {})[parts[2]] = w
                continue
            if cfg.model_type == "mixtral" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
                n = cfg.num_attention_heads if "attn_q" in t.name else cfg.num_key_value_heads
                w = w.reshape(n, -1, 2, shape[-1]).transpose(1, 2).reshape(shape)
            hf_name = source.hf_of[t.name]
            weights[hf_name] = w.reshape(source.src.info(hf_name)[0]).contiguous()
    for layer, kb in heads_kv.items():
        kv_b = torch.cat([kb["attn_k_b"].transpose(1, 2), kb["attn_v_b"]], 1)
        hf_name = source.hf_of[f"blk.{layer}.attn_kv_b.weight"]
        weights[hf_name] = kv_b.reshape(source.src.info(hf_name)[0]).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    source.src.close()
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
