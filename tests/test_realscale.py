"""Real routing at real scale (issue 16): forced routing from a trace, live prefetch from
routing-history predictors, `mer bench decode`, on a tiny random store and small traces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mer.api
from mer.errors import ConfigError
from mer.trace.forced import TraceRouting, decode_sequences
from mer.trace.format import Trace, load_trace


def sticky_trace(n_seqs=12, length=24, layers=4, experts=8, k=2, seed=0) -> Trace:
    """Routing with locality: each layer keeps a token's experts with chance 0.7."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_seqs):
        cur = np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)])
        for _ in range(length):
            for m in range(layers):
                if rng.random() > 0.7:
                    cur[m] = rng.choice(experts, k, replace=False)
            rows.append(cur.copy())
    starts = np.arange(n_seqs + 1, dtype=np.int64) * length
    meta = {"model": "sticky", "n_experts": experts, "top_k": k, "moe_layers": layers}
    return Trace(np.stack(rows).astype(np.int16), starts, np.zeros(len(rows), np.int8), meta)


def test_forced_routing_uses_exactly_the_traces_experts(small_store, tmp_path):
    trace = sticky_trace()
    model = mer.api.open(small_store, ram_budget="1MiB", prefetch=False)
    routing = TraceRouting.for_model(trace, model.transformer)
    model.transformer.routing_override = routing
    recorder = model.record_trace()
    picked = [[0], [3], [5, 6, 7]]  # alone, then three sequences in one batch
    decode_sequences(model.transformer, routing, picked, lambda group, n: None)
    model.close()
    got = recorder.trace()
    # Each pass of the recorder is one row per running sequence, in the order fed.
    rows = [trace.seq_starts[i] + t for i in (0, 3) for t in range(24)]
    rows += [trace.seq_starts[i] + t for t in range(24) for i in (5, 6, 7)]
    want = np.sort(trace.experts[rows], -1)
    assert got.n_tokens == len(rows)
    assert np.array_equal(np.sort(got.experts, -1), want)
    assert routing.passes == 24 * 3


def test_forced_routing_needs_fed_rows(small_store):
    trace = sticky_trace()
    model = mer.api.open(small_store, ram_budget="1MiB", prefetch=False)
    model.transformer.routing_override = TraceRouting.for_model(trace, model.transformer)
    kv = model.transformer.new_kv_cache(4)
    with pytest.raises(RuntimeError, match="no trace rows"):
        model.transformer.forward(torch.tensor([1]), kv)
    model.close()


@pytest.mark.parametrize("change", [dict(layers=3), dict(experts=6), dict(k=3)])
def test_trace_of_another_shape_is_refused(small_store, change):
    trace = sticky_trace(n_seqs=2, **change)
    model = mer.api.open(small_store, ram_budget="1MiB", prefetch=False)
    with pytest.raises(ConfigError, match="does not match") as e:
        TraceRouting.for_model(trace, model.transformer, "t.npz", str(small_store))
    model.close()
    assert "\n" not in str(e.value) and "t.npz" in str(e.value)


@pytest.fixture(scope="module")
def sticky_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rs") / "sticky.npz"
    sticky_trace(n_seqs=16, length=16).save(path)
    return path


