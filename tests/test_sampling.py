"""sample_next_token is a pure function: check each filter and the seed."""

from __future__ import annotations

import pytest
import torch

from mer.engine.sampling import (
    GREEDY_BELOW,
    SamplingError,
    SamplingParams,
    probabilities,
    sample_next_token,
)
from mer.errors import ConfigError

LOGITS = torch.tensor([0.0, 3.0, 2.0, 1.0, -1.0])


def draws(params, n=400):
    gen = params.generator()
    return [sample_next_token(LOGITS, params, gen) for _ in range(n)]


def test_greedy_is_argmax():
    assert sample_next_token(LOGITS, SamplingParams(), torch.Generator()) == 1


def test_top_k_keeps_only_k_best():
    assert set(draws(SamplingParams(temperature=1.0, top_k=2, seed=0))) == {1, 2}


def test_top_p_keeps_smallest_prefix():
    # softmax(LOGITS): p(1)=0.64, p(2)=0.24 -> top_p 0.7 keeps tokens 1 and 2 only.
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.7, seed=0))) == {1, 2}
    assert draws(SamplingParams(temperature=1.0, top_p=0.5, seed=0)) == [1] * 400


def test_sampling_follows_the_distribution():
    got = torch.bincount(
        torch.tensor(draws(SamplingParams(temperature=1.0, seed=1), 4000)), minlength=5
    )
    want = torch.softmax(LOGITS, -1) * 4000
    assert torch.all((got - want).abs() < 5 * want.sqrt() + 5)


def test_seed_reproduces():
    p = SamplingParams(temperature=1.0, seed=123)
    assert draws(p) == draws(p)


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(max_tokens=-1)],
)
def test_bad_parameters(kw):
    with pytest.raises(ConfigError):
        SamplingParams(**kw)


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=2.5), "temperature"),
        (dict(temperature="0.5"), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_p=True), "top_p"),
        (dict(top_k=1.5), "top_k"),
        (dict(max_tokens=2.0), "max_tokens"),
        (dict(seed=2**64), "seed"),
        (dict(seed="7"), "seed"),
        (dict(stop_token_ids=(2, "eos")), "stop_token_ids"),
    ],
)
def test_one_rule_rejects_non_finite_out_of_range_and_mistyped_values(kw, param):
    with pytest.raises(ConfigError) as caught:
        SamplingParams(**kw)
    assert caught.value.param == param and param in str(caught.value)


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-6])
def test_a_tiny_temperature_is_greedy(temperature):
    p = SamplingParams(temperature=temperature, seed=0)
    assert p.temperature == 0
    assert draws(p, 20) == [1] * 20
    huge = torch.tensor([3e38, -3e38, 3.4e38, 0.0])  # max - min overflows float32
    assert sample_next_token(huge, p, p.generator()) == 2


def test_top_p_that_rounds_to_zero_keeps_the_top_token():
    for top_p in (1e-300, 5e-324, 1e-8):
        assert draws(SamplingParams(temperature=1.0, top_p=top_p, seed=0), 50) == [1] * 50


def test_extreme_logits_never_reach_multinomial_as_nan_or_inf():
    p = SamplingParams(temperature=GREEDY_BELOW, seed=0)  # the smallest sampling temperature
    cases = [
        torch.tensor([3.4e38, -3.4e38, 3.3e38]),
        torch.tensor([float("-inf"), 1.0, float("-inf")]),
        torch.tensor([1.0, float("inf"), 2.0]),
        torch.tensor([0.0, 3.0, 2.0], dtype=torch.bfloat16),
    ]
    for logits in cases:
        probs = probabilities(logits, p)
        assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-5
        assert sample_next_token(logits, p, p.generator()) == int(torch.argmax(logits))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_or_all_masked_logits_are_a_sampling_error(temperature):
    p = SamplingParams(temperature=temperature)
    with pytest.raises(SamplingError):
        sample_next_token(torch.tensor([0.0, float("nan"), 1.0]), p, p.generator())
    for where in (0, 7, 99):  # anywhere, beside +inf too, in float32 or bfloat16
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(100).to(dtype)
            logits[50], logits[where] = float("inf"), float("nan")
            with pytest.raises(SamplingError, match="NaN"):
                sample_next_token(logits, p, p.generator())
    if temperature:
        with pytest.raises(SamplingError, match="-inf"):
            sample_next_token(torch.full((3,), float("-inf")), p, p.generator())
