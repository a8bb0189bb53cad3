"""The `mer` command as a user runs it: a real subprocess, its output and exit code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def mer(*args, env=None, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "mer.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mer {args} failed: {proc.stderr}")
    return proc


def test_info_describes_a_store(store_factory):
    out = mer("info", store_factory("int4")).stdout
    assert "mixtral" in out and "int4, group 32" in out and "8 = " in out


def test_convert_then_info(hf_tiny, tmp_path):
    proc = mer("convert", hf_tiny[0], tmp_path / "s", "--quant", "int8")
    assert "wrote" in proc.stderr
    assert "int8" in mer("info", tmp_path / "s").stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["info", "/nonexistent/store"], "/nonexistent/store"),
        (["convert", "/nonexistent/ckpt", "/tmp/x"], "/nonexistent/ckpt"),
        (["generate", "--store", "/nonexistent/s", "--prompt", "hi"], "/nonexistent/s"),
    ],
)
def test_user_errors_are_one_line(args, needle):
    proc = mer(*args, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_bad_budget_is_one_line(store_factory):
    proc = mer("generate", "--store", store_factory("int4"), "--prompt", "x",
               "--ram-budget", "12 bananas", check=False)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: --ram-budget")


def test_demo_runs_end_to_end(tmp_path):
    env = {"MER_CACHE_DIR": str(tmp_path)}
    args = ["demo", "--preset", "small", "--ram-budget", "2MiB", "--max-tokens", "8"]
    first = mer(*args, env=env)
    assert "expert hits" in first.stderr and "read" in first.stderr
    assert first.stdout.startswith("def fibonacci(n):")
    again = mer(*args, env=env)  # cached model: no synthesis or conversion the second time
    assert "synthesizing" not in again.stderr and "converting" not in again.stderr
    assert again.stdout == first.stdout  # greedy: same text


def test_bench_kernel_prints_its_table():
    out = mer("bench", "kernel", "--hidden", "128", "--ffn", "256", "--group-size", "32",
              "--batch", "1", "--batch", "8", "--seconds", "0.05").stdout  # fmt: skip
    assert "memory copy" in out and "weights GB/s" in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["1", "8"]


def test_bench_io_prints_both_tables(store_factory):
    out = mer("bench", "io", "--store", store_factory("int4"), "--seconds", "0.2",
              "--threads", "1", "--threads", "2", "--tokens", "4").stdout  # fmt: skip
    assert "device: 16 x 8 MiB" in out and "engine, 2 threads" in out
    assert "stall ms/token" in out and out.count("│") > 20


def test_bench_cache_prints_policy_tables(tmp_path):
    from tests.test_trace import random_trace

    random_trace(0).save(tmp_path / "t.npz")
    out = mer("bench", "cache", "--trace", tmp_path / "t.npz", "--slots", "20").stdout
    assert "replay by token" in out and "replay by prefill" in out
    for policy in ("lru", "lfu", "ours", "belady"):
        assert f"│ {policy} " in out or f" {policy} │" in out
    assert "expert size 4.60 MB (DeepSeek-V2-Lite's in int4" in out  # the trace records none
    trace = random_trace(0)
    trace.meta["expert_bytes"] = 106_496
    trace.save(tmp_path / "mine.npz")
    out = mer("bench", "cache", "--trace", tmp_path / "mine.npz", "--slots", "20").stdout
    assert "expert size 106.50 kB (recorded with the trace)" in out
    small = mer("bench", "cache", "--trace", tmp_path / "t.npz", "--slots", "1", check=False)
    assert small.returncode == 1
    assert small.stderr.startswith("error: --slots 1 is below") and small.stderr.count("\n") == 1


def test_default_demo_completes_python_with_the_bundled_model(tmp_path):
    proc = mer("demo", "--max-tokens", "24", env={"MER_CACHE_DIR": str(tmp_path)})
    assert "stdlib-moe" in proc.stderr and "expert hits" in proc.stderr
    assert proc.stdout.startswith("def fibonacci(n):")
    completion = proc.stdout.split('"""Return the n-th Fibonacci number."""\n', 1)[1]
    assert completion.strip() and "\ufffd" not in completion


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "serve", "--agents", "4", "0"],
        ["bench", "serve", "--turns", "0"],
        ["bench", "spec", "--prompts", "0"],
        ["bench", "io", "--store", "nowhere", "--tokens", "0"],
        ["bench", "kernel", "--hidden", "0"],
        ["bench", "cache", "--trace", "t.npz", "--max-tokens", "-3"],
        ["serve", "--store", "nowhere", "--max-concurrent", "0"],
        ["generate", "--store", "nowhere", "--prompt", "x", "--max-tokens", "0"],
    ],
)
def test_a_count_below_one_is_refused_before_any_work(capsys, args):
    from mer.cli import main

    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    named = ("--store", "--trace", "--prompt")
    flag = next(a for a in args if a.startswith("--") and a not in named)
    assert err.startswith(f"error: {flag} must be at least 1, got") and "\n" not in err
