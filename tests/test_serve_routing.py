"""Forced routing in the server (issue 16): `mer serve --routing-trace` and
`mer bench serve --routing-trace` route every token as a recorded trace did."""

from __future__ import annotations

import numpy as np
from tests.test_realscale import sticky_trace

import mer.api
from mer.engine.batching import Request
from mer.trace.forced import BatchFeeder, TraceRouting


def test_scheduled_batches_route_as_the_trace_says(small_store):
    trace = sticky_trace(n_seqs=6, length=20)
    model = mer.api.open(small_store, ram_budget="1MiB", prefetch=False)
    routing = TraceRouting.for_model(trace, model.transformer)
    model.transformer.routing_override = routing
    feeder = BatchFeeder(routing, min_length=20)
    fed: list[np.ndarray] = []
    recorder = model.record_trace()
    scheduler = model.scheduler("4MiB", before_forward=lambda b: fed.append(feeder(b))).start()
    try:
        params = model.sampling_params(max_tokens=6, temperature=0)
        # Three requests batched together; the longest (30 tokens + 6) wraps round its
        # trace sequence of 20.
        requests = [scheduler.submit(Request(list(range(3, 3 + n)), params)) for n in (5, 9, 30)]
        outs = [list(r) for r in requests]
    finally:
        scheduler.close()
    assert all(o[-1].finish_reason == "length" for o in outs)
    got = recorder.trace()
    rows = np.concatenate(fed)
    assert got.n_tokens == len(rows) == 5 + 9 + 30 + 3 * 5  # the last sampled token never runs
    assert np.array_equal(np.sort(got.experts, -1), np.sort(trace.experts[rows], -1))
    # Request by request, the trace's sequences in turn, position p at row p (mod length).
    for i, (r, n) in enumerate(zip(requests, (5, 9, 30), strict=True)):
        want = trace.seq_starts[i] + np.arange(n + 5) % 20
        assert np.array_equal(feeder.rows(r.id, 0, n + 5), want)


def test_bench_serve_with_a_routing_trace(trained_store, tmp_path, capsys):
    from mer.cli import main

    path = tmp_path / "t.npz"
    sticky_trace(n_seqs=4, length=80).save(path)  # the bundled model's shape: 4 x 8, top-2
    args = ["bench", "serve", "--store", str(trained_store), "--agents", "2", "--turns", "1",
            "--max-tokens", "4", "--think", "0.01", "--routing-trace", path]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"routing from {path}" in out
    rows = [line for line in out.splitlines() if line.startswith("│      2 │")]
    assert len(rows) == 2 and "batched" in rows[1]


def test_bench_serve_refuses_a_trace_of_another_shape(trained_store, tmp_path, capsys):
    from mer.cli import main

    path = tmp_path / "t.npz"
    sticky_trace(n_seqs=2, experts=6).save(path)
    assert main(["bench", "serve", "--store", str(trained_store), "--routing-trace", path]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match" in err and str(path) in err


def test_serve_refuses_a_routing_trace_with_speculation(trained_store, tmp_path, capsys):
    from mer.cli import main

    path = tmp_path / "t.npz"
    sticky_trace(n_seqs=2).save(path)
    code = main(["serve", "--store", str(trained_store), "--routing-trace", path, "--speculate"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--routing-trace" in err
