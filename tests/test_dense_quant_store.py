"""Dense weights quantized at convert time (`mer convert --dense-quant`): the store holds
them at 8 or 4 bits (format version 3), loads them as stored with no bf16 copy and no
quantizing, runs as the same weights quantized at load do, and says so in `mer info`;
asking it for another width is a one-line error (requantizing is from bf16 only)."""

from __future__ import annotations

import json

import pytest
import torch
from tests.test_parity import PROMPT, greedy

import mer.api
from mer.cli import main
from mer.errors import ConfigError, StoreError
from mer.quant import dense
from mer.store.convert import convert
from mer.store.reader import Store


@pytest.fixture(scope="module")
def dense_store(hf_tiny, tmp_path_factory):
    """dense quant -> the tiny checkpoint converted with bf16 experts and those dense weights."""
    made = {}

    def make(q: str):
        if q not in made:
            dst = tmp_path_factory.mktemp("dense-stores") / f"tiny-{q}"
            made[q] = convert(hf_tiny[0], dst, "bf16", 32, progress=False, dense_quant=q)
        return made[q]

    return make


@pytest.mark.parametrize("q", ["int8", "int4"])
def test_round_trip_holds_what_quantizing_at_load_makes(dense_store, store_factory, q):
    stored = Store(dense_store(q))
    assert stored.manifest["format_version"] == 3 and stored.dense_quant == q
    from_bf16 = Store(store_factory("bf16")).load_dense()
    weights = stored.load_dense()
    assert set(weights) == set(from_bf16)
    quantized = 0
    for name, t in from_bf16.items():
        w = weights[name]
        if not dense.quantizable(name, t):  # norms, routers, the embedding: exact
            assert isinstance(w, torch.Tensor) and torch.equal(w, t)
            continue
        quantized += 1
        want = dense.quantize(t, q)
        assert type(w) is type(want)
        for a, b in zip(w.tensors(), want.tensors(), strict=True):
            assert torch.equal(a, b), name
    assert quantized == 1 + 4 * 2  # lm_head, q/k/v/o of both layers


@pytest.mark.parametrize("q", ["int8", "int4"])
def test_a_quantized_store_loads_without_quantizing_and_runs_as_load_time_quant(
    dense_store, store_factory, monkeypatch, q
):
    at_load = mer.api.open(store_factory("bf16"), "64MiB", dtype="float32", dense_quant=q)
    want = list(at_load.tokens(PROMPT, max_tokens=12, stop_token_ids=[-1]))

    def refuse(*a, **kw):
        raise AssertionError("a stored quantized weight was quantized again")

    monkeypatch.setattr(dense.Int8Weight, "quantize", refuse)
    monkeypatch.setattr(dense.Int4Weight, "quantize", refuse)
    for asked in (None, q):  # default: what the store holds
        model = mer.api.open(dense_store(q), "64MiB", dtype="float32", dense_quant=asked)
        assert isinstance(model.transformer.w["lm_head"], dense.SCHEMES[q])
        assert list(model.tokens(PROMPT, max_tokens=12, stop_token_ids=[-1])) == want


def test_int8_dense_store_greedy_matches_transformers(dense_store, hf_tiny):
    # The tolerance stated in tests/test_dense_quant.py: with int8 dense weights the tiny
    # model's greedy tokens are transformers' own.
    model = mer.api.open(dense_store("int8"), "64MiB", dtype="float32")
    ours = list(model.tokens(PROMPT, max_tokens=12, stop_token_ids=[-1]))
    assert ours == greedy(hf_tiny[1], PROMPT, 12)


@pytest.mark.parametrize("asked", ["bf16", "int4"])
def test_asking_a_quantized_store_for_another_width_is_one_line(dense_store, asked):
    with pytest.raises(ConfigError) as e:
        mer.api.open(dense_store("int8"), "64MiB", dense_quant=asked)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--dense-quant {asked}: ")
    assert "holds its dense weights as int8" in msg


