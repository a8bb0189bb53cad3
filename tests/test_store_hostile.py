"""Hostile input to convert and to the store reader: each a one-line error, nothing lost.

`--force` may replace only a mer store, never the source or a user's files; malformed
config.json, safetensors headers, indexes and hand-edited manifests are named field by
field; two writers of one destination exclude each other through a lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from mer.config import ModelConfig
from mer.errors import ConfigError, ConvertError, MerError, StoreError
from mer.quant.expert import ExpertFormat
from mer.store.convert import convert
from mer.store.reader import Store
from mer.store.writer import StoreWriter


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def tree_digest(path) -> dict[str, str]:
    """Every file under `path` (relative name -> sha256), to show nothing was touched."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture
def ck(hf_tiny, tmp_path):
    """A private copy of the tiny checkpoint at tmp_path/par/ck."""
    dst = tmp_path / "par" / "ck"
    shutil.copytree(hf_tiny[0], dst)
    return dst


# --force replaces a store and nothing else.


def test_force_never_writes_over_the_source(ck):
    before = tree_digest(ck)
    with pytest.raises(ConvertError) as e:
        convert(ck, ck, force=True, progress=False)
    assert "source" in one_line(e) and str(ck) in str(e.value)
    assert tree_digest(ck) == before


def test_force_never_replaces_a_directory_containing_the_source(ck):
    par = ck.parent
    before = tree_digest(par)
    with pytest.raises(ConvertError) as e:
        convert(ck, par, force=True, progress=False)
    assert "source" in one_line(e)
    assert tree_digest(par) == before


def test_force_refuses_what_is_not_a_store(hf_tiny, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(StoreError) as e:
        convert(hf_tiny[0], mine, force=True, progress=False)
    assert "not a mer store" in one_line(e) and str(mine) in str(e.value)
    assert (mine / "thesis.tex").read_text() == "years of work"

    plain = tmp_path / "notes.txt"
    plain.write_text("keep")
    with pytest.raises(StoreError) as e:
        convert(hf_tiny[0], plain, force=True, progress=False)
    assert "not a mer store" in one_line(e)
    assert plain.read_text() == "keep"


def test_force_refuses_a_store_holding_other_files(store_factory, hf_tiny, tmp_path):
    dst = tmp_path / "s"
    shutil.copytree(store_factory("int4"), dst)
    (dst / "my-notes.md").write_text("mine")
    with pytest.raises(StoreError) as e:
        convert(hf_tiny[0], dst, force=True, progress=False)
    assert "my-notes.md" in one_line(e)
    assert (dst / "my-notes.md").read_text() == "mine"


def test_force_replaces_a_store_and_leaves_nothing_else(store_factory, hf_tiny, tmp_path):
    dst = tmp_path / "s"
    shutil.copytree(store_factory("int4"), dst)
    convert(hf_tiny[0], dst, quant="int8", force=True, progress=False)
    assert Store(dst).expert_format.scheme == "int8"
    assert sorted(os.listdir(tmp_path)) == ["s"]


# config.json, safetensors headers, indexes.


def test_config_json_that_is_a_list(ck, tmp_path):
    (ck / "config.json").write_text("[1, 2]")
    with pytest.raises(MerError) as e:
        convert(ck, tmp_path / "out", progress=False)
    assert "config.json" in one_line(e) and "JSON object" in str(e.value)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_file(ck / "config.json")
    assert "JSON object" in one_line(e)


def test_config_json_that_is_not_utf8(ck, tmp_path):
    (ck / "config.json").write_bytes(b'{"model_type": "mixtral\xff\xfe"}')
    with pytest.raises(MerError) as e:
        convert(ck, tmp_path / "out", progress=False)
    assert "config.json" in one_line(e) and "UTF-8" in str(e.value)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_file(ck / "config.json")
    assert "UTF-8" in one_line(e)


@pytest.mark.parametrize(
    "edit",
    [
        {"architectures": "MixtralForCausalLM", "model_type": None},
        {"rope_scaling": [1, 2]},
        {"mlp_only_layers": 3},
        {"num_hidden_layers": "2"},
        {"rms_norm_eps": "small"},
    ],
)
def test_config_json_with_fields_of_the_wrong_type(ck, tmp_path, edit):
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(edit)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        convert(ck, tmp_path / "out", progress=False)
    assert "config.json" in one_line(e)


def write_safetensors_header(path, header) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 64)


