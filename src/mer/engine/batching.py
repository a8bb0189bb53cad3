"""The continuous-batching policy: data in, data out, no thread, no forward, no text.

One step of the engine is `admit()` (take new and preempted requests in, drop the
cancelled), `schedule() -> Batch` (which tokens run), a model runner's
`run(Batch) -> StepResult` (`mer.engine.runner`), and `postprocess(Batch,
StepResult)` (the `Output`s to deliver). Outputs carry token ids only: text,
detokenising and stop strings belong to the caller, as for single-stream
generation; stop tokens (`SamplingParams.stop_token_ids`) end a sequence here.

Requests join and leave at step boundaries. Each batch packs one token of every
decoding sequence and chunks of prompts still being prefilled (so a long prompt
cannot stall the decoders), up to a token budget. With a `Speculation`, a
sequence that decodes alone gets a speculative batch instead: one draft-and-verify
round (`mer.engine.speculative`). As soon as another sequence runs, batching
amortises the expert reads instead and every sequence decodes plainly.

KV memory comes from a paged pool with a budget of its own (`KVPool`): prompts
reuse cached prefix blocks, a request is admitted only when its prompt fits,
and when decoding sequences outgrow the pool the most recently admitted one is
preempted: its blocks go back, and it is re-queued first with its generated
tokens appended to its prompt, to be recomputed (mostly from cached prefix
blocks) when room returns. Its sampler state is kept, so in float32 its output
does not change; in bf16 a recomputed prefill rounds differently from the
token-by-token decode it replaces, which can flip a later sample (as in any
engine that preempts by recomputation). A KV budget that holds the running
batch avoids preemption altogether: `preemptions` in the stats counts them.

Every sequence ends through `finish`, exactly once, which frees its KV blocks and
returns its final output; a fault (admission, forward, sampling) finishes only
the sequences it touched, with finish_reason "error".
"""

from __future__ import annotations

import itertools
import queue
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mer.engine.sampling import SamplingParams
from mer.engine.speculative import SpecSession, SpecStats, Speculation
from mer.engine.steering import Steering, TokenLogprob
from mer.errors import BudgetError, ConfigError, MerError
from mer.models.paged_kv import KVPool, PagedSequence
from mer.models.transformer import MoETransformer


@dataclass
class Output:
    """What one step produced for one request; the last one has `finish_reason` set.
    The counts are as of this output, so a caller that stops early (a stop string) has
    its usage without waiting for the engine."""

    token_ids: list[int]
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked
    # The prompt's tokens after the first, each's logprob given those before it (when the
    # request asked for `prompt_logprobs`), once, on the first output after its prefill.
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_output: Callable[[Output], None] | None = None  # called on the engine thread
    steering: Steering | None = None  # a token constraint, logprobs: kept through preemption
    prompt_logprobs: int | None = None  # score the prompt too, with this many top tokens
    id: int = field(default_factory=itertools.count().__next__)
    outputs: queue.Queue = field(default_factory=queue.Queue)  # used when on_output is None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)

    def emit(self, out: Output) -> None:
        (self.on_output or self.outputs.put)(out)

    def cancel(self) -> None:
        """Stop generating; the engine frees the sequence at the next step boundary."""
        self.cancelled = True

    def __iter__(self) -> Iterator[Output]:
        """Outputs until the final one (only when no callback was given)."""
        while True:
            out = self.outputs.get()
            yield out
            if out.finish_reason is not None:
                return


class Sequence:
    """A request's state in the engine: what it generated, its KV blocks, what is left
    to run before its next sample, its sampler state and its speculation."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.params = request.params
        self.gen = request.params.generator()
        self.steer = request.steering
        self.generated: list[int] = []
        self.kv: PagedSequence | None = None
        self.pending: list[int] = []  # tokens to run before the next sample
        self.cached_tokens = 0
        self.spec: SpecSession | None = None  # made when it first decodes alone
        self.finished = False
        self.prompt_scores: list[TokenLogprob] | None = None  # filled by prefill, then sent

    @property
    def scoring(self) -> bool:
        """Its prompt's logprobs are asked for and still being computed."""
        return self.request.prompt_logprobs is not None and not self.generated

    @property
    def context(self) -> list[int]:
        """Every token of the sequence so far: prompt, then what it generated."""
        return self.request.prompt + self.generated

    @property
    def decoding(self) -> bool:
        return bool(self.generated) and len(self.pending) == 1

    def output(self, token_ids: list[int], reason: str | None = None, error: str | None = None):
        logprobs = None
        if self.steer is not None and self.steer.logprobs is not None:
            logprobs = self.steer.drain()[: len(token_ids)]  # a round may run past a stop
        scores = None
        if token_ids and self.prompt_scores is not None:  # the first tokens: prefill is done
            scores, self.prompt_scores = self.prompt_scores, None
        return Output(
            token_ids,
            reason,
            error,
            prompt_tokens=len(self.request.prompt),
            cached_tokens=self.cached_tokens,
            completion_tokens=len(self.generated),
            logprobs=logprobs,
            prompt_logprobs=scores,
        )


