"""gpt-oss GGUF in: a tiny transformers GptOssForCausalLM written as llama.cpp lays gpt-oss
out (`gpt-oss` architecture: gate/up/down expert stacks with biases, attention sinks,
post_attention_norm, router bias), in MXFP4 (what gpt-oss files hold), Q4_0, Q4_K, Q8_0
and F16, converted, and run against transformers holding the weights as `gguf` dequantizes
them. MXFP4 experts go into an mxfp4 store bit for bit."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tests.helpers import dequantized_reference

import mer
from mer.errors import ConvertError
from mer.store.convert import convert
from mer.store.convert_gguf import EXACT_ACTION, MXFP4_ACTION, SYMMETRIC_ACTION, convert_gguf
from mer.store.reader import Store
from mer.synth.gguf import tensor_list, to_gguf, write_gguf
from mer.synth.tokenizer import CHAT_TEMPLATE, build_tokenizer

PROMPT = [1, 17, 93, 5, 200, 41, 41, 7, 130, 66, 2, 90]  # 3x the window of 4
# GGUF expert type -> the store it goes to without a requantization (bf16 for 8/16 bits,
# so what is measured is the conversion, not int4's own error).
CASES = {"MXFP4": "mxfp4", "Q4_0": "int4", "Q4_K": "int4", "Q8_0": "bf16", "F16": "bf16"}
# max |logit error| / max |logit| against transformers on `gguf`'s dequantized weights, dense
# weights rounded to bf16 (the store's dense dtype): what remains is the experts' conversion
# (nothing for MXFP4 in an mxfp4 store, int4 scale/zero rounding to bf16 for Q4_0 and Q4_K,
# bf16 rounding of Q8_0/F16 weights). Measured: at most 3e-3.
TOLERANCE = 1e-2


def tiny_model():
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        sliding_window=4,
        rope_parameters=dict(
            rope_type="yarn",
            factor=8.0,
            beta_fast=32.0,
            beta_slow=1.0,
            original_max_position_embeddings=32,
            truncate=False,
            rope_theta=150000.0,
        ),
    )  # fmt: skip  (swiglu_limit: llama.cpp's fixed 7, which GGUF does not record)
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            q = p * 4 if p.dim() > 1 else p + 0.1 * torch.randn_like(p)
            if name.endswith("sinks"):
                q = torch.randn_like(p)
            p.copy_(q.to(torch.bfloat16).float())
    return model


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """GGUF name -> float tensor, as llama.cpp's converter maps a gpt-oss checkpoint: gate and
    up de-interleaved into their own stacks, experts as [E, out, in], biases split alike."""
    sd = model.state_dict()
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(model.config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[b + "post_attention_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        for ours, theirs in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")):
            out[b + f"attn_{ours}.weight"] = sd[p + f"self_attn.{theirs}_proj.weight"]
            out[b + f"attn_{ours}.bias"] = sd[p + f"self_attn.{theirs}_proj.bias"]
        out[b + "attn_sinks.weight"] = sd[p + "self_attn.sinks"]
        out[b + "ffn_gate_inp.weight"] = sd[p + "mlp.router.weight"]
        out[b + "ffn_gate_inp.bias"] = sd[p + "mlp.router.bias"]
        gate_up = sd[p + "mlp.experts.gate_up_proj"].transpose(1, 2)  # [E, 2F, H] interleaved
        bias = sd[p + "mlp.experts.gate_up_proj_bias"]
        out[b + "ffn_gate_exps.weight"] = gate_up[:, 0::2]
        out[b + "ffn_up_exps.weight"] = gate_up[:, 1::2]
        out[b + "ffn_gate_exps.bias"], out[b + "ffn_up_exps.bias"] = bias[:, 0::2], bias[:, 1::2]
        out[b + "ffn_down_exps.weight"] = sd[p + "mlp.experts.down_proj"].transpose(1, 2)
        out[b + "ffn_down_exps.bias"] = sd[p + "mlp.experts.down_proj_bias"]
    return {k: v.float().contiguous() for k, v in out.items()}


class Tensors:
    """`write_gguf`'s source: experts in `qtype`, other matrices in Q8_0 (MXFP4 files) or
    `qtype`, norms, biases, sinks and routers in F32 (as llama.cpp writes them)."""

    def __init__(self, model, qtype: str) -> None:
        self.t, self.qtype = gguf_tensors(model), qtype

    def type_of(self, name, shape, role):
        if role in ("norm", "router"):
            return "F32"
        kind = self.qtype if role == "experts" or self.qtype != "MXFP4" else "Q8_0"
        return "Q8_0" if kind == "Q4_K" and shape[-1] % 256 else kind

    def __call__(self, name, shape, role):
        x = self.t[name].numpy().reshape(shape)
        kind = self.type_of(name, shape, role)
        return x.astype(np.float32) if kind == "F32" else to_gguf(x, kind)


@pytest.fixture(scope="module")
def model_and_config(tmp_path_factory):
    model = tiny_model()
    path = tmp_path_factory.mktemp("gpt-oss-hf")
    model.save_pretrained(path)
    return model, json.loads((path / "config.json").read_text())


def write(model, hf, qtype, path, tensors=None):
    return write_gguf(path, hf, Tensors(model, qtype), build_tokenizer(512), CHAT_TEMPLATE,
                      tensors=tensors)[0]  # fmt: skip


def gguf_reference(model, path):
    """`model` holding every weight as `gguf` dequantizes it from `path`, in float32."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ref = copy.deepcopy(model)
    w = {}
    for t in GGUFReader(path).tensors:
        shape = tuple(reversed([int(d) for d in t.shape]))
        w[t.name] = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).reshape(shape)
    sd = ref.state_dict()
    with torch.no_grad():
        new = {}
        for i in range(model.config.num_hidden_layers):
            p, b = f"model.layers.{i}.", f"blk.{i}."
            gate, up = w[b + "ffn_gate_exps.weight"], w[b + "ffn_up_exps.weight"]
            gu = torch.empty(gate.shape[0], 2 * gate.shape[1], gate.shape[2])
            gu[:, 0::2], gu[:, 1::2] = gate, up
            new[p + "mlp.experts.gate_up_proj"] = gu.transpose(1, 2)
            gb, ub = w[b + "ffn_gate_exps.bias"], w[b + "ffn_up_exps.bias"]
            bias = torch.empty(gb.shape[0], 2 * gb.shape[1])
            bias[:, 0::2], bias[:, 1::2] = gb, ub
            new[p + "mlp.experts.gate_up_proj_bias"] = bias
            new[p + "mlp.experts.down_proj"] = w[b + "ffn_down_exps.weight"].transpose(1, 2)
            new[p + "mlp.experts.down_proj_bias"] = w[b + "ffn_down_exps.bias"]
            for ours, theirs in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")):
                new[p + f"self_attn.{theirs}_proj.weight"] = w[b + f"attn_{ours}.weight"]
                new[p + f"self_attn.{theirs}_proj.bias"] = w[b + f"attn_{ours}.bias"]
            new[p + "self_attn.sinks"] = w[b + "attn_sinks.weight"]
            new[p + "input_layernorm.weight"] = w[b + "attn_norm.weight"]
            new[p + "post_attention_layernorm.weight"] = w[b + "post_attention_norm.weight"]
            new[p + "mlp.router.weight"] = w[b + "ffn_gate_inp.weight"]
            new[p + "mlp.router.bias"] = w[b + "ffn_gate_inp.bias"]
        new["model.embed_tokens.weight"] = w["token_embd.weight"]
        new["model.norm.weight"] = w["output_norm.weight"]
        new["lm_head.weight"] = w["output.weight"]
        for name, x in new.items():
            sd[name].copy_(x.reshape(sd[name].shape))
    return ref