@pytest.mark.parametrize(
    "header",
    [
        [1, 2, 3],
        {"w": [1]},
        {"w": {"dtype": "BF16", "shape": [2], "data_offsets": [8, 4]}},
        {"w": {"dtype": "BF16", "shape": [-2], "data_offsets": [0, 4]}},
        {"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0]}},
    ],
    ids=["list", "entry-list", "offsets-backwards", "negative-shape", "one-offset"],
)
def test_safetensors_header_malformed(ck, tmp_path, header):
    write_safetensors_header(ck / "model.safetensors", header)
    with pytest.raises(ConvertError) as e:
        convert(ck, tmp_path / "out", progress=False)
    assert "model.safetensors" in one_line(e)


@pytest.mark.parametrize(
    "weight_map",
    [
        {"model.embed_tokens.weight": 3},
        {"model.embed_tokens.weight": ["model.safetensors"]},
        {"model.embed_tokens.weight": None},
        {"model.embed_tokens.weight": "../../etc/passwd"},
        ["model.safetensors"],
    ],
    ids=["int", "list", "null", "outside", "not-a-dict"],
)
def test_index_with_bad_values(ck, tmp_path, weight_map):
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConvertError) as e:
        convert(ck, tmp_path / "out", progress=False)
    assert "model.safetensors.index.json" in one_line(e)


# Hand-edited manifests.


def edit_manifest(store, change) -> None:
    path = store / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def first_tensor(m) -> dict:
    return next(iter(m["dense"]["tensors"].values()))


MANIFEST_EDITS = {
    "format_version": lambda m: m.pop("format_version"),
    "model_config": lambda m: m.pop("model_config"),
    "dense": lambda m: m.pop("dense"),
    "dense.file": lambda m: m["dense"].pop("file"),
    "dense.nbytes": lambda m: m["dense"].pop("nbytes"),
    "dense.tensors": lambda m: m["dense"].update(tensors=[1]),
    "experts": lambda m: m.pop("experts"),
    "experts.file": lambda m: m["experts"].update(file="../../etc/passwd"),
    "experts.nbytes": lambda m: m["experts"].update(nbytes="big"),
    "experts.format": lambda m: m["experts"]["format"].pop("hidden"),
    "experts.table": lambda m: m["experts"].pop("table"),
    "experts.table[0]": lambda m: m["experts"]["table"][0].pop(),
    "experts.table[1]": lambda m: m["experts"]["table"][1].__setitem__(2, "zero"),
    "experts.table[2]": lambda m: m["experts"]["table"][2].__setitem__(3, 5),
    "dtype": lambda m: first_tensor(m).update(dtype="float99"),
    "shape": lambda m: first_tensor(m).update(shape=[3, 3]),
    "offset": lambda m: first_tensor(m).update(offset=-64),
    "checksum": lambda m: first_tensor(m).pop("checksum"),
}


@pytest.mark.parametrize("field", list(MANIFEST_EDITS))
def test_hand_edited_manifest_names_the_field(store_copy, field):
    store = store_copy()
    edit_manifest(store, MANIFEST_EDITS[field])
    with pytest.raises(StoreError) as e:
        Store(store)
    detail = one_line(e).split("manifest.json: ", 1)[1]  # the path may hold any word
    assert field in detail


@pytest.mark.parametrize("version", [0, -1, True, "1", 1.0, None])
def test_format_version_must_be_a_supported_integer(store_copy, version):
    store = store_copy()
    edit_manifest(store, lambda m: m.update(format_version=version))
    with pytest.raises(StoreError) as e:
        Store(store)
    assert "format_version" in one_line(e).split("manifest.json: ", 1)[1]


def test_manifest_that_is_not_an_object(store_copy):
    store = store_copy()
    (store / "manifest.json").write_text("[]")
    with pytest.raises(StoreError) as e:
        Store(store)
    assert "manifest.json" in one_line(e)


# Two writers of one destination.


def tiny_writer(dst) -> StoreWriter:
    from mer.synth.checkpoint import hf_config

    hf = hf_config("tiny")
    cfg = ModelConfig.from_hf(hf)
    ef = ExpertFormat.for_machine("int4", cfg.hidden_size, cfg.intermediate_size, 32)
    return StoreWriter(dst, cfg, hf, ef)


def test_second_writer_of_a_destination_is_refused(hf_tiny, tmp_path):
    dst = tmp_path / "out"
    with tiny_writer(dst) as first:
        with pytest.raises(StoreError) as e:
            convert(hf_tiny[0], dst, progress=False)
        msg = one_line(e)
        assert "another" in msg and f"pid {os.getpid()}" in msg and str(dst) in msg
        first.abort()
    # The refused convert touched nothing; the aborted writer left nothing.
    assert os.listdir(tmp_path) == []
    convert(hf_tiny[0], dst, progress=False)
    assert Store(dst).config.num_hidden_layers == 2


def test_concurrent_convert_cli_says_so_in_one_line(hf_tiny, tmp_path):
    dst = tmp_path / "out"
    with tiny_writer(dst) as first:
        r = subprocess.run(
            [sys.executable, "-m", "mer.cli", "convert", str(hf_tiny[0]), str(dst)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        first.abort()
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "another" in lines[0]
    assert os.listdir(tmp_path) == []
