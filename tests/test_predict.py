"""Expert predictors: the interface, what each learns, lookahead against the model's routers,
and the predictor and cache benchmarks on synthetic and real traces."""

from __future__ import annotations

import numpy as np
import pytest
from tests.test_trace import SHARED_TRACE

import mer
from mer.cli import main
from mer.data import TRAINED_MODEL
from mer.errors import ConfigError
from mer.predict.ensemble import EnsemblePredictor
from mer.predict.evaluate import NEXT_TOKEN, chance, evaluate
from mer.predict.frequency import FrequencyPredictor
from mer.predict.lookahead import LookaheadPredictor, softmax
from mer.predict.markov import MarkovPredictor
from mer.predict.speculator import load_speculator, train_speculator
from mer.store.convert import convert
from mer.trace.format import Trace, load_trace, split_trace


def patterned_trace(tokens=600, sequences=6, seed=0, noise=0.0) -> Trace:
    """4 layers x 8 experts, top-2: one expert A from 0..3, one B from 4..7. A moves +1
    each layer (first order: A_l = A_(l-1) + 1); B moves +1 every second layer (second
    order: B_l = B_(l-2) + 1, where layer -1 is the previous token's last). Layer 0's A
    and B, and a sequence's first B_(-1), are random; with `noise`, that share of the
    choices is random too."""
    rng = np.random.default_rng(seed)
    ex = np.zeros((tokens, 4, 2), np.int16)
    starts = np.linspace(0, tokens, sequences + 1).astype(np.int64)
    first = set(starts[:-1].tolist())
    for t in range(tokens):
        a = [int(rng.integers(4))]
        b = [int(rng.integers(4) if t in first else ex[t - 1, 3, 1] - 4), int(rng.integers(4))]
        for _ in range(3):
            a.append((a[-1] + 1) % 4)
            b.append((b[-2] + 1) % 4)
        for m in range(4):
            pick = (a[m], b[m + 1])
            if rng.random() < noise:
                pick = (int(rng.integers(4)), int(rng.integers(4)))
                a[m], b[m + 1] = pick
            ex[t, m] = (pick[0], 4 + pick[1])
    return Trace(ex, starts, np.zeros(tokens, np.int8), {"n_experts": 8, "model": "pattern"})


def test_markov_learns_a_deterministic_second_order_pattern():
    train, test = split_trace(patterned_trace(), 0.5)
    markov = MarkovPredictor().fit(train)
    freq = FrequencyPredictor().fit(train)
    for d in (1, 2, 3):
        # Only the first token of each sequence has a B the chain cannot know.
        assert evaluate(markov, test, d).recall > 0.98, d
        assert evaluate(freq, test, d).recall < 0.35
    assert chance(8, 2).recall == 0.25


def test_markov_learns_online_what_it_learns_at_once():
    """Counts only add up: sequences learned one batch after another give the same chain."""
    trace = patterned_trace(noise=0.3)
    at_once = MarkovPredictor().fit(trace)
    online = MarkovPredictor().fit(trace.select([0, 1]))
    for i in range(2, trace.n_sequences):
        online.learn(trace.select([i]))
    for d in (1, 3):
        assert np.allclose(online.scores(trace, 2, d), at_once.scores(trace, 2, d))


def test_one_positions_scores_are_those_of_the_whole_trace():
    """The live prefetcher's decode path (`next_scores`, one position) scores as `scores`
    does on the trace of the sequence so far: at a sequence's first token (no previous
    token before layer 0) and after one, at every layer; Markov's own sums, and an
    ensemble's through its members."""
    train, test = split_trace(patterned_trace(noise=0.3), 0.5)
    markov = MarkovPredictor(max_distance=1).fit(train)
    members = [markov, FrequencyPredictor().fit(train)]
    for predictor in (markov, EnsemblePredictor(members, [2.0, 1.0])):
        for tokens in (1, 2):
            context = test.experts[5 : 5 + tokens]
            whole = Trace(context, np.array([0, tokens]), np.zeros(tokens, np.int8), test.meta)
            for layer in range(test.n_layers):
                one = predictor.next_scores(context, layer, test.n_experts)
                assert one.dtype == np.float32 and one.shape == (test.n_experts,)
                assert np.allclose(one, predictor.scores(whole, layer, 1)[-1], atol=1e-6)


