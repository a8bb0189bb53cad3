"""`mer bench kernel` times other schemes next to int4, in the same run, as ratios to it, and
dense matrices at one token by each path against a copy timed in the same rounds."""

from __future__ import annotations

import pytest
import torch

from mer.bench.kernel import kernel_bench
from mer.errors import ConfigError
from mer.quant import dense_paths
from mer.quant.dense import Int4Weight


def test_mxfp4_is_timed_next_to_int4(capsys):
    # 96 is no multiple of the asked group 128: int4 falls back to the group that fits.
    kernel_bench(96, 192, [1, 4], 128, 0.02, ("int4", "mxfp4"))
    out = capsys.readouterr().out
    assert "int4 g32" in out and "kernel: C" in out
    header = next(line for line in out.splitlines() if line.startswith("┃") and "tokens" in line)
    assert "mxfp4 ms" in header and "mxfp4/int4" in header
    rows = [line.split("│")[1:-1] for line in out.splitlines() if line.startswith("│")]
    assert [r[0].strip() for r in rows] == ["1", "4"]
    for r in rows:
        ratio = r[-1].strip()
        assert ratio.endswith("x") and float(ratio[:-1]) > 0


def test_a_scheme_that_cannot_hold_the_shape_is_named():
    with pytest.raises(ConfigError, match="cannot hold a 96x200 expert as int4: down projection"):
        kernel_bench(96, 200, [1], 32, 0.01, ("int4", "mxfp4"))
    with pytest.raises(ConfigError, match="unknown scheme 'fp8'"):
        kernel_bench(96, 192, [1], 32, 0.01, ("fp8",))


def test_the_dense_table_times_every_width_and_path_against_the_copy(capsys):
    kernel_bench(128, 192, [1], 64, 0.02, ("int4",), vocab=640)
    out = capsys.readouterr().out
    assert "dense matrices, one bf16 token" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["128x128"],
            ["640x128"])]  # fmt: skip
    for shape in ("128x128", "640x128"):
        paths = {(r[1], r[2]) for r in rows if r[0] == shape}
        want = {("int4", p) for p in dense_paths.available(_int4(shape).linear)}
        assert want | {("int8", "torch"), ("bf16", "torch")} <= paths
    for r in rows:  # ms, weights GB/s, vs copy: measured, positive
        assert all(float(v) > 0 for v in r[3:6])


def _int4(shape: str) -> Int4Weight:
    n, k = map(int, shape.split("x"))
    return Int4Weight.quantize(torch.randn(n, k))


def test_the_read_rate_runs_on_the_threads_asked_and_gives_them_back(monkeypatch):
    from mer.bench import kernel

    timed = kernel.median_seconds
    seen = []

    def spy(fn, seconds):
        seen.append(torch.get_num_threads())
        return timed(fn, seconds)

    monkeypatch.setattr(kernel, "median_seconds", spy)
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    rate = kernel.memory_read_rate(8 << 20, 0.05, threads=want)
    assert seen == [want] and torch.get_num_threads() == before
    assert rate > 1e8  # 8 MiB summed in under 80 ms: any machine


def test_an_expert_is_timed_over_copies_that_outrun_the_cache_one_a_call(monkeypatch, capsys):
    import numpy as np

    from mer.bench import kernel

    ef = kernel.expert_format("int4", 128, 256, 32)
    rng = np.random.default_rng(0)
    monkeypatch.setattr(kernel, "FROM_RAM", 3 * ef.nbytes - 1)
    first = ef.view(torch.zeros(ef.nbytes, dtype=torch.uint8))
    made = kernel.copies(ef, rng, first=first)
    assert len(made) == 3 and made[0] is first
    assert len({e.gate_up.packed.data_ptr() for e in made}) == 3  # three buffers
    seen = []
    turn = kernel.in_turn(lambda e, x: seen.append(e) or x, made)
    assert [turn(i) for i in range(4)] == [0, 1, 2, 3]
    assert seen == [*made, made[0]]
    monkeypatch.setattr(kernel, "FROM_RAM", 1 << 40)
    assert len(kernel.copies(ef, rng)) == kernel.MAX_COPIES
    kernel_bench(128, 256, [1], 32, 0.01, ("int4",))
    out = capsys.readouterr().out
    assert f"per expert, timed over {kernel.MAX_COPIES} copies (from RAM)" in out


def test_dense_matrices_come_in_copies_per_width_that_outrun_the_cache(monkeypatch):
    from mer.bench import kernel

    monkeypatch.setattr(kernel, "FROM_RAM", 2 * 64 * 128)  # the int8 width's bytes, twice
    q4s, q8s, ws = kernel._matrices(64, 128, torch.Generator().manual_seed(0))
    assert (len(q8s), len(ws)) == (2, 1)  # bf16: 2 bytes a weight, one copy is enough
    assert len(q4s) == 4  # 4096 bytes of nibbles and 256 of scales and zeros: 4 copies
    assert len({q.linear.packed.data_ptr() for q in q4s}) == 4
    assert not torch.equal(q8s[0].data, q8s[1].data)  # different matrices, not one repeated
