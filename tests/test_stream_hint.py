"""The int4 kernels' prefetch hint: chosen on the first lone decode steps by timing them in
alternated rounds, kept per machine and model shape, forced by MER_STREAM_HINT, and never a
change to what the kernels compute."""

from __future__ import annotations

import json

import pytest
import torch

import mer
from mer.errors import ConfigError
from mer.quant import int4_paths, stream_hint
from mer.quant.expert import ExpertFormat
from mer.quant.stream_hint import PAIRS, ROUND, WARMUP, HintTrial

STEPS = WARMUP + 2 * PAIRS * ROUND  # what a trial takes to decide


@pytest.fixture
def clean(monkeypatch, tmp_path):
    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(stream_hint.ENV, raising=False)
    yield
    int4_paths.stream_non_temporal(True)


class _Clock:
    """perf_counter for a trial: a step under `t0` lasts `cost["t0"]` seconds, etc."""

    def __init__(self, cost):
        self.now, self.cost = 0.0, cost

    def run(self, trial, steps, reads=None):
        for i in range(steps):
            with trial.step():
                hint = "nta" if int4_paths._stream_nta else "t0"
                self.now += self.cost[hint](i) if callable(self.cost[hint]) else self.cost[hint]
                if reads is not None and i % 2:
                    reads[0] += 4096  # a read from the SSD during this step


def _trial(monkeypatch, cost, shape="shape", reads=None):
    clock = _Clock(cost)
    monkeypatch.setattr(stream_hint.time, "perf_counter", lambda: clock.now)
    return clock, HintTrial(shape, reads=(lambda: reads[0]) if reads is not None else None)


def test_the_faster_hint_is_measured_kept_and_read_back(clean, monkeypatch):
    clock, trial = _trial(monkeypatch, {"nta": 1.1, "t0": 1.0})
    assert (trial.hint, trial.source) == ("nta", "measuring")
    clock.run(trial, STEPS - 1)
    assert not trial.done and len(trial.rounds) == 2 * PAIRS - 1
    # the hints took turns by rounds: AB, BA, AB, ...
    assert [h for h, _ in trial.rounds[:4]] == ["nta", "t0", "t0", "nta"]
    clock.run(trial, 1)
    assert (trial.hint, trial.source) == ("t0", "measured") and trial.describe() == "T0 (measured)"
    assert not int4_paths._stream_nta
    saved = json.loads(trial.path.read_text())
    assert saved["hint"] == "t0" and len(saved["step_ms"]) == PAIRS
    # A later process on this machine reads it and times nothing.
    int4_paths.stream_non_temporal(True)
    again = HintTrial("shape")
    assert (again.hint, again.source) == ("t0", "saved") and not int4_paths._stream_nta
    clock.run(again, 3 * STEPS)
    assert again.rounds == []
    # Another model shape has its own choice.
    assert HintTrial("other shape").source == "measuring"


def test_nta_wins_as_clearly_and_a_close_call_saves_nothing(clean, monkeypatch):
    clock, trial = _trial(monkeypatch, {"nta": 1.0, "t0": 1.2})
    clock.run(trial, STEPS)
    assert (trial.hint, trial.source) == ("nta", "measured") and int4_paths._stream_nta

    # Each hint ahead in half the pairs: undecided, NTA kept for the process, no file.
    def t0(i):  # ahead in the even pairs of rounds, behind in the odd ones
        return 0.9 if (i - WARMUP) // (2 * ROUND) % 2 == 0 else 1.1

    clock, trial = _trial(monkeypatch, {"nta": 1.0, "t0": t0}, shape="close")
    clock.run(trial, STEPS)
    assert (trial.hint, trial.source) == ("nta", "undecided") and int4_paths._stream_nta
    assert not trial.path.exists()
    assert HintTrial("close").source == "measuring"


