"""Experts on Ray workers (`mer.cluster`): with 1, 2 and 3 workers the output equals the
single process's token for token (float32) for plain, batched and speculative decoding;
a worker that cannot open its store fails the start with one line naming it; a worker
killed mid-generation is restarted and the generation finishes the same (or fails within
the bound), and the next request succeeds."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import torch
from tests.helpers import run_all

import mer
import mer.store.reader
from mer.cluster.placement import owner_table, place
from mer.cluster.worker import ExpertWorker
from mer.engine.scheduler import Request, Scheduler
from mer.engine.speculative import SpecStats, Speculation, generate_speculative
from mer.errors import ClusterError, ConfigError

pytest.importorskip("ray")

PROMPTS = ["def fibonacci(n):\n", "import os\n\ndef walk(path):\n", "class Stack:\n"]
TOKENS = 16
BUDGET = "1MiB"  # a third of the experts per worker: every worker reads from its SSD store


@pytest.fixture(scope="module")
def single(trained_store, ray_local):
    """The single-process model and its outputs: plain, batched, and the requests."""
    m = mer.open(trained_store, ram_budget=BUDGET, dtype="float32")
    plain = [m.generate(p, max_tokens=TOKENS).token_ids for p in PROMPTS]
    batched = run_all(_scheduler(m), _requests(m))
    yield m, plain, batched
    m.close()


def _requests(m) -> list[Request]:
    tok = m.tokenizer
    return [
        Request(tok.encode(p), m.sampling_params(max_tokens=TOKENS, temperature=0.8, seed=i))
        for i, p in enumerate(PROMPTS)
    ]


def _scheduler(m) -> Scheduler:
    return Scheduler(m.transformer, kv_budget=8 << 20, max_batch_tokens=16)


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"{n}-workers")
def cluster(request, single, trained_store):
    n = request.param
    m = mer.open(trained_store, ram_budget=BUDGET, dtype="float32", cluster=f"local:{n}")
    yield m
    m.close()


def test_plain_decoding_equals_the_single_process(cluster, single):
    _, plain, _ = single
    assert [cluster.generate(p, max_tokens=TOKENS).token_ids for p in PROMPTS] == plain
    d = cluster.cache.dispatch
    assert d.layers > 0 and d.calls >= d.layers and d.bytes_sent > 0
    assert cluster.stats().cache.bytes_read > 0  # the workers read experts from their stores


def test_batched_decoding_equals_the_single_process(cluster, single):
    m, _, batched = single
    s = _scheduler(cluster)
    try:
        assert run_all(s, _requests(cluster)) == batched
        assert s.stats.dedup_factor > 1  # sequences really ran together
    finally:
        s.close()


def test_speculative_decoding_equals_the_single_process(cluster, single, draft_store):
    _, plain, _ = single
    draft = mer.open(draft_store, ram_budget="64MiB", dtype="float32")
    try:
        for which in ("self", draft.transformer):
            spec = SpecStats()
            for p, want in zip(PROMPTS, plain, strict=True):
                prompt = cluster.tokenizer.encode(p)
                params = cluster.sampling_params(max_tokens=TOKENS)
                speculation = Speculation(which, k=3, adaptive=False)
                out = generate_speculative(cluster.transformer, speculation, prompt, params,
                                           spec=spec)  # fmt: skip
                assert list(out) == want
            assert spec.rounds > 0 and spec.drafted > 0
    finally:
        draft.close()


def test_placement_is_disjoint_balanced_and_follows_measured_load(trained_store, tmp_path):
    from mer.cluster.placement import counts_from_trace
    from mer.trace.format import Trace

    cfg = mer.store.reader.Store(trained_store).config
    layers, n_experts, k = len(cfg.moe_layers), cfg.num_local_experts, cfg.num_experts_per_tok
    for n in (1, 2, 3):
        owned = place(cfg, n)
        table = owner_table(cfg, owned)  # raises unless every expert has exactly one owner
        sizes = [len(keys) for keys in owned]
        assert max(sizes) - min(sizes) <= 1 and len(table) == layers
    # A trace whose tokens all choose experts 0 and 1 at every layer, and others now and then.
    rng = np.random.default_rng(0)
    chosen = np.stack([np.zeros((400, layers)), rng.integers(1, n_experts, (400, layers))], -1)
    chosen[:200, :, 1] = 1
    Trace(chosen.astype(np.int16), np.array([0, 400]), np.ones(400, np.int8),
          {"n_experts": n_experts, "top_k": k}).save(tmp_path / "t.npz")  # fmt: skip
    counts = counts_from_trace(tmp_path / "t.npz", cfg)
    assert counts.shape == (layers, n_experts) and (counts.sum(1) == 400 * k).all()
    for n in (2, 3):
        table = owner_table(cfg, place(cfg, n, counts))
        for j, row in enumerate(table.values()):
            assert row[0] != row[1]  # the two hottest never share a worker
            load = [counts[j][[e for e in range(n_experts) if row[e] == w]].sum() for w in range(n)]
            assert max(load) - min(load) <= counts[j].max()  # greedy's bound: one expert's load
    with pytest.raises(ConfigError, match="more workers than experts"):
        place(cfg, n_experts + 1)


def test_hot_experts_replicated_share_the_work_and_keep_the_output(trained_store, single):
    from mer.cluster.placement import holders, replicate

    _, plain, _ = single
    cfg = mer.store.reader.Store(trained_store).config
    total = cfg.num_experts_total
    # Placement: each replica on another worker, and only where a cache has a free slot.
    even = place(cfg, 2)
    assert replicate(cfg, even, None, 4, slots=total // 2) == even  # no room: none
    more = replicate(cfg, even, None, 4, slots=total)
    assert sum(map(len, more)) == total + 4
    assert sum(len(h) == 2 for row in holders(cfg, more).values() for h in row) == 4
    m = mer.open(trained_store, ram_budget="4MiB", dtype="float32", cluster="local:2",
                 cluster_replicas=4)  # fmt: skip
    try:
        c = m.cache
        replicated = [(j, e) for j, layer in enumerate(cfg.moe_layers) for e in c._replicas[layer]]
        assert len(replicated) == 4 and max(map(len, c.owned)) <= c.slots
        assert [m.generate(p, max_tokens=TOKENS).token_ids for p in PROMPTS] == plain
        # The head sent a replicated expert's work to whichever worker had less of the layer's.
        both = [(j, e) for j, e in replicated if (c.served[:, j, e] > 0).all()]
        print(f"replicated {replicated}; served by both workers: {both}")
        assert both
    finally:
        m.close()


def _skewed(i, h, weights, ids):
    """Every token to experts 0 and 2 at every layer: an even split puts both on worker 0."""
    return weights, torch.tensor([[0, 2]]).repeat(ids.shape[0], 1)


def test_rebalancing_from_running_counts_evens_a_skewed_load_and_keeps_the_output(
    trained_store, single, tmp_path
):
    m1, _, _ = single
    m1.transformer.routing_override = _skewed
    try:
        want = [m1.generate(p, max_tokens=TOKENS).token_ids for p in PROMPTS[:2]]
    finally:
        m1.transformer.routing_override = None
    m = mer.open(trained_store, ram_budget=BUDGET, dtype="float32", cluster="local:2",
                 cluster_rebalance=4)  # fmt: skip
    try:
        c = m.cache
        assert all(row[0] == row[2] for row in owner_table(c.config, c.owned).values())
        m.transformer.routing_override = _skewed
        assert m.generate(PROMPTS[0], max_tokens=TOKENS).token_ids == want[0]
        assert c.rebalances == 1  # after the 4th forward pass, from what the first 4 did
        assert all(row[0] != row[2] for row in owner_table(c.config, c.owned).values())
        before = c.served.sum((1, 2))
        assert m.generate(PROMPTS[1], max_tokens=TOKENS).token_ids == want[1]
        pairs = c.served.sum((1, 2)) - before
        assert pairs[0] == pairs[1] > 0  # the same work on each worker now
        assert not c.rebalance() and c.rebalances == 1  # balanced: nothing moves again
    finally:
        m.close()
    # A shard store serves only its shard: refused before any worker starts.
    from mer.cluster.split import split_store

    shards = split_store(trained_store, 2, tmp_path / "shards")
    with pytest.raises(ConfigError, match="need a full copy of the store on every worker"):
        mer.open(trained_store, ram_budget=BUDGET, cluster="local:2", worker_stores=shards,
                 cluster_rebalance=8)  # fmt: skip


def test_a_worker_whose_store_is_missing_or_corrupt_fails_at_start(
    trained_store, ray_local, tmp_path
):
    missing = tmp_path / "no-such-store"
    with pytest.raises(ClusterError, match=rf"^worker 0 \(store {missing}\): .*no such store"):
        mer.open(trained_store, ram_budget=BUDGET, cluster="local:1", worker_stores=[missing])
    # What a worker reports from its store, as above (here without starting a Ray actor).
    bad = tmp_path / "truncated"
    shutil.copytree(trained_store, bad)
    experts = next(bad.glob("experts*"))
    os.truncate(experts, experts.stat().st_size // 2)
    keys = place(mer.store.reader.Store(trained_store).config, 1)[0]
    error = ExpertWorker(0, bad, keys, 1 << 20).ready()["error"]
    assert re.fullmatch(rf"worker 0 \(store {bad}\): {experts}: truncated, .*cut off", error)
    manifest = tmp_path / "bad-json"
    shutil.copytree(trained_store, manifest)
    (manifest / "manifest.json").write_text("{")
    error = ExpertWorker(2, manifest, keys, 1 << 20).ready()["error"]
    assert re.fullmatch(
        rf"worker 2 \(store {manifest}\): .*manifest.json: not valid JSON .*", error
    )


def test_a_worker_killed_mid_generation_is_restarted_and_the_next_request_succeeds(
    trained_store, single
):
    _, plain, _ = single
    m = mer.open(trained_store, ram_budget=BUDGET, dtype="float32", cluster="local:2",
                 cluster_timeout=30)  # fmt: skip
    try:
        import ray

        victim = m.cache.handles[0]
        pid = ray.get(victim.pid.remote())
        got: list[int] = []
        killed = threading.Event()

        def kill_after_some_tokens():
            while len(got) < 4:
                time.sleep(0.0005)
            os.kill(pid, signal.SIGKILL)  # mid-generation, likely mid-layer
            killed.set()

        killer = threading.Thread(target=kill_after_some_tokens)
        killer.start()
        t0 = time.monotonic()
        try:
            for t in m.tokens(PROMPTS[0], max_tokens=TOKENS):
                got.append(t)
            outcome = "finished"
        except ClusterError as e:
            outcome = f"failed: {e}"
        elapsed = time.monotonic() - t0
        killer.join()
        assert killed.is_set()
        assert elapsed < 30 + 10  # within the bound either way
        print(f"killed worker 0 after {len(got)} tokens: {outcome}, {m.cache.dispatch.retries} "
              f"calls sent again, {elapsed:.1f} s")  # fmt: skip
        if outcome == "finished":
            assert got == plain[0]
        else:
            assert "worker 0" in outcome and "\n" not in outcome
        assert ray.get(victim.pid.remote()) != pid  # Ray restarted it
        assert m.generate(PROMPTS[1], max_tokens=TOKENS).token_ids == plain[1]
        # A worker that never comes back (its machine gone): the request fails within the
        # bound, in one line naming the worker.
        ray.kill(m.cache.handles[1], no_restart=True)
        m.cache.timeout = 3.0
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match=r"^worker 1 died at MoE layer \d+ and was not back "
                           r"within 3 s$"):  # fmt: skip
            m.generate(PROMPTS[2], max_tokens=TOKENS)
        assert time.monotonic() - t0 < 3.0 + 5
    finally:
        m.close()


def test_store_split_writes_disjoint_shards_that_workers_serve(trained_store, single, tmp_path):
    from mer.cluster.split import split_store
    from mer.store.reader import Store

    _, plain, _ = single
    shards = split_store(trained_store, 2, tmp_path / "shards")
    full = Store(trained_store)
    held = [set(Store(p).extents) for p in shards]
    assert not held[0] & held[1] and held[0] | held[1] == set(full.extents)
    for p, keys in zip(shards, held, strict=True):
        s = Store(p)
        assert s.shard["workers"] == 2 and {tuple(k) for k in s.shard["experts"]} == keys
        assert (p / "experts.bin").stat().st_size == len(keys) * full.expert_format.nbytes
        for k in keys:  # the same bytes, where the shard's table says
            x, y = s.extent(*k), full.extent(*k)
            with open(s.expert_path, "rb") as f:
                f.seek(x.offset)
                s.verify_expert(*k, f.read(x.length))
            assert x.checksum == y.checksum
    with pytest.raises(ConfigError, match="shard of cluster worker 0"):
        mer.open(shards[0])
    m = mer.open(shards[0], ram_budget=BUDGET, dtype="float32", cluster="local:2",
                 worker_stores=shards)  # fmt: skip
    try:
        assert m.cache.owned == [sorted(k) for k in held]  # the shards' own experts
        assert m.generate(PROMPTS[0], max_tokens=TOKENS).token_ids == plain[0]
    finally:
        m.close()
    # Shards that do not hold every expert between them are refused before any worker starts.
    with pytest.raises(ConfigError, match="expert 0 of layer 0 has no worker"):
        mer.open(trained_store, ram_budget=BUDGET, cluster="local:1", worker_stores=[shards[1]])
    # A worker whose store lacks experts it was given (the head could not read the shards
    # to know) fails at start with one line naming itself, its store and the expert.
    worker = ExpertWorker(1, shards[1], sorted(held[0]), 1 << 20)
    assert re.fullmatch(rf"worker 1 \(store {shards[1]}\): .*has no expert \d+ of layer \d+.*",
                        worker.ready()["error"])  # fmt: skip


def test_mer_store_split_on_the_command_line_and_a_damaged_shard_manifest(
    trained_store, tmp_path, capsys
):
    import json

    from mer.cli import main
    from mer.errors import StoreError
    from mer.store.reader import Store

    assert main(["store", "split", trained_store, "--workers", "3", "--out", tmp_path / "s"]) == 0
    err = capsys.readouterr().err
    assert err.count("wrote ") == 3 and "worker-2: 10 experts" in err
    assert main(["info", tmp_path / "s" / "worker-2"]) == 0
    assert "worker 2 of 3" in capsys.readouterr().out
    assert main(["store", "split", tmp_path / "nope", "--workers", "2", "--out", tmp_path]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err and err.count("\n") == 1
    manifest = tmp_path / "s" / "worker-1" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["shard"]["index"] = 7
    manifest.write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"manifest.json: field shard.index must be a worker"):
        Store(manifest.parent)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_of(temp_dir: str) -> list[int]:
    """Every process that names `temp_dir` on its command line or holds a file under it: the
    Ray processes of the cluster whose session lives there (workers included), and none else."""
    from pathlib import Path

    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if temp_dir in (d / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(d.name))
                continue
            if any(os.readlink(fd).startswith(temp_dir) for fd in (d / "fd").iterdir()):
                pids.append(int(d.name))
        except OSError:
            pass  # gone, or not ours to look at
    return pids


@pytest.mark.multinode
def test_a_two_node_ray_cluster_on_one_machine_gives_the_same_output(
    trained_store, single, tmp_path_factory
):
    """`ray start --head`, then `ray start --address` for a second node, each its own
    processes; `mer generate --cluster ADDRESS --workers 2` places a worker on each node and
    prints what the single process prints."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from tests.test_cli import mer as mer_cli

    import mer as mer_pkg

    m, plain, _ = single
    temp_dir = tempfile.mkdtemp(prefix="mr-", dir="/tmp")  # short: Ray's socket paths
    port = _free_port()
    src = str(Path(mer_pkg.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",  # no token to hand between the processes of one test
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
    }
    ray_cli = [str(Path(sys.executable).parent / "ray"), "start", "--num-cpus", "1",
               "--object-store-memory", str(80 << 20), "--disable-usage-stats"]  # fmt: skip

    def ray_start(*args):
        done = subprocess.run([*ray_cli, *args], env=env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert done.returncode == 0, f"ray start {args}: {done.stderr[-2000:]}"

    try:
        dashboard = str(_free_port())
        ray_start("--head", "--port", str(port), "--temp-dir", temp_dir,
                  "--include-dashboard", "false", "--dashboard-port", dashboard)  # fmt: skip
        ray_start("--address", f"127.0.0.1:{port}")
        proc = mer_cli("generate", "--store", trained_store, "--prompt", PROMPTS[0],
                       "--max-tokens", TOKENS, "--ram-budget", BUDGET, "--dtype", "float32",
                       "--cluster", f"127.0.0.1:{port}", "--workers", "2", env=env)  # fmt: skip
        assert "2 workers on 2 nodes" in proc.stderr
        assert proc.stdout.removesuffix("\n") == PROMPTS[0] + m.tokenizer.decode(plain[0])
    finally:
        for _ in range(2):  # a process may start a child while the first round kills
            for pid in _processes_of(temp_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert _processes_of(temp_dir) == []


def test_bench_cluster_prints_the_table_the_floor_and_a_labelled_projection(
    trained_store, ray_local, capsys
):
    from mer.cli import main

    args = ["bench", "cluster", "--store", trained_store, "--workers", "1", "--tokens", "4",
            "--warmup", "2", "--rtt-calls", "10", "--machines", "1", "8"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"bare Ray actor round trip .*: \d+\.\d+ ms to one actor", out)
    rows = [
        line for line in out.splitlines() if "│" in line and ("single" in line or "worker" in line)
    ]
    assert any("1 worker" in r and r.rstrip("│ ").endswith("yes") for r in rows)  # same tokens
    assert re.search(
        r"dispatch overhead, 1 worker: \d+\.\d+ ms per layer .* with the actor busy", out
    )
    assert "PROJECTION (not measured)" in out


def test_an_address_where_no_ray_listens_is_one_line_at_once():
    from mer.cluster.session import parse_cluster, reachable

    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=rf"^--cluster 127.0.0.1:{port}: no Ray cluster answers"):
        reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5
    with pytest.raises(ConfigError, match="local:N wants a worker count"):
        parse_cluster("local:zero")


def test_replicate_and_rebalance_flags_without_a_cluster_are_one_line(trained_store, capsys):
    from mer.cli import main

    for flag in ("--replicate", "--rebalance-every"):
        args = ["generate", "--store", trained_store, "--prompt", "x", flag, "2"]
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err == f"error: {flag} needs --cluster\n"
    assert main(["generate", "--store", trained_store, "--prompt", "x", "--replicate", "-1"]) == 1
    assert capsys.readouterr().err == "error: --replicate must be at least 0, got -1\n"
