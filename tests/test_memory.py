"""`--memory`: one target for the whole process, split into what is resident and the expert
cache; a target too small is refused in one line before any expert is read; under a real
cgroup limit equal to the target, a run finishes with its peak inside it (root only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mer
import mer.api
from mer.bench import cgroup
from mer.cli import main
from mer.errors import BudgetError
from mer.memory import plan

MiB = 1 << 20


def test_the_cache_gets_what_the_rest_leaves_in_whole_slots():
    p = plan(1000 * MiB, dense=300 * MiB, resident=500 * MiB, kv=50 * MiB,
             workspace=50 * MiB, slot_bytes=30 * MiB, min_slots=2)  # fmt: skip
    assert p.runtime == 200 * MiB and p.fixed == 600 * MiB
    assert p.cache == 390 * MiB  # 13 slots of the 400 MiB left
    assert "expert cache 390.0 MiB (13 experts" in p.line()


def test_a_target_too_small_names_the_shortfall():
    with pytest.raises(BudgetError) as e:
        plan(600 * MiB, dense=300 * MiB, resident=500 * MiB, kv=50 * MiB,
             workspace=50 * MiB, slot_bytes=30 * MiB, min_slots=2)  # fmt: skip
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--memory 600.0 MiB is 60.0 MiB short")


def test_open_with_memory_splits_it_and_generates(trained_store):
    with mer.open(trained_store, memory="4GiB", context=64) as m:
        split = m.memory
        assert split.target == 4 << 30 and split.dense > 0 and split.runtime > 0
        assert m.budget_bytes == split.cache and m.cache.n_slots > 0
        a = m.generate("def add(a, b):", max_tokens=8).token_ids
        stats = m.stats()
        assert stats.memory_target == 4 << 30 and stats.peak_rss_bytes > 0
    with mer.open(trained_store, ram_budget="1GiB") as m:  # results do not depend on it
        assert m.generate("def add(a, b):", max_tokens=8).token_ids == a
        assert m.memory is None and m.stats().memory_target is None


def test_too_small_a_target_is_refused_before_any_expert_is_read(trained_store, monkeypatch):
    def no_cache(*a, **kw):
        raise AssertionError("the expert cache was created")

    monkeypatch.setattr(mer.api, "ExpertCache", no_cache)
    with pytest.raises(BudgetError, match="short"):
        mer.open(trained_store, memory="64MiB")


def test_cli_prints_the_split_and_the_target_next_to_peak_rss(trained_store, capsys):
    args = ["generate", "--store", str(trained_store), "--prompt", "def f(x):",
            "--max-tokens", "4", "--memory", "4GiB"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.startswith("memory 4.0 GiB: dense weights ")
    assert "of --memory 4.0 GiB" in err.splitlines()[-1]


@pytest.mark.parametrize(
    "extra, needle",
    [(["--memory", "16MiB"], "error: --memory 16.0 MiB is "),
     (["--memory", "2GiB", "--ram-budget", "1GiB"], "error: give --memory")],
)  # fmt: skip
def test_cli_memory_errors_are_one_line(trained_store, capsys, extra, needle):
    args = ["generate", "--store", str(trained_store), "--prompt", "x", *extra]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(needle)


@pytest.mark.skipif(cgroup.available() is not None, reason=str(cgroup.available()))
def test_generate_inside_a_cgroup_at_its_target_stays_within_it(tmp_path):
    """A store larger than the target, run with --memory equal to the cgroup's limit."""
    store, target = tmp_path / "store", 512 * MiB
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    synth = [sys.executable, "-m", "mer.cli", "synth", str(store), "--store",
             "--preset", "demo", "--experts", "16"]  # fmt: skip
    subprocess.run(synth, check=True, capture_output=True, env=env)
    size = sum(f.stat().st_size for f in store.iterdir())
    assert size > target
    argv = [sys.executable, "-m", "mer.cli", "generate", "--store", str(store),
            "--memory", str(target), "--prompt", "hello there", "--max-tokens", "16",
            "--ignore-eos"]  # fmt: skip
    with cgroup.MemoryLimit(target, name="mer-test-memory") as group:
        r = group.run(argv, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert not r.oom_killed
    assert r.peak_rss_bytes <= target
    assert r.group_peak_bytes is None or r.group_peak_bytes <= target
    assert "of --memory 512.0 MiB" in r.stderr


def test_metrics_report_peak_rss_next_to_the_target(trained_store):
    from mer.serve.metrics import render_metrics

    with mer.open(trained_store, memory="4GiB", kv_budget="8MiB", pass_tokens=64) as m:
        rows = dict(
            line.split() for line in render_metrics(m, m.scheduler("8MiB"), 0).splitlines()
            if not line.startswith("#")
        )  # fmt: skip
        assert float(rows["mer_memory_target_bytes"]) == 4 << 30
        assert float(rows["mer_peak_rss_bytes"]) > 0  # this test process's, whatever ran before
        assert float(rows["mer_expert_cache_bytes"]) == m.memory.cache


def test_a_margin_is_kept_for_what_grows_after_start(trained_store):
    from mer.memory import MIN_MARGIN, growth_margin

    p = plan(1000 * MiB, dense=300 * MiB, resident=500 * MiB, kv=50 * MiB,
             workspace=50 * MiB, slot_bytes=30 * MiB, min_slots=2, margin=64 * MiB)  # fmt: skip
    assert p.cache == 330 * MiB and "+ margin 64.0 MiB -> expert cache 330.0 MiB" in p.line()
    assert growth_margin(1 << 30) == MIN_MARGIN and growth_margin(8 << 30) == int(0.02 * (8 << 30))
    with mer.open(trained_store, memory="4GiB", context=64) as m:
        assert m.memory.margin == growth_margin(4 << 30)
        assert m.memory.fixed + m.memory.cache <= 4 << 30
