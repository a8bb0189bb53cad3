"""Speculative decoding: a cheap draft proposes k tokens, the target checks them in one pass.

When decoding waits on the SSD, one verification forward over k+1 positions
acquires the union of their experts once per layer, where k plain decoding
steps would acquire each step's experts separately. Two drafts:

- `ModelDrafter`: any smaller model with the same tokenizer, with its own KV cache.
- `SelfDrafter`: the target itself, routed only to experts already in RAM, so
  drafting reads nothing from the SSD. It writes its (approximate) keys and
  values into the target's own KV cache, and the verification pass overwrites
  them with exact ones.

Acceptance is the standard rejection rule (Leviathan et al., 2023; Chen et al.,
2023): draft token x is kept with probability min(1, p(x)/q(x)); at the first
rejection a token is drawn from max(0, p - q), renormalised; if all k are kept
one more is drawn from p. Sampled output therefore has exactly the target's
distribution, and greedy output is the target's argmax at every position.
`k` adapts to the acceptance rate, and speculation turns itself off while a
speculative token costs more time than a plain one (e.g. when every expert is
already cached), probing again now and then.

`Speculation` is what a caller asks for (the draft, k, adaptive or not), checked
once; `SpecSession` is one sequence's speculation (its drafter, its draft length,
the `SpecStats` it records into), used alike by `generate_speculative` and by the
scheduler for a sequence that runs alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from mer.engine.generate import GenerationStats, check_prompt
from mer.engine.sampling import SamplingParams, probabilities
from mer.engine.steering import Steering, choose
from mer.errors import BudgetError, ConfigError
from mer.models.kv_cache import KVCache
from mer.models.transformer import MoETransformer


@dataclass
class SpecStats:
    rounds: int = 0  # verification passes
    drafted: int = 0
    accepted: int = 0  # draft tokens kept
    emitted: int = 0  # tokens produced by speculative rounds (accepted + one per round)
    plain_tokens: int = 0  # tokens decoded without speculation (probes, or switched off)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens emitted per verification pass (accepted drafts plus the pass's own)."""
        return self.emitted / self.rounds if self.rounds else 0.0

    def record_round(self, drafted: int, emitted: int, draft_s: float, verify_s: float) -> None:
        """One verification pass: `drafted` tokens proposed, `emitted` tokens out of it."""
        self.rounds += 1
        self.drafted += drafted
        self.accepted += emitted - 1
        self.emitted += emitted
        self.draft_seconds += draft_s
        self.verify_seconds += verify_s


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding as asked for: `draft` is "self" (the target routed to the
    experts already in RAM) or a smaller model with the target's vocabulary; `k` tokens
    are drafted per pass, adapted to the acceptance rate (up to `k_max`) when `adaptive`."""

    draft: Literal["self"] | MoETransformer = "self"
    k: int = 4
    adaptive: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"the draft length must be at least 1, got {self.k}")
        if not (self.draft == "self" or isinstance(self.draft, MoETransformer)):
            raise ConfigError(f"draft must be 'self' or a model, got {self.draft!r}")

    @property
    def k_max(self) -> int:
        return max(self.k, 8) if self.adaptive else self.k

    def capacity(self, prompt: int, max_tokens: int, context: int) -> int:
        """KV room a sequence needs: its prompt, its tokens, and a whole draft past them."""
        return min(prompt + max_tokens + self.k_max + 1, context)

    def session(self, target: MoETransformer, capacity: int, stats: SpecStats) -> SpecSession:
        """Speculation for one sequence of at most `capacity` tokens, recorded in `stats`."""
        return SpecSession(self, target, capacity, stats)


class SpecSession:
    """One sequence's speculative decoding: its drafter (started on the first round), its
    draft length, and the stats it records every round and plain step into."""

    def __init__(
        self, spec: Speculation, target: MoETransformer, capacity: int, stats: SpecStats
    ) -> None:
        self.target, self.capacity, self.stats, self.k = target, capacity, stats, spec.k
        self.drafter = SelfDrafter(target) if spec.draft == "self" else ModelDrafter(spec.draft)
        self.control = AdaptiveK(spec.k, spec.k_max) if spec.adaptive else None
        self._started = False

    def draft_length(self, room: int) -> int:
        """Tokens to draft next, at most `room`; 0 means decode this token plainly."""
        if self.control is not None and not self.control.speculate():
            return 0
        return max(0, min(self.control.k if self.control else self.k, room))

    def round(
        self,
        kv,
        context: list[int],
        pending: int,
        k: int,
        params: SamplingParams,
        gen: torch.Generator,
        steer: Steering | None = None,
    ) -> list[int]:
        """`speculative_round`, recorded: the tokens to emit. `kv` (a KVCache or paged
        sequence holding `context`) must have room for k+1 more."""
        if not self._started:
            self.drafter.start(self.capacity)
            self._started = True
        tokens, drafted, draft_s, verify_s = speculative_round(
            self.target, self.drafter, kv, context, pending, k, params, gen, steer
        )
        self.stats.record_round(drafted, len(tokens), draft_s, verify_s)
        if self.control is not None:
            self.control.after_round(drafted, len(tokens), draft_s + verify_s)
        return tokens

    def plain(self, seconds: float) -> None:
        """A token decoded without speculation in `seconds`."""
        self.stats.plain_tokens += 1
        if self.control is not None:
            self.control.after_plain(seconds)


class SelfDrafter:
    """The target, routed to resident experts only, drafting into the target's KV cache
    (the verification pass rolls it back and writes the exact keys and values)."""

    def __init__(self, target: MoETransformer) -> None:
        self.target = target

    def start(self, capacity: int) -> None:
        """Nothing to set up: the target's own KV cache is used."""

    def propose(self, kv, pending: int, k: int, params: SamplingParams, gen, steer=None):
        """At most k draft tokens after `pending` (not yet in the target's KV cache `kv`,
        which must have room for k more), and their distributions (None when greedy);
        under `steer` drawn from its masked rows, the constraint moved past each."""
        tokens, dists = [], []
        tok = pending
        for _ in range(k):
            logits = self.target.forward(torch.tensor([tok]), kv, draft=True)[-1]
            tok, dist = _draw(logits, params, gen, steer)
            tokens.append(tok)
            dists.append(dist)
            if _draft_ends(tok, params, steer):
                break
            if steer is not None:
                steer.draft(tok)
        return tokens, dists

    def commit(self, context: list[int]) -> None:
        """The target now holds `context`; nothing of ours to keep in step."""


