"""Memory limits for benchmarks: a real cgroup (root only; skipped elsewhere) holds a child to
its limit, reports its peak and an OOM kill, and is removed afterwards."""

from __future__ import annotations

import sys

import pytest

from mer.bench import cgroup
from mer.cli import main

needs_cgroup = pytest.mark.skipif(cgroup.available() is not None, reason=str(cgroup.available()))

# The child holds its memory a moment: its own peak is sampled every 50 ms (mer.bench.cgroup).
TOUCH = (
    "import time; x = bytearray({n} << 20); x[::4096] = b'1' * len(x[::4096]); "
    "time.sleep(0.3); print(len(x))"
)


@needs_cgroup
def test_a_child_within_its_limit_runs_and_its_peak_is_measured():
    with cgroup.MemoryLimit(256 << 20) as group:
        r = group.run([sys.executable, "-c", TOUCH.format(n=64)])
        path = group.path
    assert r.returncode == 0 and r.stdout.strip() == str(64 << 20)
    assert r.peak_rss_bytes >= 64 << 20 and r.group_peak_bytes >= 64 << 20
    assert not r.oom_killed
    assert not path.exists()


@needs_cgroup
def test_a_child_over_its_limit_is_oom_killed_and_says_so():
    with cgroup.MemoryLimit(128 << 20) as group:
        r = group.run([sys.executable, "-c", TOUCH.format(n=512)])
    assert r.oom_killed and r.returncode != 0
    assert r.group_peak_bytes <= 128 << 20


def test_vs_llamacpp_without_llama_bench_says_how_to_get_one(tmp_path, capsys, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-bench anywhere
    assert main(["bench", "vs-llamacpp", "--gguf", str(gguf)]) == 1
    err = capsys.readouterr().err.strip()
    if cgroup.available() is None:
        assert err.startswith("error: no llama-bench found") and "cmake" in err
    else:
        assert err.startswith("error: cannot compare under memory limits")
    assert "\n" not in err
