"""`mer bench fits` on a tiny GGUF: mer with every expert in RAM against the bandwidth bound
(and llama.cpp's llama-bench where one is found: on PATH or $LLAMA_BENCH), one table."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from mer.bench import llamacpp
from mer.cli import main
from mer.errors import MerError
from mer.synth.checkpoint import hf_config
from mer.synth.gguf import write_synthetic_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("fits") / "tiny.gguf"
    write_synthetic_gguf(path, hf_config("tiny"), "Q4_0", progress=False)
    return path


def _llama_bench() -> str | None:
    found = os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench")
    return found if found and os.path.isfile(found) else None


def _row(out: str, phase: str) -> list[str]:
    line = next(ln for ln in out.splitlines() if ln.strip("│┃ ").startswith(phase))
    return [c.strip() for c in line.strip("│┃ ").split("│")]


@pytest.mark.parametrize("with_llama", [False, True])
def test_fits_prints_decode_and_prefill_against_the_bound_and_llama_cpp(
    tiny_gguf, capsys, with_llama
):
    bench = _llama_bench()
    if with_llama and bench is None:
        pytest.skip("no llama-bench here (PATH or $LLAMA_BENCH)")
    argv = ["bench", "fits", "--gguf", tiny_gguf, "--threads", "1", "--prompt-tokens", "16",
            "--tokens", "4", "--repeats", "1"]  # fmt: skip
    argv += ["--llama-bench", bench] if with_llama else ["--dense-quant", "int8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"dense weights {'bf16' if with_llama else 'int8'}" in out
    assert "expert reads while timing: 0" in out  # every expert was in RAM
    decode, prefill = _row(out, "decode"), _row(out, "prefill (16 tokens)")
    for row in (decode, prefill):
        mer_tps, llama_tps, x_llama, _, bound, x_bound = row[1:]
        assert float(mer_tps) > 0 and float(bound) > 0
        assert x_bound == f"x{float(mer_tps) / float(bound):.2f}"
        if with_llama:
            assert float(llama_tps) > 0
            assert abs(float(x_llama[1:]) - float(mer_tps) / float(llama_tps)) < 0.011
        else:
            assert llama_tps == "-" and x_llama == "-"
    # A decode token touches 2 of 4 experts at each of 2 layers: 4 experts' bytes at least.
    assert re.search(r"\(4\.0 per decode token", out)


def test_fits_names_what_is_missing(tmp_path, capsys):
    assert main(["bench", "fits"]) == 1
    assert capsys.readouterr().err == "error: give --store DIR or --gguf FILE (or both)\n"
    assert main(["bench", "fits", "--store", tmp_path, "--llama-bench", "x"]) == 1
    assert "--llama-bench needs --gguf FILE" in capsys.readouterr().err
    assert main(["bench", "fits", "--gguf", tmp_path / "no.gguf"]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'no.gguf'}: no such GGUF file\n"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert main(["bench", "fits", "--gguf", gguf, "--llama-bench", tmp_path / "nope"]) == 1
    assert capsys.readouterr().err == f"error: --llama-bench {tmp_path / 'nope'}: no such file\n"


def test_a_llama_bench_killed_by_a_signal_is_named(tmp_path):
    from mer.bench.fits import _llama

    script = tmp_path / "llama-bench"
    script.write_text("#!/bin/sh\necho loading >&2\nkill -ILL $$\n")
    script.chmod(0o755)
    with pytest.raises(MerError, match=r"killed by SIGILL: .*without GGML_NATIVE.*: loading$"):
        _llama([str(script)])
    script.write_text("#!/bin/sh\nexit 3\n")
    with pytest.raises(MerError, match=r"^llama-bench failed \(exit 3\): no output$"):
        _llama([str(script)])
    assert llamacpp.exit_status(-9) == "killed by SIGKILL"
    assert llamacpp.exit_status(-200) == "killed by signal 200"


def test_llama_bench_json_reads_as_prefill_and_decode_rates():
    out = '[{"n_prompt": 256, "n_gen": 0, "avg_ts": 20.5},'
    out += ' {"n_prompt": 0, "n_gen": 32, "avg_ts": 9.25}]'
    assert llamacpp.bench_rates(out) == {"prefill": 20.5, "decode": 9.25}
    assert llamacpp.bench_rates("not json") == {}


def test_rounds_alternate_mer_and_llama_cpp_and_give_the_median_ratio(tiny_gguf, capsys):
    """`--rounds 3`: mer measured three times in one open model; with llama.cpp, four
    llama-bench runs around them and the table's ratio the median of the rounds'."""
    argv = ["bench", "fits", "--gguf", tiny_gguf, "--threads", "1", "--prompt-tokens", "8",
            "--tokens", "2", "--repeats", "1", "--rounds", "3"]  # fmt: skip
    bench = _llama_bench()
    assert main(argv + (["--llama-bench", bench] if bench else [])) == 0
    out = capsys.readouterr().out
    assert "expert reads while timing: 0" in out and float(_row(out, "decode")[1]) > 0
    # the prefetch hint was chosen (or read back) before anything was timed
    assert re.search(r"int4 prefetch hint (NTA|T0) \((measured|saved|undecided)\)", out)
    if bench is None:
        assert "by round" not in out
        return
    runs = re.search(r"before, between and after mer's rounds: prefill ([^;]+); decode (.+)", out)
    assert runs and all(len(g.split(", ")) == 4 for g in runs.groups())
    by_round = re.search(r"by round: prefill ([^;]+); decode (.+)", out)
    for phase, xs in zip(("prefill", "decode"), by_round.groups(), strict=True):
        ratios = sorted(float(x.strip()[1:]) for x in xs.split(","))
        assert len(ratios) == 3
        assert (
            _row(out, "prefill (8 tokens)" if phase == "prefill" else "decode")[3]
            == f"x{ratios[1]:.2f}"
        )


def test_depth_puts_context_in_the_cache_before_prefill_and_decode(tiny_gguf, capsys):
    """`--depth N`: both engines prefill and decode after N tokens of context (llama-bench's
    -d); the rows say so, and the context's own pass is neither timed nor counted as a
    decode token's routing."""
    argv = ["bench", "fits", "--gguf", tiny_gguf, "--threads", "1", "--prompt-tokens", "8",
            "--tokens", "3", "--repeats", "2", "--depth", "20"]  # fmt: skip
    bench = _llama_bench()
    assert main(argv + (["--llama-bench", bench] if bench else [])) == 0
    out = capsys.readouterr().out
    assert "decode 3 tokens at depth 20" in out
    decode, prefill = _row(out, "decode at depth 20"), _row(out, "prefill (8 tokens at depth 20)")
    assert float(decode[1]) > 0 and float(prefill[1]) > 0
    assert re.search(r"\(4\.0 per decode token", out)  # 2 of 4 experts at each of 2 layers
    if bench:
        assert " -d 20" in out and float(decode[2]) > 0


def test_a_depth_beyond_the_context_is_a_clear_error(tiny_gguf, capsys):
    argv = ["bench", "fits", "--gguf", tiny_gguf, "--threads", "1", "--prompt-tokens", "8",
            "--tokens", "2", "--repeats", "1", "--depth", "100000"]  # fmt: skip
    assert main(argv) == 1
    assert "exceeds the model's max_position_embeddings" in capsys.readouterr().err