@dataclass
class Batch:
    """One step's work, the contract between the policy and the model runner: sequence i
    runs `chunks[i]` (a prompt chunk, or its last sampled token) and is sampled after it
    when `sample[i]`. With `draft` > 0 the batch is one decoding sequence, to draft that
    many tokens for and verify them in one pass."""

    seqs: list[Sequence]
    chunks: list[list[int]]
    sample: list[bool]
    draft: int = 0

    @property
    def n_tokens(self) -> int:
        return self.draft + 1 if self.draft else sum(len(c) for c in self.chunks)

    @property
    def spans(self) -> list[slice]:
        """Each sequence's rows in the packed forward."""
        starts = itertools.accumulate((len(c) for c in self.chunks), initial=0)
        return [slice(a, a + len(c)) for a, c in zip(starts, self.chunks, strict=False)]


@dataclass
class StepResult:
    """What the model runner made of a batch: the tokens sampled per sequence (none while
    its prompt is still being prefilled; several from a speculative round) or why that
    sequence failed; `ran` is False when the forward itself failed (every sequence then
    has its error). Expert counts come from this batch's own routing."""

    tokens: list[list[int]]
    errors: list[str | None]
    seconds: float
    ran: bool = True
    expert_demand: int = 0  # experts wanted per layer, summed over sequences
    expert_acquired: int = 0  # experts acquired per layer (the union over the batch)
    prompt_logprobs: list[list[TokenLogprob]] | None = None  # per sequence, when scoring


@dataclass
class SchedulerStats:
    requests: int = 0
    finished: int = 0
    failed: int = 0  # finished with finish_reason "error"
    steps: int = 0
    batch_tokens: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    expert_demand: int = 0  # experts wanted per layer, summed over sequences
    expert_acquired: int = 0  # experts acquired per layer (the union over the batch)
    busy_seconds: float = 0.0
    spec: SpecStats = field(default_factory=SpecStats)  # rounds of lone sequences

    @property
    def dedup_factor(self) -> float:
        """How many sequences one expert acquisition served, on average."""
        return self.expert_demand / self.expert_acquired if self.expert_acquired else 1.0


Delivery = tuple[Sequence, Output]