class ModelDrafter:
    """A smaller model with the same vocabulary, keeping its own KV cache in step."""

    def __init__(self, draft: MoETransformer) -> None:
        self.draft = draft

    def start(self, capacity: int) -> None:
        """Draft for a sequence of at most `capacity` tokens."""
        self.kv = self.draft.new_kv_cache(capacity)
        self.seen: list[int] = []  # the tokens whose keys and values our cache holds
        self.context: list[int] = []

    def propose(self, kv, pending: int, k: int, params: SamplingParams, gen, steer=None):
        feed = self.context[len(self.seen) :] + [pending]
        tokens, dists = [], []
        for _ in range(k):
            logits = self.draft.forward(torch.tensor(feed), self.kv)[-1]
            self.seen += feed
            tok, dist = _draw(logits, params, gen, steer)
            tokens.append(tok)
            dists.append(dist)
            if _draft_ends(tok, params, steer):
                break
            if steer is not None:
                steer.draft(tok)
            feed = [tok]
        return tokens, dists

    def commit(self, context: list[int]) -> None:
        """The target now holds `context`: forget what we drafted past where it agrees."""
        keep = 0
        for a, b in zip(self.seen, context, strict=False):
            if a != b:
                break
            keep += 1
        self.kv.truncate(keep)
        del self.seen[keep:]
        self.context = context


def _draw(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator, steer=None):
    """A draft token and the distribution it came from (None when greedy); under a
    constraint, from its masked row."""
    if steer is not None and steer.constraint is not None:
        logits = steer.logits(logits)
    if params.temperature == 0:
        return int(torch.argmax(logits)), None
    dist = probabilities(logits, params)
    dist = dist / dist.sum()
    return int(torch.multinomial(dist, 1, generator=gen)), dist


def _draft_ends(token: int, params: SamplingParams, steer) -> bool:
    """A constrained draft stops at a stop token, before the constraint moves past it: the
    grammar allows nothing after it, and llguidance's rollback does not count it."""
    return steer is not None and steer.constraint is not None and token in params.stop_token_ids


def verify(
    draft: list[int],
    q: list[torch.Tensor | None],
    logits: torch.Tensor,
    params: SamplingParams,
    gen: torch.Generator,
    steer: Steering | None = None,
) -> list[int]:
    """Target logits [k+1, V] at the draft's positions -> the tokens to emit: the accepted
    drafts, then one correction (or bonus) token. Under `steer` each position's logits are
    masked by its constraint as it stands after the tokens before it, so a draft token the
    constraint forbids is never kept."""
    out = []
    for i, x in enumerate(draft):
        row = steer.logits(logits[i]) if steer is not None else logits[i]
        if params.temperature == 0:
            token = int(torch.argmax(row))
            kept = token == x
        else:
            p = probabilities(row, params)
            p = p / p.sum()
            kept = bool(torch.rand((), generator=gen) * q[i][x] < p[x])  # prob min(1, p/q)
            token = x
            if not kept:
                residual = torch.clamp(p - q[i], min=0)
                total = residual.sum()
                residual = residual / total if total > 0 else p
                token = int(torch.multinomial(residual, 1, generator=gen))
        if steer is not None:
            steer.take(row, token)
        out.append(token)
        if not kept:
            return out
    return out + [choose(logits[len(draft)], params, gen, steer)]


