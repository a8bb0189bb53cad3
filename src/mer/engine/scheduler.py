"""Continuous batching: many sequences share every forward pass, and so every expert read.

Requests join and leave at step boundaries. Each step packs one token of every
decoding sequence and chunks of prompts still being prefilled (so a long prompt
cannot stall the decoders) into one forward pass, up to a token budget. Per MoE
layer the forward acquires the union of the batch's experts once: one SSD read
serves every sequence that routes to that expert.

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

With a draft configured (`speculation`), a sequence that runs alone decodes
speculatively (`mer.engine.speculative`): drafted tokens verified in one pass.
As soon as another sequence runs, batching amortises the expert reads instead
and every sequence decodes plainly.

The scheduler runs in one engine thread; `submit` and `cancel` may be called
from any thread, and each request's outputs go to its callback (or a queue).

Failures stay with the requests they touch: an exception while admitting,
running (forward or speculative round), sampling, detokenising or delivering a
request's output finishes that request (or, in the forward, that step's batch)
with finish_reason "error" and a message, and the loop goes on. Should the
engine thread die anyway (a bug), every request it held or is given later gets
an error at once, `stopped` is set and `health()` says why. `health()` also
reports a stuck engine: one step running longer than `stuck_after` seconds
(default 300 s, far above a step of any model we serve, cold SSD included).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from mer.engine.sampling import SamplingParams, sample_next_token
from mer.engine.speculative import AdaptiveK, ModelDrafter, SelfDrafter, speculative_round
from mer.engine.text import TextStream
from mer.errors import BudgetError, ConfigError, MerError
from mer.models.paged_kv import KVPool, PagedSequence
from mer.models.transformer import MoETransformer
from mer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Output:
    """What one step produced for one request; the last one has `finish_reason` set."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    completion_tokens: int = 0


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    on_output: Callable[[Output], None] | None = None  # called on the engine thread
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


class _Sequence:
    def __init__(self, request: Request, tokenizer: Tokenizer | None) -> None:
        self.request = request
        self.params = request.params
        self.gen = request.params.generator()
        self.text = (
            TextStream(tokenizer, request.stop, request.params.stop_token_ids)
            if tokenizer is not None
            else None
        )
        self.generated: list[int] = []
        self.kv: PagedSequence | None = None
        self.pending: list[int] = []  # tokens to run before the next sample
        self.cached_tokens = 0
        self.drafter = None  # made on the first speculative round
        self.spec_control: AdaptiveK | None = None
        self.finished = False

    @property
    def context(self) -> list[int]:
        """Every token of the sequence so far: prompt, then what it generated."""
        return self.request.prompt + self.generated


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
    spec_rounds: int = 0  # speculative verification passes
    spec_drafted: int = 0
    spec_accepted: int = 0
    expert_demand: int = 0  # experts wanted per layer, summed over sequences
    expert_acquired: int = 0  # experts acquired per layer (the union over the batch)
    busy_seconds: float = 0.0

    @property
    def dedup_factor(self) -> float:
        """How many sequences one expert acquisition served, on average."""
        return self.expert_demand / self.expert_acquired if self.expert_acquired else 1.0