def interleave(gate_up):
    f = gate_up.shape[0] // 2
    out = torch.empty_like(gate_up)
    out[0::2], out[1::2] = gate_up[:f], gate_up[f:]
    return out.t()


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def greedy_of(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("qtype", list(CASES))
def test_gpt_oss_gguf_matches_transformers_on_the_gguf_weights(model_and_config, qtype, tmp_path):
    model, hf = model_and_config
    path = write(model, hf, qtype, tmp_path / "m.gguf")
    report = []
    store = convert_gguf(path, tmp_path / "s", CASES[qtype], progress=False, report=report)
    assert Store(store).config.model_type == "gpt_oss"
    ref = gguf_reference(model, path)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if ".experts." not in n:
                p.copy_(p.to(torch.bfloat16).float())
    m = mer.open(store, ram_budget="64MiB", dtype="float32")
    kv = m.transformer.new_kv_cache(len(PROMPT))
    ours = m.transformer.forward(torch.tensor(PROMPT), kv, all_logits=True)
    err = rel(ours, logits_of(ref, PROMPT))
    print(f"gpt-oss {qtype} -> {CASES[qtype]}: {err:.2e}")
    assert err < TOLERANCE
    tight = dequantized_reference(ref, store, interleave, lambda down: down.t())
    assert rel(ours, logits_of(tight, PROMPT)) < 1e-5
    assert list(m.tokens(PROMPT, max_tokens=8, stop_token_ids=[-1])) == greedy_of(tight, PROMPT, 8)
    actions = {r[0]: r[1] for r in report if r[1].startswith(("mxfp4", "int4", "bf16"))}
    if qtype == "MXFP4":
        assert actions == {"MXFP4": MXFP4_ACTION}
        assert err < 1e-5  # nothing rounded: the blocks are the file's
    elif qtype == "Q4_0":  # Q4_0 experts alone: int4-sym, the file's blocks bit for bit
        assert set(actions.values()) == {SYMMETRIC_ACTION}
        assert err < 1e-5
    elif CASES[qtype] == "int4":
        assert set(actions.values()) == {EXACT_ACTION}


def test_mxfp4_experts_are_the_files_blocks_bit_for_bit(model_and_config, tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, hf = model_and_config
    path = write(model, hf, "MXFP4", tmp_path / "m.gguf")
    store = Store(convert_gguf(path, tmp_path / "s", "mxfp4", progress=False))
    stacks = {t.name: t for t in GGUFReader(path).tensors if "_exps.weight" in t.name}
    raw = store.expert_path.read_bytes()
    for (layer, e), x in store.extents.items():
        w = store.expert_format.view(
            torch.frombuffer(bytearray(raw[x.offset : x.offset + x.length]), dtype=torch.uint8)
        )
        gate, up, down = (
            torch.from_numpy(dequantize(stacks[f"blk.{layer}.ffn_{k}_exps.weight"].data[e],
                                        stacks[f"blk.{layer}.ffn_{k}_exps.weight"].tensor_type))
            for k in ("gate", "up", "down")
        )  # fmt: skip
        assert torch.equal(w.gate_up.dequantize(), torch.cat([gate, up]))
        assert torch.equal(w.down.dequantize(), down)


def test_mxfp4_gguf_into_int4_requantizes(model_and_config, tmp_path):
    model, hf = model_and_config
    path = write(model, hf, "MXFP4", tmp_path / "m.gguf")
    report = []
    store = convert(path, tmp_path / "s", progress=False)
    convert_gguf(path, tmp_path / "s2", "int4", progress=False, report=report)
    assert Store(store).expert_format.scheme == "int4"
    assert [r[1] for r in report if r[0] == "MXFP4"] == ["int4 g32, requantized"]
    ref = dequantized_reference(gguf_reference(model, path), store, interleave, lambda d: d.t())
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if ".experts." not in n:
                p.copy_(p.to(torch.bfloat16).float())
    m = mer.open(store, ram_budget="64MiB", dtype="float32")
    kv = m.transformer.new_kv_cache(len(PROMPT))
    ours = m.transformer.forward(torch.tensor(PROMPT), kv, all_logits=True)
    assert rel(ours, logits_of(ref, PROMPT)) < 1e-5


def test_a_gpt_oss_file_without_expert_biases_is_refused(model_and_config, tmp_path):
    model, hf = model_and_config
    listing = [t for t in tensor_list(hf) if not t[0].endswith("_exps.bias")]
    path = write(model, hf, "Q8_0", tmp_path / "m.gguf", tensors=listing)
    with pytest.raises(ConvertError, match="missing tensors blk.0.ffn_gate_exps.bias"):
        convert(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
