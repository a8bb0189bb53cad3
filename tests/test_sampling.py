"""sample_next_token is a pure function: check each filter and the seed."""

from __future__ import annotations

import pytest
import torch

from mer.engine.sampling import SamplingParams, sample_next_token
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
