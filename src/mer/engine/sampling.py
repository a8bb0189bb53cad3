"""Choosing the next token from logits: a pure function of logits, parameters and a generator.

`SamplingParams` holds the one rule for what a sampling parameter may be, used by the
CLI, the Python API and the server alike: finite numbers in fixed ranges, integers
where counts are meant. A temperature below `GREEDY_BELOW` is greedy (the value is
stored as 0), as in vLLM: at such a temperature the softmax puts all its mass on the
argmax anyway, and dividing by it overflows float32.

Sampling is numerically safe for every accepted parameter: it runs in float32 with
the maximum subtracted, top-p keeps at least the most likely token, and no NaN or inf
reaches `torch.multinomial`. Logits that are NaN (a broken model, not a bad request)
raise `SamplingError`, which fails that one request.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from mer.errors import ConfigError, MerError
from mer.models import rowops

GREEDY_BELOW = 1e-5  # temperatures below this sample the argmax
MAX_TEMPERATURE = 2.0  # OpenAI's bound; beyond it text is noise
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


class InvalidSamplingParam(ConfigError):
    """A sampling parameter out of its range or of the wrong type; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class SamplingError(MerError):
    """The model's logits cannot be sampled from (NaN): fails the request, not the server."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _integer("max_tokens", self.max_tokens, lo=0)
        _real("temperature", self.temperature)
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidSamplingParam(
                "temperature",
                f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {self.temperature}",
            )
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        _integer("top_k", self.top_k, lo=0)
        _real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise InvalidSamplingParam("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            _integer("seed", self.seed, lo=SEED_RANGE[0], hi=SEED_RANGE[1] - 1)
        for token in self.stop_token_ids:  # [-1] is how callers ask for no stop token
            _integer("stop_token_ids", token, lo=-(2**63))

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def sample_next_token(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """logits [V] -> token id: greedy at temperature 0, else top-k, then top-p, then sample."""
    if p.temperature == 0:
        return _argmax(logits)
    return int(torch.multinomial(probabilities(logits, p), 1, generator=gen))


def probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from: float32 [V], finite, summing to 1 (one-hot on
    the argmax at temperature 0)."""
    if p.temperature == 0:
        return torch.zeros(logits.numel()).index_fill_(0, torch.tensor(_argmax(logits)), 1.0)
    logits = logits.float()
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        # +inf is the limit of a softmax that puts all mass there: as greedy.
        return probabilities(logits, SamplingParams(temperature=0))
    top = logits.max()
    if top == float("-inf"):
        raise SamplingError("every logit is -inf: no token can be sampled")
    logits = (logits - top) / p.temperature  # <= 0, the max exactly 0: softmax cannot overflow
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if p.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, 0) - sorted_probs
        drop = before >= p.top_p  # keep the smallest prefix reaching top_p ...
        drop[0] = False  # ... and always the most likely token (top_p may round to 0 in float32)
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def _argmax(logits: torch.Tensor) -> int:
    """The greedy token. argmax takes a NaN for the largest value (the first NaN's index), so
    one reduction over the vocabulary finds the token and any NaN: a decode step's isnan and
    any over 150k logits cost as much as the argmax itself. A float32 vector takes the C
    reduction (`rowops.argmax`, ~10x PyTorch's there)."""
    token = rowops.argmax(logits)
    if token is None:
        token = int(torch.argmax(logits))
    if math.isnan(logits[token]):
        raise SamplingError("the model produced NaN logits")
    return token


def _real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidSamplingParam(name, f"{name} must be a number, got {value!r}")
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
        raise InvalidSamplingParam(name, f"{name} must be finite, got {value}")


def _integer(name: str, value, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidSamplingParam(name, f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise InvalidSamplingParam(name, f"{name} must be {bounds}, got {value}")