def test_cli_convert_writes_it_and_info_shows_it(hf_tiny, store_factory, tmp_path, capsys):
    dst = tmp_path / "tiny-int4-dense"
    args = ["convert", str(hf_tiny[0]), str(dst), "--quant", "int4", "--group-size", "32",
            "--dense-quant", "int4"]  # fmt: skip
    assert main(args) == 0
    assert main(["info", str(dst)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "dense weights" in x)
    assert "int4 (norms, routers, embedding exact)" in line
    assert "format version" in out and " 3 " in next(
        x for x in out.splitlines() if "format version" in x
    )
    assert main(["info", str(store_factory("int4"))]) == 0
    bf16_line = next(x for x in capsys.readouterr().out.splitlines() if "dense weights" in x)
    assert "bf16" in bf16_line
    held = Store(dst).manifest["dense"]["nbytes"]
    assert held < Store(store_factory("int4")).manifest["dense"]["nbytes"]


def edit(store, change) -> None:
    path = store / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda m: m["dense"]["tensors"]["lm_head"].update(scheme="int3"), "scheme"),
        (lambda m: m["dense"]["tensors"]["lm_head"]["parts"].pop("scales"), "parts"),
        (lambda m: m["dense"]["tensors"]["lm_head"]["parts"]["scales"].update(shape=[2, 256]),
         "parts.scales"),
        (lambda m: m.update(format_version=2), "parts"),
        (lambda m: m["dense"].update(quant="int5"), "dense.quant"),
    ],
)  # fmt: skip
def test_a_damaged_quantized_entry_names_the_field(dense_store, tmp_path, change, field):
    import shutil

    store = tmp_path / "copy"
    shutil.copytree(dense_store("int8"), store)
    edit(store, change)
    with pytest.raises(StoreError) as e:
        Store(store)
    msg = str(e.value)
    assert "\n" not in msg and field in msg.split("manifest.json: ", 1)[1]


def test_a_quantized_part_that_fails_its_checksum_is_named(dense_store, tmp_path):
    import shutil

    store = tmp_path / "copy"
    shutil.copytree(dense_store("int8"), store)
    part = Store(store).dense_table["layers.1.o"]["parts"]["data"]
    with open(store / "dense.bin", "r+b") as f:
        f.seek(part["offset"] + 5)
        byte = f.read(1)
        f.seek(part["offset"] + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreError, match=r"tensor layers\.1\.o\.data .* fails its checksum"):
        Store(store).load_dense()


def test_the_embedding_is_read_row_by_row_and_the_output_is_unchanged(store_factory):
    from mer.memory import tensor_bytes
    from mer.store.embedding import EmbeddingRows

    store = store_factory("bf16")
    held = mer.api.open(store, "64MiB", dtype="float32")
    want = list(held.tokens(PROMPT, max_tokens=12, stop_token_ids=[-1]))
    model = mer.api.open(store, "64MiB", dtype="float32", embed_rows=True)
    rows = model.transformer.w["embed"]
    assert isinstance(rows, EmbeddingRows) and rows.reads == 0  # nothing read yet
    assert list(model.tokens(PROMPT, max_tokens=12, stop_token_ids=[-1])) == want
    distinct = len(set(PROMPT) | set(want))
    assert 0 < rows.reads <= distinct  # each distinct token's row once (the cache holds them)
    # What is resident: the row cache (here as many rows as the tiny vocabulary), never the
    # table: bigger vocabularies than the cache are read row by row.
    table = held.transformer.w["embed"]
    assert tensor_bytes([rows]) <= table.nbytes
    small = EmbeddingRows(Store(store).dense_path, Store(store).dense_table["embed"],
                          torch.float32, cached_rows=4)  # fmt: skip
    ids = torch.tensor(PROMPT)
    assert torch.equal(small[ids], table[ids]) and tensor_bytes([small]) == 4 * 64 * 4
    # 12 tokens through 4 cached rows: only the second of two 41s in a row is a hit.
    assert PROMPT[5:7] == [41, 41] and small.reads == len(PROMPT) - 1


def test_memory_reads_the_embedding_by_rows_unless_it_is_tied(store_factory, hf_tiny, tmp_path):
    from tests.conftest import save_tiny_mixtral

    from mer.store.embedding import EmbeddingRows

    with mer.api.open(store_factory("bf16"), memory="4GiB", context=64) as m:
        assert isinstance(m.transformer.w["embed"], EmbeddingRows)
    save_tiny_mixtral(tmp_path / "tied", tie_word_embeddings=True)
    tied = convert(tmp_path / "tied", tmp_path / "tied-store", "bf16", 32, progress=False)
    with mer.api.open(tied, memory="4GiB", context=64) as m:
        assert isinstance(m.transformer.w["embed"], torch.Tensor)  # the head uses it whole
    with pytest.raises(ConfigError, match="tied to the output head"):
        mer.api.open(tied, "64MiB", embed_rows=True)


def test_a_damaged_embedding_is_named_at_open(store_factory, tmp_path):
    import shutil

    store = tmp_path / "copy"
    shutil.copytree(store_factory("bf16"), store)
    e = Store(store).dense_table["embed"]
    with open(store / "dense.bin", "r+b") as f:
        f.seek(e["offset"] + e["nbytes"] - 1)
        f.write(b"\x7f")
    with pytest.raises(StoreError, match="tensor embed at offset .* fails its checksum"):
        mer.api.open(store, "64MiB", embed_rows=True)
