"""`mer bench memory`: each dense width's `mer generate --memory L` in a real cgroup of L
(root only), the bf16 row first as the baseline, the split and ratio printed; a store
already quantized is not asked for another width."""

from __future__ import annotations

import pytest

from mer.bench import cgroup
from mer.cli import main


@pytest.mark.skipif(cgroup.available() is not None, reason=str(cgroup.available()))
def test_each_dense_width_runs_in_a_cgroup_of_its_target(trained_store, capsys):
    args = ["bench", "memory", "--store", str(trained_store), "--limits", "1GiB",
            "--dense", "int8", "bf16", "--tokens", "3"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "1.0 GiB │" in line]
    assert [r.split("│")[2].strip() for r in rows] == ["bf16", "int8"]  # the baseline first
    for r in rows:
        cells = [c.strip() for c in r.split("│")]
        assert cells[5] == "no" and float(cells[8]) > 0  # not OOM-killed, decoded
    assert rows[0].split("│")[9].strip() == "x1.00"
    splits = [line for line in out.splitlines() if line.startswith("1.0 GiB ")]
    assert len(splits) == 2 and all("-> expert cache" in s for s in splits)


def test_a_quantized_store_is_not_asked_for_another_width(hf_tiny, tmp_path, capsys):
    from mer.store.convert import convert

    store = convert(hf_tiny[0], tmp_path / "s", "int4", 32, progress=False, dense_quant="int8")
    args = ["bench", "memory", "--store", str(store), "--dense", "bf16", "int8"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds int8 dense weights" in err


@pytest.mark.skipif(cgroup.available() is not None, reason=str(cgroup.available()))
def test_vs_llamacpp_runs_mer_with_memory_the_limit(trained_store):
    from mer.bench import vs_llamacpp

    argv = vs_llamacpp._mer_argv(trained_store, 1 << 30, "int8", 3, 1)
    assert argv[argv.index("--memory") + 1] == str(1 << 30) and "--ram-budget" not in argv
    row = vs_llamacpp._mer(trained_store, 1 << 30, "int8", 3, 1, timeout=300)
    assert row.tok_s and row.tok_s > 0 and not row.run.oom_killed
    assert row.note.startswith("expert cache ")  # the split mer printed for itself
    assert row.run.peak_rss_bytes <= 1 << 30


def test_bench_serve_gives_the_server_its_memory_target(trained_store, capsys):
    from mer.cli import main

    args = ["bench", "serve", "--store", str(trained_store), "--agents", "1", "--turns", "1",
            "--max-tokens", "2", "--think", "0.01", "--memory", "2GiB"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "memory 2GiB (lru)" in out and "RAM budget" not in out
    rows = [line for line in out.splitlines() if line.startswith("│      1 │")]
    assert len(rows) == 2  # both servers came up under --memory and answered


def test_bench_decode_runs_at_the_cache_a_memory_target_leaves(tmp_path, capsys):
    import numpy as np
    from tests.test_realscale import sticky_trace

    from mer.synth.checkpoint import hf_config
    from mer.synth.store import write_random_store

    cfg = hf_config("tiny-qwen2-moe", **{
        "num_hidden_layers": 5, "num_local_experts": 8, "num_experts_per_tok": 2,
        "mlp_only_layers": [0], "hidden_size": 64, "intermediate_size": 64,
    })  # fmt: skip
    store = write_random_store(tmp_path / "store", cfg, progress=False)
    trace = tmp_path / "sticky.npz"
    sticky_trace().save(trace)
    from mer.cli import main

    code = main(["bench", "decode", "--store", str(store), "--routing-trace", str(trace),
                 "--tokens", "16", "--fractions", "--threads", "1", "--batch", "0",
                 "--no-full", "--step-ms", "0.1", "--prefetch", "--memory", "2GiB",
                 "--dense-quant", "int8"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    split = next(line for line in out.splitlines() if line.startswith("memory 2.0 GiB: "))
    experts = int(split.split("(")[-1].split()[0])
    assert experts == 4 * 8  # 2 GiB holds every expert of this tiny store: all of them
    rows = [r.split("│") for r in out.splitlines() if r.startswith("│")]
    lru = next(r for r in rows if r[2].strip() == "lru")
    assert lru[1].strip().endswith(f"({experts})")  # the run at the split's cache
    assert np.isfinite(float(lru[3])) and float(lru[3]) > 0
