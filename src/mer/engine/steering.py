"""Per-sequence rules on top of sampling: a token constraint (a grammar's mask) and logprobs.

A `Steering` belongs to one sequence. Before a token is chosen its logits go through
`logits()` (tokens the constraint forbids become -inf); once a token is chosen from
them, `take()` advances the constraint past it and records its logprob when asked.
Plain decoding (`choose`), batched decoding (the runner) and speculative verification
all go through these two calls, so they choose among the same tokens: a drafted
token the constraint forbids has probability 0 in the verifier and is rejected.

Logprobs are those of the model's distribution after the constraint's mask and
before temperature, top-k or top-p (as vLLM reports them by default): the log-softmax
of the masked logits in float32. `top` holds the `n` most likely tokens, best first.

Drafts of speculative decoding are steered too: `draft()` moves the constraint past a
drafted token (its row masked by `logits()` first, nothing recorded) and `undraft()`
rolls it back before verification, so a draft proposes only tokens the constraint
allows and acceptance does not drop under a schema.

The engine knows nothing of grammars or text: a `Constraint` is anything with `mask`
(forbidden tokens to -inf, in place, on a float32 row), `advance` (a chosen token) and
`rollback` (undo the last n advances).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from mer.engine.sampling import SamplingError, SamplingParams, sample_next_token

MAX_TOP_LOGPROBS = 20  # OpenAI's bound


class Constraint(Protocol):
    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens not allowed next to -inf (float32 [V], in place)."""

    def advance(self, token: int) -> None:
        """`token` was chosen: move past it."""

    def rollback(self, n: int) -> None:
        """Undo the last `n` advances."""


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None: a prompt's first token, which nothing predicts
    top: tuple[tuple[int, float], ...] | None = ()  # (token, logprob), most likely first


@dataclass
class Steering:
    constraint: Constraint | None = None
    logprobs: int | None = None  # None: none recorded; n: the chosen token's and the top n
    recorded: list[TokenLogprob] = field(default_factory=list)
    drafted: int = 0  # draft tokens the constraint has moved past, undone by `undraft`

    def __post_init__(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")

    def logits(self, row: torch.Tensor) -> torch.Tensor:
        """The logits a token is chosen from: `row` itself, or a masked float32 copy."""
        if self.constraint is None:
            return row
        row = row.float().clone()
        self.constraint.mask(row)
        if row.max() == float("-inf"):  # one reduction, no [V] bool tensor
            raise SamplingError("the output constraint allows no token here")
        return row

    def take(self, row: torch.Tensor, token: int) -> None:
        """`token` was chosen from `row` (as `logits()` returned it)."""
        if self.logprobs is not None:
            self.recorded.append(token_logprob(row, token, self.logprobs))
        if self.constraint is not None:
            self.constraint.advance(token)

    def draft(self, token: int) -> None:
        """A draft proposed `token` (from `logits()`'s row): move the constraint past it."""
        if self.constraint is not None:
            self.constraint.advance(token)
            self.drafted += 1

    def undraft(self) -> None:
        """Back to where the constraint was before the draft's tokens."""
        if self.drafted:
            self.constraint.rollback(self.drafted)
            self.drafted = 0

    def drain(self) -> list[TokenLogprob]:
        """The logprobs recorded since the last drain, in order."""
        out, self.recorded = self.recorded, []
        return out


def choose(
    logits: torch.Tensor, params: SamplingParams, gen: torch.Generator, steer: Steering | None
) -> int:
    """`sample_next_token` under `steer`'s constraint, recorded by it."""
    if steer is None:
        return sample_next_token(logits, params, gen)
    row = steer.logits(logits)
    token = sample_next_token(row, params, gen)
    steer.take(row, token)
    return token


def token_logprob(row: torch.Tensor, token: int, n: int) -> TokenLogprob:
    """The logprob of `token` under softmax(row), and the `n` most likely tokens'."""
    logp = torch.log_softmax(row.float(), -1)
    top = ()
    if n:
        values, ids = torch.topk(logp, min(n, logp.numel()))
        top = tuple((int(i), float(v)) for i, v in zip(ids, values, strict=True))
    return TokenLogprob(token, float(logp[token]), top)