def speculative_round(model, drafter, kv, context, pending, k, params, gen, steer=None):
    """Draft k tokens after `pending` (the last token sampled, not yet in `kv`, which holds
    `context`), verify them in one pass over k+1 positions, and roll `kv` back to pending
    and the accepted drafts. Returns (tokens to emit, tokens drafted, draft seconds, verify
    seconds); a constrained draft ends early at a stop token."""
    t0 = time.perf_counter()
    base = kv.length
    drafter.commit(context)
    draft, q = drafter.propose(kv, pending, k, params, gen, steer)
    if steer is not None:
        steer.undraft()  # verification steps the constraint through the drafts itself
    t1 = time.perf_counter()
    kv.truncate(base)
    if not kv.reserve([pending, *draft]):
        raise BudgetError(f"no KV room to verify {len(draft) + 1} tokens")
    logits = model.forward(torch.tensor([pending, *draft]), kv, all_logits=True)
    tokens = verify(draft, q, logits, params, gen, steer)
    kv.truncate(base + len(tokens))
    return tokens, len(draft), t1 - t0, time.perf_counter() - t1


class AdaptiveK:
    """Draft length from the acceptance so far, and whether speculating pays at all.

    k grows while whole drafts are accepted and shrinks when most are rejected. The
    time per emitted token of speculative rounds is compared with that of plain steps;
    after `patience` rounds in which speculation was the slower, decoding goes plain for
    `retry` tokens, then tries again from the initial k."""

    def __init__(self, k: int = 4, k_max: int = 8, retry: int = 32, patience: int = 4) -> None:
        if k > k_max:
            raise ConfigError(f"draft length {k} exceeds its maximum {k_max}")
        self.k0, self.k, self.k_max, self.retry, self.patience = k, k, k_max, retry, patience
        self.spec_cost: float | None = None  # seconds per emitted token, moving average
        self.plain_cost: float | None = None
        self.plain_left = 2  # measure plain decoding first
        self.rounds = 0  # since speculation last (re)started

    def speculate(self) -> bool:
        return self.plain_left <= 0

    def after_round(self, drafted: int, emitted: int, seconds: float) -> None:
        accepted = emitted - 1
        if accepted == drafted:
            self.k = min(self.k + 1, self.k_max)
        elif accepted < drafted / 2:
            self.k = max(1, self.k - 1)
        self.spec_cost = _ema(self.spec_cost, seconds / emitted)
        self.rounds += 1
        slower = self.plain_cost is not None and self.spec_cost > 1.05 * self.plain_cost
        if slower and self.rounds >= self.patience:
            self.plain_left = self.retry

    def after_plain(self, seconds: float) -> None:
        self.plain_cost = _ema(self.plain_cost, seconds)
        self.plain_left -= 1
        if self.plain_left == 0:  # judge speculation afresh
            self.spec_cost, self.rounds, self.k = None, 0, self.k0


def _ema(old: float | None, new: float, alpha: float = 0.3) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


def generate_speculative(
    model: MoETransformer,
    speculation: Speculation,
    prompt: list[int],
    params: SamplingParams,
    stats: GenerationStats | None = None,
    spec: SpecStats | None = None,
    kv: KVCache | None = None,
    steer: Steering | None = None,
) -> Iterator[int]:
    """Like `generate`, with tokens drafted as `speculation` says and verified k+1 at a time.

    `kv` (empty, large enough) lets the caller look at the target's KV cache afterwards:
    it then holds exactly the prompt and every emitted token but the last."""
    stats = stats if stats is not None else GenerationStats()
    spec = spec if spec is not None else SpecStats()
    limit = check_prompt(prompt, model.config.max_position_embeddings)
    if params.max_tokens == 0:
        return
    capacity = speculation.capacity(len(prompt), params.max_tokens, limit)
    if kv is None:
        kv = model.new_kv_cache(capacity)
    elif kv.length or kv.capacity < capacity:
        raise ConfigError(f"the KV cache must be empty and hold {capacity} tokens")
    gen = params.generator()
    stop = set(params.stop_token_ids)
    session = speculation.session(model, capacity, spec)

    t0 = time.perf_counter()
    logits = model.forward(torch.tensor(prompt), kv)[-1]
    stats.prompt_tokens += len(prompt)
    stats.prefill_seconds += time.perf_counter() - t0
    context = list(prompt)  # the tokens in the target's KV cache
    pending = choose(logits, params, gen, steer)
    produced = 0
    while True:
        stats.generated_tokens += 1
        produced += 1
        yield pending
        if pending in stop or produced == params.max_tokens or kv.length + 1 >= capacity:
            return
        room = min(params.max_tokens - produced, capacity - kv.length - 2)
        t0 = time.perf_counter()
        if k := session.draft_length(room):
            tokens = session.round(kv, context, pending, k, params, gen, steer)
            context += [pending, *tokens[:-1]]
            stats.decode_seconds += time.perf_counter() - t0
            for tok in tokens[:-1]:
                stats.generated_tokens += 1
                produced += 1
                yield tok
                if tok in stop or produced == params.max_tokens:
                    kv.truncate(len(prompt) + produced - 1)
                    return
            pending = tokens[-1]
        else:
            logits = model.forward(torch.tensor([pending]), kv)[-1]
            context.append(pending)
            pending = choose(logits, params, gen, steer)
            dt = time.perf_counter() - t0
            stats.decode_seconds += dt
            session.plain(dt)