def test_bench_decode_prints_engine_beside_simulator(small_store, sticky_file, capsys):
    from mer.cli import main

    code = main(["bench", "decode", "--store", small_store, "--routing-trace", sticky_file,
                 "--tokens", "40", "--fractions", "0.5", "--threads", "1",
                 "--batch", "4", "--batch-tokens", "8", "--batch-fraction", "0.75"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    for run in ("lru (all in RAM, warm)", "lru", "lfu", "ours+pin", "ours+markov"):
        assert f" {run} " in out
    # The warm 100% run reads nothing and never stalls.
    full = next(line for line in out.splitlines() if "all in RAM" in line)
    cells = [c.strip() for c in full.split("│")]
    assert cells[4:7] == ["0.0", "100.0%", "0.0"]
    assert "that run's measured read ms" in out and "step ms (forward time less stall" in out
    # Without prefetch or pins the engine's cache and the simulator's replay run the same
    # policy on the same accesses: nearly the same hits (the engine touches a step's hits
    # before it admits its misses, the replay in expert order).
    table = {r.split("│")[2].strip(): r.split("│") for r in out.splitlines() if r[:1] == "│"}
    for run in ("lru", "lfu", "ours"):
        engine, sim = (float(table[run][i].strip().rstrip("%")) for i in (5, 10))
        assert abs(engine - sim) <= 2.0
    assert "PyTorch ops' self times and mer's C dense kernels" in out
    assert "without the profiler" in out and "x its kernels" in out
    # Batching: the same 4 x 8 tokens alone and together, beside the trace's dedup bound.
    from mer.trace.stats import batch_dedup

    rows = [line.split("│") for line in out.splitlines() if line.startswith("│")]
    alone = next(r for r in rows if r[1].strip() == "one at a time")
    together = next(r for r in rows if r[1].strip() == "4 together")
    reads = [int(alone[4]), int(together[4])]
    assert min(reads) > 0
    assert float(together[5]) == pytest.approx(reads[0] / reads[1], abs=0.01)
    assert together[6].strip() == f"{batch_dedup(load_trace(sticky_file), 4):.2f}"


def test_bench_decode_repeats_interleave_rounds_and_pair_ratios_by_round(
    small_store, sticky_file, capsys
):
    from mer.cli import main

    code = main(["bench", "decode", "--store", small_store, "--routing-trace", sticky_file,
                 "--tokens", "16", "--fractions", "0.5", "--threads", "1", "--batch", "0",
                 "--prefetch", "--no-full", "--step-ms", "0.1", "--repeats", "3"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    rows = [r.split("│") for r in out.splitlines() if r.startswith("│")]
    names = [r[2].strip() for r in rows]
    assert names == ["lru", "lfu", "ours", "ours+pin"]  # one row per configuration
    assert rows[0][15].strip() == "1.00 (1.00–1.00)"  # lru over itself, every round
    assert "3 interleaved rounds" in out


def test_lru_ratios_pair_each_run_with_lru_of_its_own_round():
    from mer.bench.decode import Result, Row, lru_ratios

    def row(rnd, name, tok_s):
        return Row(rnd, 0.25, 4, Result(name, 10, 10 / tok_s, 0.0, 0, 0, 0, 0, 0), {})

    rows = [row(0, "lru", 1.0), row(0, "ours", 1.5), row(1, "ours", 4.0), row(1, "lru", 2.0)]
    assert lru_ratios(rows) == {(0.25, "lru"): [1.0, 1.0], (0.25, "ours"): [1.5, 2.0]}


def test_bench_decode_refuses_a_trace_of_another_shape(small_store, tmp_path, capsys):
    from mer.cli import main

    path = tmp_path / "other.npz"
    sticky_trace(n_seqs=4, experts=6).save(path)
    code = main(["bench", "decode", "--store", small_store, "--routing-trace", path])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "does not match" in err and str(path) in err


def _decode_tokens(model, routing, trace, seqs) -> list[int]:
    """Argmax tokens of decoding `seqs` one at a time with forced routing."""
    out = []
    for i in seqs:
        a, b = int(trace.seq_starts[i]), int(trace.seq_starts[i + 1])
        if model.prefetcher is not None:
            model.prefetcher.begin_sequence()
        kv, token = model.transformer.new_kv_cache(b - a), 1
        for row in range(a, b):
            routing.feed([row])
            token = int(model.transformer.forward(torch.tensor([token]), kv)[-1].argmax())
            out.append(token)
    return out


def test_live_markov_prefetch_is_used_and_changes_no_output(small_store):
    from mer.predict.live import live_predictor
    from mer.trace.format import split_trace

    trace = sticky_trace(n_seqs=16)
    train, held = split_trace(trace, 0.5)
    runs = {}
    for prefetch in ("off", "markov"):
        # 6 slots of 32 experts: most of each layer's experts are read from the store.
        model = mer.api.open(small_store, ram_budget=6 * 8192, prefetch=prefetch, dtype="float32")
        if model.prefetcher is not None:  # learned from the training part, as bench decode does
            model.prefetcher.predictor = live_predictor("markov", model.config, train)
            model.prefetcher.learners = [model.prefetcher.predictor]
            # Every rank guesses: with the default bar, a predictor this close to chance
            # would prefetch only on an idle device, and whether it does depends on load.
            model.prefetcher.min_precision = 0.0
        routing = TraceRouting.for_model(held, model.transformer)
        model.transformer.routing_override = routing
        runs[prefetch] = (_decode_tokens(model, routing, held, range(4)), model.cache.stats)
        model.close()
    (plain, off), (tokens, on) = runs["off"], runs["markov"]
    assert tokens == plain  # results never depend on prefetching
    assert off.prefetches == 0 and on.prefetches > 0
    assert on.prefetches_used > 0
    assert on.misses < off.misses  # used prefetches replaced demand misses


def test_the_engines_live_prefetch_guesses_only_from_ranks_that_pay_on_its_device(small_store):
    model = mer.api.open(small_store, ram_budget=6 * 8192, prefetch="markov", dtype="float32")
    try:
        ranks = model.prefetcher.ranks
        assert ranks.min_precision is None  # the bar follows the device's measured load
        assert ranks.bar(0.0) == 0.0 and ranks.bar(1.0) == 0.5
    finally:
        model.close()


def test_prefetch_options_on_the_command_line(small_store, tmp_path, capsys):
    from mer.cli import main

    args = ["generate", "--store", small_store, "--prompt", "ab", "--max-tokens", "6"]
    assert main([*args, "--prefetch", "markov", "--ram-budget", "48KiB"]) == 0
    assert "prefetch used" in capsys.readouterr().err
    assert main([*args, "--prefetch", "ensemble"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--speculator" in err


def test_bench_decode_says_lookahead_cannot_predict_forced_routing(
    small_store, sticky_file, capsys
):
    from mer.cli import main

    code = main(["bench", "decode", "--store", small_store, "--routing-trace", sticky_file,
                 "--prefetch", "lookahead"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "hidden states" in err


def test_a_prefetch_read_waits_while_a_demand_read_is_in_flight(small_store):
    """The read engine starts a prefetch only once no demand read is in flight, so a
    prefetch never takes bandwidth a demand read could use (real reads of the store)."""
    import threading

    from mer.io.direct import DirectReader, aligned_buffer
    from mer.io.engine import DEMAND, PREFETCH, ReadEngine
    from mer.store.reader import Store

    store = Store(small_store)
    gate, order = threading.Event(), []

    def read(reader, buf, offset):
        order.append(("start", offset))
        if offset == first.offset:
            assert gate.wait(10)
        reader.read_into(buf, offset)
        order.append(("end", offset))

    first, second = store.extent(1, 0), store.extent(1, 1)
    n = store.expert_format.nbytes
    _, buf = aligned_buffer(2 * n)
    mem = memoryview(buf.numpy())
    engine = ReadEngine(DirectReader(store.expert_path), threads=4, read=read)
    try:
        demand = engine.submit(mem[: first.length], first.offset, DEMAND)
        prefetch = engine.submit(mem[n : n + second.length], second.offset, PREFETCH)
        threading.Event().wait(0.2)  # three idle reader threads could take the prefetch now
        assert not prefetch.started
        gate.set()
        demand.wait()
        prefetch.wait()
    finally:
        engine.close()
    assert order == [("start", first.offset), ("end", first.offset),
                     ("start", second.offset), ("end", second.offset)]  # fmt: skip


def test_bench_decode_with_speculator_and_ensemble_prefetch(small_store, sticky_file, tmp_path,
                                                             capsys):  # fmt: skip
    from mer.cli import main
    from mer.predict.speculator import train_speculator
    from mer.trace.format import split_trace

    train, _ = split_trace(load_trace(sticky_file), 0.5)
    spec = tmp_path / "spec.pt"
    train_speculator([train], epochs=1, hidden=32, progress=False).save(spec)
    code = main(["bench", "decode", "--store", small_store, "--routing-trace", sticky_file,
                 "--tokens", "20", "--fractions", "0.5", "--threads", "1", "--batch", "0",
                 "--no-full", "--step-ms", "1", "--prefetch", "speculator", "ensemble",
                 "--speculator", spec])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    rows = {line.split("│")[2].strip(): line.split("│") for line in out.splitlines()
            if line.startswith("│")}  # fmt: skip
    for name in ("ours+speculator", "ours+pin+ensemble"):
        used, issued = map(int, rows[name][7].split()[0].split("/"))
        assert 0 <= used <= issued and issued > 0


def test_batching_reads_each_steps_union_once_and_matches_its_replay(small_store, sticky_file,
                                                                    capsys):  # fmt: skip
    """With no cache to speak of, decoding 4 sequences together reads each step's distinct
    experts once: the engine's cut in SSD bytes is the replay's of the same streams, near
    the dedup bound; with a cache, each pair is shown beside its replay and Belady's."""
    from mer.cli import main

    code = main(["bench", "decode", "--store", small_store, "--routing-trace", sticky_file,
                 "--fractions", "--threads", "1", "--no-full", "--step-ms", "1",
                 "--batch", "4", "--batch-tokens", "8", "--batch-fraction", "0.75"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    rows = [[c.strip() for c in line.split("│")] for line in out.splitlines()
            if line.startswith("│")]  # fmt: skip
    assert [r[8] for r in rows] == ["no cache (2)", "no cache (7)"] + ["24 (24)"] * 4
    assert [r[9] for r in rows if r[9]] == ["lru", "lru", "ours"]
    for alone, together in zip(rows[::2], rows[1::2], strict=True):
        cut, replay = float(together[5]), float(together[10])
        assert cut == pytest.approx(int(alone[4]) / int(together[4]), abs=0.01)
        assert cut == pytest.approx(replay, abs=0.05)  # the engine reads what the replay says
    alone, together = rows[0], rows[1]
    assert int(alone[4]) == 8 * 4 * 4 * 2  # no cache: every expert of every token is read
    assert float(together[7]) >= 0.9  # the share of the dedup bound batching reached


def test_live_prefetch_stops_guessing_from_ranks_that_guess_badly(small_store):
    """A predictor whose guesses are never chosen (frequencies of other experts) soon
    prefetches nothing: each rank's measured precision falls under one half."""
    from mer.predict.frequency import FrequencyPredictor

    n, length = 4, 12
    experts = np.zeros((n * length, 4, 2), np.int16)
    experts[..., 1] = 1  # every layer routes to experts 0 and 1
    meta = {"model": "fixed", "n_experts": 8, "top_k": 2, "moe_layers": 4}
    trace = Trace(experts, np.arange(n + 1, dtype=np.int64) * length,
                  np.zeros(n * length, np.int8), meta)  # fmt: skip
    wrong = Trace(experts + 6, trace.seq_starts, trace.phase, meta)  # experts 6 and 7
    issued = {}
    for floor in (0.0, 0.5):
        # 6 slots for 8 experts a token: every token reads, and guesses take slots.
        model = mer.api.open(small_store, ram_budget=6 * 8192, prefetch="markov")
        p = model.prefetcher
        p.predictor, p.learners, p.learns = FrequencyPredictor().fit(wrong), [], False
        p.min_precision, p.fixed = floor, 2
        routing = TraceRouting.for_model(trace, model.transformer)
        model.transformer.routing_override = routing
        tokens = _decode_tokens(model, routing, trace, range(n))
        issued[floor] = (model.cache.stats.prefetches, p.precision(), tokens)
        model.close()
    assert issued[0.0][0] > 20  # guessing blindly reads its guesses again and again
    assert issued[0.5][0] <= 2 * 2  # one layer's guesses before the first were scored
    assert (issued[0.5][1][:2] < 0.5).all()
    assert issued[0.0][2] == issued[0.5][2]  # and outputs never depend on prefetching


def test_prefetches_are_read_in_small_chunks_so_demand_reads_wait_less(small_store):
    """A demand read arriving while prefetches are read waits for their chunks under way:
    prefetches are cut finer than demand reads (real reads of the store)."""
    from mer.io.direct import DirectReader, aligned_buffer
    from mer.io.engine import DEMAND, PREFETCH, ReadEngine
    from mer.store.reader import Store

    store = Store(small_store)
    sizes: list[tuple[int, int]] = []

    def read(reader, buf, offset):
        sizes.append((offset, len(buf)))
        reader.read_into(buf, offset)

    x = store.extent(1, 2)
    _, buf = aligned_buffer(2 * x.length)
    mem = memoryview(buf.numpy())
    engine = ReadEngine(DirectReader(store.expert_path), threads=2, read=read,
                        chunk_bytes=1 << 20, prefetch_chunk_bytes=4096)  # fmt: skip
    try:
        engine.submit(mem[: x.length], x.offset, DEMAND).wait()
        demand = list(sizes)
        sizes.clear()
        engine.submit(mem[x.length : 2 * x.length], x.offset, PREFETCH).wait()
    finally:
        engine.close()
    assert demand == [(x.offset, x.length)]
    assert sorted(sizes) == [(x.offset + a, 4096) for a in range(0, x.length, 4096)]
    assert bytes(mem[: x.length]) == bytes(mem[x.length : 2 * x.length])  # the same bytes


def test_forced_routing_weighs_with_a_float32_router_in_a_bfloat16_model(tmp_path):
    """DeepSeek keeps its router in float32: a bf16 model's hidden state meets it in the
    router's dtype when forced routing weighs the trace's experts (bench decode on a
    DeepSeek-V2-Lite-shape store failed on the dtype mismatch)."""
    from mer.synth.checkpoint import hf_config
    from mer.synth.store import write_random_store

    store = write_random_store(tmp_path / "s", hf_config("tiny-deepseek-v2"), progress=False)
    model = mer.api.open(store, ram_budget="64MiB", prefetch=False, dtype="bfloat16")
    cfg = model.config
    assert model.transformer.w[f"layers.{cfg.moe_layers[0]}.router"].dtype == torch.float32
    trace = sticky_trace(layers=len(cfg.moe_layers), experts=cfg.num_local_experts,
                         k=cfg.num_experts_per_tok)  # fmt: skip
    routing = TraceRouting.for_model(trace, model.transformer)
    model.transformer.routing_override = routing
    seen = []
    model.transformer.routing_hooks.append(lambda i, h, ids, w: seen.append((ids, w)))
    decode_sequences(model.transformer, routing, [[0]], lambda group, n: None)
    model.close()
    assert routing.passes == 24
    ids, w = seen[0]
    assert torch.equal(
        ids[0].sort().values, torch.from_numpy(trace.experts[0, 0]).long().sort().values
    )
    assert w.dtype == torch.float32 and bool((w > 0).all()) and bool((w < 1).all())