class Scheduler:
    def __init__(
        self,
        transformer: MoETransformer,
        tokenizer: Tokenizer | None,
        kv_budget: int,
        max_batch_tokens: int = 256,
        max_running: int = 32,
        block_size: int = 16,
        speculation: dict | None = None,
        stuck_after: float = 300.0,
    ) -> None:
        """`speculation`: {"draft": "self" or a smaller MoETransformer, "k": initial k}.
        `stuck_after`: seconds one step may run before `health()` calls the engine stuck."""
        if max_batch_tokens < 1 or max_running < 1:
            raise ConfigError("max_batch_tokens and max_running must be at least 1")
        if not stuck_after > 0:
            raise ConfigError(f"stuck_after must be positive, got {stuck_after}")
        self.model, self.tokenizer = transformer, tokenizer
        self.pool = KVPool(transformer.config, kv_budget, transformer.dtype, block_size)
        self.max_batch_tokens, self.max_running = max_batch_tokens, max_running
        self.context = transformer.config.max_position_embeddings
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.stats = SchedulerStats()
        self._incoming: list[_Sequence] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._spans: list[slice] = []
        self.speculation = speculation
        self.stuck_after = stuck_after
        self.stopped = threading.Event()  # set when the engine thread ends, for any reason
        self.died: str | None = None  # why the engine thread died, if it did
        self._step_started: float | None = None  # time.monotonic() of the running step
        transformer.routing_hooks.append(self._count_dedup)

    # ---- any thread ----

    def submit(self, request: Request) -> Request:
        """Queue a request; ConfigError/BudgetError at once if it can never run."""
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
        with self._wake:
            if self.died is not None:
                raise SchedulerDown(f"the scheduler has stopped: {self.died}")
            self._incoming.append(_Sequence(request, self.tokenizer))
            self.stats.requests += 1
            self._wake.notify()
        return request

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._run, name="mer-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        if self._count_dedup in self.model.routing_hooks:
            self.model.routing_hooks.remove(self._count_dedup)

    def health(self) -> str | None:
        """None while the engine thread runs and no step has taken over `stuck_after`
        seconds; otherwise why the engine is not healthy (one line)."""
        if self.died is not None:
            return f"the scheduler thread died: {self.died}"
        if self._thread is None or not self._thread.is_alive():
            return "the scheduler thread is not running"
        started = self._step_started
        if started is not None and (busy := time.monotonic() - started) > self.stuck_after:
            return (
                f"the scheduler is stuck: one step has run for {busy:.0f} s (limit "
                f"{self.stuck_after:g} s) with {self.n_running} running and "
                f"{self.n_waiting} waiting"
            )
        return None

    @property
    def n_running(self) -> int:
        return len(self.running)

    @property
    def n_waiting(self) -> int:
        return len(self.waiting) + len(self._incoming)

    # ---- engine thread ----

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug: nothing may wait forever on a dead engine
            with self._wake:
                self.died = _message(e) if isinstance(e, Exception) else type(e).__name__
                held = [*self.running, *self.waiting, *self._incoming]
                self._incoming.clear()
            for seq in held:
                try:
                    self._finish(seq, "error", f"the scheduler thread died: {self.died}")
                except Exception:  # its KV state may be what broke: tell the others anyway
                    log.exception("request %d: could not be failed cleanly", seq.request.id)
            raise
        finally:
            self.stopped.set()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._incoming or self.waiting or self.running):
                    self._wake.wait()
                if self._stopping:
                    break
            self._step_started = time.monotonic()
            try:
                self.step()
            except Exception as e:  # outside the guarded phases: fail the step's requests
                log.exception("scheduler step failed")
                # Nothing running: admission failed, so the queue's head is the culprit.
                for seq in list(self.running) or list(self.waiting)[:1]:
                    self._finish(seq, "error", _message(e))
            finally:
                self._step_started = None
        for seq in [*self.running, *self.waiting, *self._incoming]:
            self._finish(seq, "cancelled")

    def step(self) -> bool:
        """Run one forward pass over what is runnable; False if there was nothing to run."""
        with self._wake:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
        for seq in [s for s in [*self.running, *self.waiting] if s.request.cancelled]:
            self._finish(seq, "cancelled")
        self._admit()
        if self._speculate_alone():
            return True
        batch = self._build_batch()
        if not batch:
            return False
        t0 = time.perf_counter()
        self._spans = list(_spans(len(chunk) for _, chunk in batch))
        try:
            logits = self.model.forward_batch(
                [(torch.tensor(chunk), seq.kv) for seq, chunk in batch]
            )
        except Exception as e:  # e.g. an unreadable expert: it fails this batch, not the server
            for seq, _ in batch:
                self._finish(seq, "error", _message(e))
            return True
        finally:
            self._spans = []  # only this batch's forward is counted for dedup
        self.stats.steps += 1
        self.stats.batch_tokens += sum(len(chunk) for _, chunk in batch)
        for (seq, chunk), row in zip(batch, logits, strict=True):
            del seq.pending[: len(chunk)]
            if not seq.pending:
                try:
                    self._sample(seq, row)
                except Exception as e:  # NaN logits, a decoding or callback error: this one
                    self._finish(seq, "error", _message(e))
        dt = time.perf_counter() - t0
        self.stats.busy_seconds += dt
        if len(batch) == 1 and batch[0][0].spec_control is not None:
            batch[0][0].spec_control.after_plain(dt)
        return True

    def _speculate_alone(self) -> bool:
        """A speculative round for the one running sequence, if that is what it should do."""
        if self.speculation is None or len(self.running) != 1:
            return False
        seq = self.running[0]
        if not _is_decoding(seq):
            return False
        if seq.spec_control is None:
            k = self.speculation.get("k", 4)
            seq.spec_control = AdaptiveK(k, max(k, 8))
        control = seq.spec_control
        room = min(seq.params.max_tokens - len(seq.generated), self.context - seq.kv.length - 2)
        k = min(control.k, room)
        if not control.speculate() or k < 1 or not seq.kv.reserve_room(k + 1):
            return False
        t0 = time.perf_counter()
        try:
            if seq.drafter is None:
                draft = self.speculation["draft"]
                seq.drafter = SelfDrafter(self.model) if draft == "self" else ModelDrafter(draft)
                capacity = len(seq.request.prompt) + seq.params.max_tokens + control.k_max + 1
                seq.drafter.start(min(capacity, self.context))
            tokens, *_ = speculative_round(
                self.model,
                seq.drafter,
                seq.kv,
                seq.context[: seq.kv.length],
                seq.pending[0],
                k,
                seq.params,
                seq.gen,
            )
        except Exception as e:
            self._finish(seq, "error", _message(e))
            return True
        dt = time.perf_counter() - t0
        control.after_round(k, len(tokens), dt)
        self.stats.steps += 1
        self.stats.batch_tokens += k + 1
        self.stats.spec_rounds += 1
        self.stats.spec_drafted += k
        self.stats.spec_accepted += len(tokens) - 1
        self.stats.busy_seconds += dt
        seq.pending = []
        try:
            for token in tokens:
                if not self._emit_token(seq, token):
                    break
        except Exception as e:
            self._finish(seq, "error", _message(e))
        return True

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            context = seq.context
            try:
                kv = self.pool.sequence(context)
            except Exception as e:  # a request admission cannot place fails alone
                self._finish(seq, "error", _message(e))
                continue
            # Room for the whole prompt now, plus a block of headroom per running sequence
            # so that admitting does not immediately force a preemption.
            need = self.pool.blocks_for(len(context)) - len(kv.blocks) + len(self.running)
            if need > self.pool.available_blocks and self.running:
                kv.free()
                return
            self.waiting.popleft()
            seq.kv, seq.pending = kv, context[kv.length :]
            if not seq.generated:
                seq.cached_tokens = kv.length
            self.running.append(seq)

    def _build_batch(self) -> list[tuple[_Sequence, list[int]]]:
        """One token per decoding sequence, then prompt chunks up to the token budget."""
        decoding = [s for s in self.running if _is_decoding(s)]
        prefill_budget = max(self.max_batch_tokens - len(decoding), 1)
        batch = []
        for seq in list(self.running):  # admission order; victims are taken from the end
            if seq not in self.running:
                break  # preempted to make room for an earlier one, as were all after it
            chunk = seq.pending if _is_decoding(seq) else seq.pending[:prefill_budget]
            if not chunk:
                continue
            while not seq.kv.reserve(chunk):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.append((seq, chunk))
                if not _is_decoding(seq):
                    prefill_budget -= len(chunk)
        return batch

    def _preempt(self, seq: _Sequence) -> None:
        self.running.remove(seq)
        seq.kv.free()
        seq.kv, seq.pending = None, []
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> None:
        self._emit_token(seq, sample_next_token(logits, seq.params, seq.gen))

    def _emit_token(self, seq: _Sequence, token: int) -> bool:
        """Hand a generated token to its request; False once the sequence has finished."""
        seq.generated.append(token)
        self.stats.generated_tokens += 1
        if len(seq.generated) == 1:
            self.stats.prompt_tokens += len(seq.request.prompt)
        text = seq.text.push(token) if seq.text else ""
        stopped = (seq.text.finish_reason if seq.text else None) or (
            "stop" if token in seq.params.stop_token_ids else None
        )
        if stopped:
            self._finish(seq, stopped, new_text=text, new_ids=[token])
            return False
        if len(seq.generated) >= seq.params.max_tokens:
            self._finish(seq, "length", new_text=text, new_ids=[token])
            return False
        seq.pending = [token]
        seq.request.emit(Output(text, [token]))
        return True

    def _finish(
        self,
        seq: _Sequence,
        reason: str,
        error: str | None = None,
        new_text: str = "",
        new_ids: list[int] | None = None,
    ) -> None:
        """Release the sequence and send its final output, once; never raises for the
        request's own faults (a decoder or callback error), so one request cannot take
        the engine down with it."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.finished:
            return
        seq.finished = True
        kv, seq.kv = seq.kv, None
        if kv is not None:
            kv.free()
        if seq.text is not None and reason == "length":
            try:
                new_text += seq.text.finish()
            except Exception as e:
                reason, error = "error", _message(e)
        self.stats.finished += 1
        self.stats.failed += reason == "error"
        out = Output(
            new_text,
            new_ids or [],
            finish_reason=reason,
            error=error,
            prompt_tokens=len(seq.request.prompt),
            cached_tokens=seq.cached_tokens,
            completion_tokens=len(seq.generated),
        )
        try:
            seq.request.emit(out)
        except Exception:
            log.exception(
                "request %d: its output callback failed on the final output", seq.request.id
            )

    def _count_dedup(
        self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> None:
        if not self._spans:
            return  # a forward that is not a batch step (speculation, single-stream generation)
        self.stats.expert_demand += sum(len(ids[s].unique()) for s in self._spans)
        self.stats.expert_acquired += len(ids.unique())


class SchedulerDown(MerError):
    """The engine thread has died; no request can run until the process restarts."""


def _message(e: Exception) -> str:
    return str(e) if isinstance(e, MerError) else f"{type(e).__name__}: {e}"


def _is_decoding(seq: _Sequence) -> bool:
    return bool(seq.generated) and len(seq.pending) == 1


def _spans(lengths) -> Iterator[slice]:
    start = 0
    for n in lengths:
        yield slice(start, start + n)
        start += n
