"""Bad stores and bad checkpoints: each a clear one-line error naming the file or expert."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mer.api
from mer.errors import BudgetError, ConfigError, ConvertError, StoreError
from mer.store.convert import convert
from mer.store.reader import Store

PROMPT = [1, 5, 9, 33, 77, 100]


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def run(store, **kw):
    model = mer.api.open(store, ram_budget=kw.pop("budget", "64MiB"))
    return list(model.tokens(PROMPT, max_tokens=4, **kw))


def test_flipped_byte_in_expert_is_caught(store_copy):
    store = store_copy()
    x = Store(store).extent(1, 2)
    with open(store / "experts.bin", "r+b") as f:
        f.seek(x.offset + 100)
        b = f.read(1)
        f.seek(x.offset + 100)
        f.write(bytes([b[0] ^ 0x10]))
    model = mer.api.open(store, ram_budget="64MiB")
    with pytest.raises(StoreError) as e:
        for layer in range(2):
            for expert in range(4):
                with model.cache.use(layer, expert):
                    pass
    msg = one_line(e)
    assert "experts.bin" in msg and "layer 1, expert 2" in msg and "checksum" in msg
    # The cache stays consistent: the bad expert holds no slot, the others still load.
    assert not model.cache.is_resident(1, 2)
    with model.cache.use(0, 1):
        pass


def test_truncated_expert_file(store_copy):
    store = store_copy()
    path = store / "experts.bin"
    os.truncate(path, path.stat().st_size - 5000)
    with pytest.raises(StoreError) as e:
        Store(store)
    msg = one_line(e)
    assert "experts.bin" in msg and "truncated" in msg and "layer 1, expert 3" in msg


def test_missing_manifest(store_copy):
    store = store_copy()
    (store / "manifest.json").unlink()
    with pytest.raises(StoreError) as e:
        Store(store)
    assert "manifest.json" in one_line(e) and "missing" in str(e.value)


def test_missing_store_dir(tmp_path):
    with pytest.raises(StoreError) as e:
        Store(tmp_path / "nope")
    assert "nope" in one_line(e)


def test_a_store_without_expert_biases_stays_format_1(store_factory):
    from mer.store.reader import Store

    assert Store(store_factory("int4")).manifest["format_version"] == 1


def test_newer_format_version(store_copy):
    store = store_copy()
    m = json.loads((store / "manifest.json").read_text())
    m["format_version"] = 99
    (store / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError) as e:
        Store(store)
    assert "version 99" in one_line(e) and "upgrade mer" in str(e.value)


def test_corrupt_dense_weights(store_copy):
    store = store_copy()
    with open(store / "dense.bin", "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xff")
    with pytest.raises(StoreError) as e:
        mer.api.open(store, ram_budget="64MiB")
    assert "dense.bin" in one_line(e) and "checksum" in str(e.value)


def test_budget_too_small_for_one_layer(store_factory):
    store = store_factory("int4")
    one = Store(store).expert_format.nbytes
    with pytest.raises(BudgetError) as e:
        mer.api.open(store, ram_budget=one)  # top-2 needs two
    assert "top-2" in one_line(e)


def test_bad_budget_text(store_factory):
    with pytest.raises(ConfigError) as e:
        mer.api.open(store_factory("int4"), ram_budget="lots")
    assert "ram-budget" in one_line(e)


def test_sharded_convert_equals_unsharded(hf_tiny, tmp_path):
    src = tmp_path / "sharded"
    shutil.copytree(hf_tiny[0], src)
    tensors = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, chunk in enumerate((names[: len(names) // 3], names[len(names) // 3 :])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in chunk}, src / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    index = {"metadata": {}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    a = convert(hf_tiny[0], tmp_path / "a", quant="int4", group_size=32, progress=False)
    b = convert(src, tmp_path / "b", quant="int4", group_size=32, progress=False)
    assert (a / "experts.bin").read_bytes() == (b / "experts.bin").read_bytes()
    assert (a / "dense.bin").read_bytes() == (b / "dense.bin").read_bytes()


def test_convert_from_fp16_and_bf16_sources(hf_tiny, tmp_path):
    outs = []
    for dtype in (torch.float16, torch.bfloat16):
        src = tmp_path / str(dtype)
        shutil.copytree(hf_tiny[0], src)
        t = load_file(src / "model.safetensors")
        save_file({k: v.to(dtype) for k, v in t.items()}, src / "model.safetensors")
        outs.append(convert(src, tmp_path / f"s-{dtype}", quant="bf16", progress=False))
    # The tiny weights are exact in bf16 and (at this scale) in fp16, so both stores agree.
    assert run(outs[0]) == run(outs[1])


def test_convert_errors(hf_tiny, tmp_path):
    with pytest.raises(ConvertError) as e:
        convert(tmp_path / "missing", tmp_path / "out", progress=False)
    assert "missing" in one_line(e)

    bad = tmp_path / "bad-arch"
    shutil.copytree(hf_tiny[0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        convert(bad, tmp_path / "out", progress=False)
    assert "gpt2" in one_line(e) and "config.json" in str(e.value)

    shape = tmp_path / "bad-shape"
    shutil.copytree(hf_tiny[0], shape)
    t = load_file(shape / "model.safetensors")
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    t[name] = t[name][:, :32].contiguous()
    save_file(t, shape / "model.safetensors")
    with pytest.raises(ConvertError) as e:
        convert(shape, tmp_path / "out", group_size=32, progress=False)
    assert name in one_line(e) and "shape" in str(e.value)

    gone = tmp_path / "missing-tensor"
    shutil.copytree(hf_tiny[0], gone)
    t = load_file(gone / "model.safetensors")
    del t["model.layers.0.self_attn.k_proj.weight"]
    save_file(t, gone / "model.safetensors")
    with pytest.raises(ConvertError) as e:
        convert(gone, tmp_path / "out", progress=False)
    assert "model.layers.0.self_attn.k_proj.weight" in one_line(e)
    assert not (tmp_path / "out").exists()


def test_convert_refuses_existing_destination(hf_tiny, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(StoreError) as e:
        convert(hf_tiny[0], tmp_path / "out", progress=False)
    assert "already exists" in one_line(e)


def test_failed_convert_leaves_nothing(hf_tiny, tmp_path, monkeypatch):
    from mer.quant.expert import ExpertFormat

    calls = {"n": 0}
    real = ExpertFormat.encode

    def failing(self, *a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("No space left on device")
        return real(self, *a)

    monkeypatch.setattr(ExpertFormat, "encode", failing)
    with pytest.raises(OSError):
        convert(hf_tiny[0], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_truncated_checkpoint_shard(hf_tiny, tmp_path):
    src = tmp_path / "cut"
    shutil.copytree(hf_tiny[0], src)
    path = src / "model.safetensors"
    os.truncate(path, path.stat().st_size - 1000)
    with pytest.raises(ConvertError) as e:
        convert(src, tmp_path / "out", progress=False)
    assert "model.safetensors" in one_line(e) and "truncated" in str(e.value)
    (src / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(ConvertError) as e:
        convert(src, tmp_path / "out", progress=False)
    assert "not a safetensors file" in one_line(e)


def test_hub_repository_offline_says_how_to_proceed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(ConvertError) as e:
        convert("mistralai/Mixtral-8x7B-v0.1", tmp_path / "out", progress=False)
    msg = one_line(e)
    assert "mistralai/Mixtral-8x7B-v0.1: not available" in msg and "pass that directory" in msg
    assert not (tmp_path / "out").exists()