def test_steps_that_read_from_the_ssd_are_not_timed(clean, monkeypatch):
    reads = [0]
    clock, trial = _trial(monkeypatch, {"nta": 1.1, "t0": 1.0}, reads=reads)
    clock.run(trial, STEPS, reads)
    assert not trial.done  # only every other step counted
    assert len(trial.rounds) == (STEPS - WARMUP) // 2 // ROUND
    clock.run(trial, STEPS, reads)
    assert trial.hint == "t0"


def test_two_models_in_one_process_each_pass_under_its_own_hint(clean):
    """A target and its draft model, say, chosen apart: each pass sets its model's hint."""
    stream_hint._save(stream_hint.cache_file("target"), "t0", [])
    stream_hint._save(stream_hint.cache_file("draft"), "nta", [])
    target, draft = HintTrial("target"), HintTrial("draft")
    assert (target.source, draft.source) == ("saved", "saved")
    for trial, nta in ((target, False), (draft, True), (target, False), (draft, True)):
        for timed in (True, False):
            with trial.step(timed=timed):
                assert int4_paths.streams_non_temporal() is nta


def test_a_forced_hint_is_taken_and_a_bad_one_named(clean, monkeypatch):
    monkeypatch.setenv(stream_hint.ENV, "t0")
    trial = HintTrial("shape")
    assert (trial.hint, trial.source, trial.done) == ("t0", stream_hint.ENV, True)
    assert not int4_paths._stream_nta
    monkeypatch.setenv(stream_hint.ENV, "t1")
    with pytest.raises(ValueError, match="MER_STREAM_HINT='t1': choose from nta, t0"):
        HintTrial("shape")


@pytest.mark.parametrize("scheme", ["int4", "int4-sym"])
def test_both_hints_compute_the_same_bits(scheme, clean):
    gen = torch.Generator().manual_seed(3)
    w1, w3 = (torch.randn(256, 128, generator=gen) / 12 for _ in range(2))
    ef = ExpertFormat.for_machine(scheme, 128, 256, 32)
    e = ef.view(ef.encode(w1, torch.randn(128, 256, generator=gen) / 16, w3))
    x = torch.randn(3, 128, generator=gen).bfloat16()
    paths = [p for p in int4_paths.eligible(e) if p.startswith("c-")]
    if not paths:
        pytest.skip("no C kernel here: no hint to set")
    outs = {}
    for nta in (True, False):
        int4_paths.stream_non_temporal(nta)
        outs[nta] = [int4_paths.RUNNERS[p](e, x[:t]) for p in paths for t in (1, 3)]
        outs[nta].append(int4_paths.c_linear(e.gate_up, x[:1].float()))
    for a, b in zip(outs[True], outs[False], strict=True):
        assert torch.equal(a, b)


def test_a_model_times_its_lone_decode_steps_and_gives_the_same_tokens(clean, store_factory):
    store = store_factory("int4")
    prompt, n = [1, 17, 93, 5], 48
    m = mer.open(store, ram_budget="64MiB", prefetch=False)
    trial = m.transformer.hint_trial
    assert trial is not None and trial.source == "measuring"
    tokens = list(m.tokens(prompt, max_tokens=n, temperature=0.0, stop_token_ids=[10**6]))
    # the lone steps that read no expert from the SSD (all of them once the few experts of
    # this model are in RAM), in rounds whose hints take turns
    assert len(tokens) == n and len(trial.rounds) >= 4
    assert [h for h, _ in trial.rounds[:4]] == ["nta", "t0", "t0", "nta"]
    pinned = pytest.MonkeyPatch()
    pinned.setenv(stream_hint.ENV, "nta")
    try:
        plain = mer.open(store, ram_budget="64MiB", prefetch=False)
        assert plain.transformer.hint_trial.source == stream_hint.ENV
        again = plain.tokens(prompt, max_tokens=n, temperature=0.0, stop_token_ids=[10**6])
        assert list(again) == tokens
        pinned.setenv(stream_hint.ENV, "sometimes")
        with pytest.raises(ConfigError, match="MER_STREAM_HINT='sometimes'"):
            mer.open(store, ram_budget="64MiB")
    finally:
        pinned.undo()