def test_predictors_never_see_the_target_or_the_future():
    """Scores at (t, layer) stay the same whatever is routed after that position."""
    trace = patterned_trace(noise=0.3)
    spec = train_speculator([trace], epochs=1, hidden=16, progress=False)
    markov = MarkovPredictor().fit(trace)
    predictors = [FrequencyPredictor().fit(trace), markov, spec, EnsemblePredictor([markov, spec])]
    t, layer = 200, 1
    changed = Trace(trace.experts.copy(), trace.seq_starts, trace.phase, trace.meta)
    changed.experts[t, layer + 1 :] = (changed.experts[t, layer + 1 :] + 1) % 8
    changed.experts[t + 1 :] = changed.experts[::-1][: trace.n_tokens - t - 1]
    for p in predictors:
        for d in (1, 2, 3):
            a, b = p.scores(trace, layer, d), p.scores(changed, layer, d)
            assert a.shape == (trace.n_tokens, 8) and a.dtype == np.float32 and a.min() >= 0
            assert np.array_equal(a[: t + 1], b[: t + 1]), (p.name, d)


def test_speculator_trains_beats_chance_and_round_trips(tmp_path):
    train, test = split_trace(patterned_trace(noise=0.1, seed=1), 0.5)
    kw = dict(epochs=8, hidden=32, batch=64, lr=1e-2, seed=3, progress=False)
    spec, again = train_speculator([train], **kw), train_speculator([train], **kw)
    got = evaluate(spec, test, 1).recall
    # Chance is 0.25; the Markov chain gets 0.86 on this noisy pattern.
    assert got > 0.75 > chance(8, 2).recall
    assert evaluate(again, test, 1).recall == got  # seeded: the same network
    spec.save(tmp_path / "s.pt")
    back = load_speculator(tmp_path / "s.pt")
    assert np.array_equal(back.scores(test, 2, 1), spec.scores(test, 2, 1))
    with pytest.raises(ConfigError, match="learned 4 MoE layers x 8 experts"):
        back.scores(Trace(np.zeros((3, 5, 2), np.int16), np.array([0, 3]),
                          np.zeros(3, np.int8), {"n_experts": 8}), 0, 1)  # fmt: skip
    with pytest.raises(ConfigError, match="predicts 1..3 layers ahead, not 4"):
        back.scores(test, 0, 4)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="junk.pt: not a speculator file"):
        load_speculator(tmp_path / "junk.pt")
    with pytest.raises(ConfigError, match="no such speculator file"):
        load_speculator(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def trained_bf16(tmp_path_factory):
    return convert(TRAINED_MODEL, tmp_path_factory.mktemp("trained") / "bf16", "bf16",
                   progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def hidden_trace(trained_bf16):
    """Three prompts through the trained model with hidden states recorded, and the experts
    its own lookahead prefetched: [(layer, expert ids)] per MoE call."""
    model = mer.open(trained_bf16, ram_budget="64MiB", dtype="float32")
    recorder = model.record_trace()
    recorder.watch_hidden()
    prefetched, routing = [], [None]
    # First, so the layer being routed is known when the prefetcher (a later hook) guesses.
    model.transformer.routing_hooks.insert(
        0, lambda layer, h, ids, w: routing.__setitem__(0, layer)
    )
    real_prefetch = model.cache.prefetch

    def prefetch(layer, experts):
        if layer != routing[0]:  # a guess for a layer ahead, not this layer's missing experts
            prefetched.append((layer, sorted(experts)))
        return real_prefetch(layer, experts)

    model.cache.prefetch = prefetch
    prompts = ["def add(a, b):\n    return", "import os\n\nclass Path:\n", "for i in range("]
    for p in prompts:
        model.generate(p, max_tokens=6)
    model.close()
    return recorder.trace(), prefetched


def test_lookahead_is_the_next_routers_on_this_hidden_state(trained_bf16, hidden_trace):
    trace, _ = hidden_trace
    assert trace.hidden.dtype == np.float16 and trace.hidden.shape[1:] == (4, 256)
    look = LookaheadPredictor.from_store(trained_bf16).fit(trace)
    routers = look.routers  # [4, 8, 256]
    h = trace.hidden.astype(np.float32)
    for layer in range(3):
        # The identity: lookahead at layer l for l + 1 is router l + 1 applied to the
        # hidden state at l.
        want = softmax(h[:, layer] @ routers[layer + 1].T)
        assert np.allclose(look.scores(trace, layer, 1), want, rtol=1e-6, atol=1e-7)
    # Each layer's own router on its recorded hidden state gives the recorded routing
    # (up to float16 rounding of near ties).
    for layer in range(4):
        top = np.sort(np.argsort(-(h[:, layer] @ routers[layer].T), 1)[:, :2], 1)
        same = (top == np.sort(trace.experts[:, layer], 1)).all(1).mean()
        assert same > 0.97, (layer, same)
    # Past the last layer there is no hidden state of the next token: frequency.
    freq = FrequencyPredictor().fit(trace)
    assert np.array_equal(look.scores(trace, 3, 1), freq.scores(trace, 3, 1))


def test_lookahead_guesses_what_the_model_prefetched(trained_bf16, hidden_trace):
    """At layer l the model prefetches the top-k of router l + 1 applied to its hidden state,
    united over the pass's tokens: the lookahead predictor's top-k on the recorded trace."""
    trace, prefetched = hidden_trace
    look = LookaheadPredictor.from_store(trained_bf16)
    top = {m: np.argsort(-look.scores(trace, m, 1), 1)[:, :2] for m in range(3)}
    passes = []  # token ranges of the forward passes: a prompt, then one per decoded token
    for a, b in trace.sequences():
        prompt = a + int((trace.phase[a:b] == 0).sum())
        passes += [(a, prompt)] + [(t, t + 1) for t in range(prompt, b)]
    expected = [(m + 1, sorted(np.unique(top[m][a:b]).tolist())) for a, b in passes
                for m in range(3)]  # fmt: skip
    assert len(prefetched) == len(expected) == 3 * 6 * 3
    agree = np.mean([got == want for got, want in zip(prefetched, expected, strict=True)])
    assert agree > 0.95  # float16 hidden states may turn a near tie


def test_lookahead_needs_hidden_states_and_its_own_model(trained_bf16):
    look = LookaheadPredictor.from_store(trained_bf16)
    trace = patterned_trace()
    with pytest.raises(ConfigError, match="no hidden states.*--trace-hidden"):
        look.scores(trace, 0, 1)
    trace.hidden = np.zeros((trace.n_tokens, 4, 64), np.float16)
    with pytest.raises(ConfigError, match="hidden 64.*was not recorded from"):
        look.scores(trace, 0, 1)


def test_hidden_states_survive_save_load_and_selection(hidden_trace, tmp_path):
    trace, _ = hidden_trace
    trace.save(tmp_path / "h.npz")
    back = load_trace(tmp_path / "h.npz")
    assert np.array_equal(back.hidden, trace.hidden)
    second = back.select([1])
    a, b = trace.seq_starts[1], trace.seq_starts[2]
    assert np.array_equal(second.hidden, trace.hidden[a:b])
    assert second.seq_starts.tolist() == [0, b - a]


def run_cli(capsys, *args) -> str:
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_bench_predict_on_a_synthetic_trace(tmp_path, capsys):
    patterned_trace(noise=0.1).save(tmp_path / "t.npz")
    run_cli(capsys, "train-speculator", "--trace", tmp_path / "t.npz", "--out",
            tmp_path / "s.pt", "--epochs", "2", "--hidden", "16", "--batch", "64")  # fmt: skip
    out = run_cli(capsys, "bench", "predict", "--trace", tmp_path / "t.npz",
                  "--speculator", tmp_path / "s.pt")  # fmt: skip
    for needle in ("1 layer", "2 layers", "3 layers", "next token", "random", "frequency",
                   "markov", "speculator", "ensemble", "recall@2"):  # fmt: skip
        assert needle in out
    assert "warning" not in out  # trained on the same split: nothing held out was seen
    # Trained on everything, it has seen the held-out sequences: the bench says so.
    run_cli(capsys, "train-speculator", "--trace", tmp_path / "t.npz", "--out",
            tmp_path / "all.pt", "--epochs", "1", "--hidden", "8", "--held-out", "0")  # fmt: skip
    out = run_cli(capsys, "bench", "predict", "--trace", tmp_path / "t.npz",
                  "--speculator", tmp_path / "all.pt")  # fmt: skip
    assert "warning" in out and "not held-out figures" in out


def test_bench_predict_with_lookahead(trained_bf16, hidden_trace, tmp_path, capsys):
    trace, _ = hidden_trace
    trace.save(tmp_path / "h.npz")
    out = run_cli(capsys, "bench", "predict", "--trace", tmp_path / "h.npz",
                  "--store", trained_bf16)  # fmt: skip
    assert "lookahead" in out and "ensemble" in out


def first_recall(out: str, name: str) -> float:
    """recall@k of a predictor's first row (one layer ahead) in the bench predict table."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 3 and cells[2] == name:
            return float(cells[3].rstrip("%"))
    raise AssertionError(f"no row for {name}")


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="shared traces not present")
def test_bench_predict_on_the_real_trace(capsys):
    out = run_cli(capsys, "bench", "predict", "--trace", SHARED_TRACE, "--max-tokens", "300",
                  "--train-tokens", "1500")  # fmt: skip
    assert first_recall(out, "markov") > 2 * first_recall(out, "frequency")
    assert first_recall(out, "frequency") > first_recall(out, "random") == 9.4


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="shared traces not present")
def test_bench_cache_on_the_real_trace(capsys):
    out = run_cli(capsys, "bench", "cache", "--trace", SHARED_TRACE, "--max-tokens", "200",
                  "--train-tokens", "1000", "--mode", "token", "--fractions", "0.25",
                  "--pin-share", "0.1", "--prefetch", "markov")  # fmt: skip
    assert "ours+pin+pf" in out and "41 at 416 slots by token" in out


def test_bench_cache_with_pins_and_prefetch(tmp_path, capsys):
    patterned_trace(noise=0.2).save(tmp_path / "t.npz")
    out = run_cli(capsys, "bench", "cache", "--trace", tmp_path / "t.npz", "--slots", "12",
                  "--pin-share", "0.25", "--prefetch", "markov", "--read-steps", "2")  # fmt: skip
    for name in ("lru+pin", "ours+pin", "lru+pf", "ours+pf", "ours+pin+pf", "belady"):
        assert f" {name} " in out, name
    assert "replay by prefill" in out and "3 at 12 slots by token" in out


def test_bench_cache_timed_on_a_device(tmp_path, capsys):
    patterned_trace(noise=0.2).save(tmp_path / "t.npz")
    out = run_cli(capsys, "bench", "cache", "--trace", tmp_path / "t.npz", "--slots", "12",
                  "--prefetch", "markov", "--device-gbps", "2", "--step-ms", "3",
                  "--expert-bytes", "4000000")  # fmt: skip
    token = out[: out.index("replay by prefill")]
    assert "stall ms/tok" in token and "tok/s" in token
    assert "stall ms/tok" not in out[out.index("replay by prefill") :].split("misses:")[0]
    # 2 ms per read, 3 ms per step: a read fits in one step, so guesses go 1 layer ahead.
    assert "(2.00 ms per expert)" in out and "1 MoE layer(s) ahead" in out
    rows = {r.split("│")[2].strip(): r.split("│") for r in token.splitlines() if "│" in r}
    # Without prefetching every miss stalls for one read: 2 ms.
    misses, stall = int(rows["belady"][3]), float(rows["belady"][-4])
    tokens = int(out.split("replaying ")[1].split(" held-out")[0])
    assert stall == pytest.approx(2 * misses / tokens, abs=0.06)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prefetch", "speculator"], "needs --speculator"),
        (["--prefetch", "lookahead"], "needs --store"),
        (["--prefetch", "markov", "--read-steps", "4"], "--read-steps must be 1..3"),
        (["--device-gbps", "2"], "--device-gbps and --step-ms go together"),
        (["--device-gbps", "0", "--step-ms", "1"], "--device-gbps must be positive"),
    ],
)
def test_bench_cache_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    patterned_trace().save(tmp_path / "t.npz")
    assert main(["bench", "cache", "--trace", str(tmp_path / "t.npz"), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_evaluate_counts_the_next_token_from_the_last_layer():
    trace = patterned_trace(tokens=60, sequences=2)
    s = evaluate(FrequencyPredictor().fit(trace), trace, NEXT_TOKEN)
    assert s.positions == 60 - 2  # every token but each sequence's last


def test_generate_records_hidden_states(store_factory, tmp_path):
    from tests.test_cli import mer as run_mer

    run_mer("generate", "--store", store_factory("int4"), "--prompt", "hello there",
            "--max-tokens", "3", "--trace", tmp_path / "t.npz", "--trace-hidden")  # fmt: skip
    trace = load_trace(tmp_path / "t.npz")
    assert trace.hidden.shape == (trace.n_tokens, 2, 64) and trace.hidden.dtype == np.float16
    assert np.abs(trace.hidden.astype(np.float32)).sum(-1).min() > 0  # every row recorded
    run_mer("generate", "--store", store_factory("int4"), "--prompt", "hi", "--max-tokens", "2",
            "--trace", tmp_path / "plain.npz")  # fmt: skip
    assert load_trace(tmp_path / "plain.npz").hidden is None


def test_a_model_whose_cache_holds_every_expert_stops_guessing(trained_bf16, monkeypatch):
    """Lookahead prefetch runs the next layer's router at every layer; once every expert is
    read or being read there is nothing left to prefetch, and the model routes each layer
    once, with the tokens it gave while guessing."""
    model = mer.open(trained_bf16, ram_budget="256MiB")
    try:
        fam, calls = model.transformer.family, []
        real = fam.route
        monkeypatch.setattr(fam, "route", lambda *a: calls.append(a[1]) or real(*a))
        want = model.generate("def add(a, b):\n", max_tokens=4, temperature=0).token_ids
        moe = len(model.config.moe_layers)
        assert len(calls) > 4 * moe  # guessing: the next router at every layer but the last
        for layer in model.config.moe_layers:
            model.cache.fetch(layer, range(model.config.num_local_experts))
        assert model.cache.holds_every_expert()
        calls.clear()
        assert model.generate("def add(a, b):\n", max_tokens=4, temperature=0).token_ids == want
        assert len(calls) == 4 * moe  # a prompt pass and three decode steps, each layer once
    finally:
        model.close()