class Batcher:
    """The waiting queue, the running batch and the KV pool, and the rules between them."""

    def __init__(
        self,
        model: MoETransformer,
        kv_budget: int,
        max_batch_tokens: int = 256,
        max_running: int = 32,
        block_size: int = 16,
        speculation: Speculation | None = None,
    ) -> None:
        if max_batch_tokens < 1 or max_running < 1:
            raise ConfigError("max_batch_tokens and max_running must be at least 1")
        self.model = model
        self.pool = KVPool(model.config, kv_budget, model.dtype, block_size)
        self.max_batch_tokens, self.max_running = max_batch_tokens, max_running
        self.context = model.config.max_position_embeddings
        self.speculation = speculation
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def check(self, request: Request) -> None:
        """ConfigError/BudgetError if the request could never run."""
        n, limit = len(request.prompt), request.params.max_tokens
        if n == 0:
            raise ConfigError("the prompt is empty")
        if n + limit > self.context:
            raise ConfigError(
                f"prompt of {n} tokens plus max_tokens {limit} exceeds the context of "
                f"{self.context} tokens"
            )
        need = self.pool.blocks_for(n + limit)
        if need > self.pool.n_blocks:
            raise BudgetError(
                f"prompt of {n} tokens plus max_tokens {limit} needs {need} KV blocks; the KV "
                f"budget holds {self.pool.n_blocks} ({self.pool.block_size} tokens each)"
            )

    def admit(self, new: list[Sequence]) -> list[Delivery]:
        """Queue `new`, end the cancelled, and move waiting sequences into the running batch
        while they fit; the finals of those that ended."""
        self.waiting.extend(new)
        done = [
            self.finish(seq, "cancelled")
            for seq in [*self.running, *self.waiting]
            if seq.request.cancelled
        ]
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            context = seq.context
            try:
                # A prompt being scored runs whole: a cached prefix would have no logits.
                kv = self.pool.sequence(context, reuse=not seq.scoring)
            except Exception as e:  # a request admission cannot place fails alone
                done.append(self.finish(seq, "error", message(e)))
                continue
            # Room for the whole prompt now, plus a block of headroom per running sequence
            # so that admitting does not immediately force a preemption.
            need = self.pool.blocks_for(len(context)) - len(kv.blocks) + len(self.running)
            if need > self.pool.available_blocks and self.running:
                kv.free()
                break
            self.waiting.popleft()
            seq.kv, seq.pending = kv, context[kv.length :]
            if not seq.generated:
                seq.cached_tokens = kv.length
            if seq.scoring:
                seq.prompt_scores = []  # (again, if preempted during its prefill)
            self.running.append(seq)
        return [d for d in done if d is not None]

    def schedule(self) -> Batch | None:
        """The next step's batch, or None when nothing runs."""
        return self._speculative() or self._plain()

    def _speculative(self) -> Batch | None:
        """A draft-and-verify round for the one running sequence, when it should have one."""
        if self.speculation is None or len(self.running) != 1 or not self.running[0].decoding:
            return None
        seq = self.running[0]
        if seq.spec is None:
            n = len(seq.request.prompt)
            capacity = self.speculation.capacity(n, seq.params.max_tokens, self.context)
            seq.spec = self.speculation.session(self.model, capacity, self.stats.spec)
        room = min(seq.params.max_tokens - len(seq.generated), self.context - seq.kv.length - 2)
        k = seq.spec.draft_length(room)
        if k < 1 or not seq.kv.reserve_room(k + 1):
            return None
        return Batch([seq], [list(seq.pending)], [True], draft=k)

    def _plain(self) -> Batch | None:
        """One token per decoding sequence, then prompt chunks up to the token budget,
        preempting the most recently admitted sequences when the KV pool runs out."""
        prefill_budget = max(self.max_batch_tokens - sum(s.decoding for s in self.running), 1)
        batch = Batch([], [], [])
        for seq in list(self.running):  # admission order; victims are taken from the end
            if seq not in self.running:
                break  # preempted to make room for an earlier one, as were all after it
            decoding = seq.decoding
            chunk = seq.pending if decoding else seq.pending[:prefill_budget]
            if not chunk:
                continue
            while not seq.kv.reserve(chunk):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.chunks.append(list(chunk))
                batch.sample.append(len(chunk) == len(seq.pending))
                if not decoding:
                    prefill_budget -= len(chunk)
        return batch if batch.seqs else None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.kv.free()
        seq.kv, seq.pending = None, []
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def postprocess(self, batch: Batch, result: StepResult) -> list[Delivery]:
        """Advance each sequence by what its step gave; the outputs to deliver."""
        s = self.stats
        if result.ran:
            s.steps += 1
            s.batch_tokens += batch.n_tokens
            s.busy_seconds += result.seconds
            s.expert_demand += result.expert_demand
            s.expert_acquired += result.expert_acquired
        done = []
        for i, (seq, chunk, tokens, error) in enumerate(
            zip(batch.seqs, batch.chunks, result.tokens, result.errors, strict=True)
        ):
            if error is not None:
                done.append(self.finish(seq, "error", error))
                continue
            seq.pending = [] if batch.draft else seq.pending[len(chunk) :]
            if result.prompt_logprobs and seq.prompt_scores is not None:
                seq.prompt_scores += result.prompt_logprobs[i]
            if tokens:
                done.append(self._extend(seq, tokens))
        lone = batch.seqs[0] if len(batch.seqs) == 1 else None
        if result.ran and not batch.draft and lone is not None and lone.spec is not None:
            lone.spec.plain(result.seconds)
        return [d for d in done if d is not None]

    def _extend(self, seq: Sequence, tokens: list[int]) -> Delivery | None:
        """Append generated tokens until one ends the sequence (a stop token, max_tokens)."""
        for i, token in enumerate(tokens):
            seq.generated.append(token)
            self.stats.generated_tokens += 1
            if len(seq.generated) == 1:
                self.stats.prompt_tokens += len(seq.request.prompt)
            if token in seq.params.stop_token_ids:
                return self.finish(seq, "stop", new_ids=tokens[: i + 1])
            if len(seq.generated) >= seq.params.max_tokens:
                return self.finish(seq, "length", new_ids=tokens[: i + 1])
        seq.pending = [tokens[-1]]
        return seq, seq.output(tokens)

    def finish(
        self, seq: Sequence, reason: str, error: str | None = None, new_ids: list[int] | None = None
    ) -> Delivery | None:
        """End the sequence once (later calls return None): out of the queues, its KV
        blocks back to the pool, and its final output."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.finished:
            return None
        seq.finished = True
        kv, seq.kv = seq.kv, None
        if kv is not None:
            kv.free()
        self.stats.finished += 1
        self.stats.failed += reason == "error"
        return seq, seq.output(new_ids or [], reason, error)


def message(e: Exception) -> str:
    """One line for a request's error: ours as they are, others with their type."""
    return str(e) if isinstance(e, MerError) else f"{type(e).__name__}: {e}"
