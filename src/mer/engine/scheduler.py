"""Continuous batching on an engine thread: many sequences share every forward pass, and so
every expert read.

Per MoE layer a batched forward acquires the union of the batch's experts once: one SSD
read serves every sequence that routes to that expert. The policy (admission, chunked
prefill, paged KV with prefix reuse, preemption, speculation for a lone sequence) is
`mer.engine.batching`; the forward and sampling are `mer.engine.runner`. This module
is the thread around them, and each step reads as its description:

    admit -> schedule() -> Batch -> runner.run -> StepResult -> postprocess -> deliver

Outputs are token ids: the caller owns text, detokenising and stop strings (and cancels
a request whose stop string it saw). `submit` and `cancel` may be called from any
thread; each request's outputs go to its callback (or a queue), on the engine thread.

Failures stay with the requests they touch: an exception while admitting, running
(forward or speculative round), sampling or delivering a request's output finishes
that request (or, in the forward, that step's batch) with finish_reason "error" and a
message, and the loop goes on. Should the engine thread die anyway (a bug), every
request it held or is given later gets an error at once, `stopped` is set and
`health()` says why. `health()` also reports a stuck engine: one step running longer
than `stuck_after` seconds (default 300 s, far above a step of any model we serve,
cold SSD included).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mer.engine.batching import Batch, Batcher, Delivery, Output, Request, Sequence, message
from mer.engine.runner import ModelRunner
from mer.engine.speculative import Speculation
from mer.errors import ConfigError, MerError
from mer.models.transformer import MoETransformer

__all__ = ["Output", "Request", "Scheduler", "SchedulerDown"]

log = logging.getLogger(__name__)


class Scheduler:
    """A `Batcher` and a `ModelRunner` stepped on one engine thread, with their outputs
    delivered to each request's callback or queue."""

    def __init__(
        self,
        transformer: MoETransformer,
        kv_budget: int,
        max_batch_tokens: int = 256,
        max_running: int = 32,
        block_size: int = 16,
        speculation: Speculation | None = None,
        stuck_after: float = 300.0,
        before_forward: Callable[[Batch], None] | None = None,
    ) -> None:
        """`speculation`: how a sequence that runs alone decodes speculatively, if at all.
        `stuck_after`: seconds one step may run before `health()` calls the engine stuck.
        `before_forward`: told of each batch before its forward pass (`ModelRunner`)."""
        if not stuck_after > 0:
            raise ConfigError(f"stuck_after must be positive, got {stuck_after}")
        self.batcher = Batcher(
            transformer, kv_budget, max_batch_tokens, max_running, block_size, speculation
        )
        self.runner = ModelRunner(transformer, before_forward)
        self.pool, self.stats = self.batcher.pool, self.batcher.stats
        self.stuck_after = stuck_after
        self._incoming: list[Sequence] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stopped = threading.Event()  # set when the engine thread ends, for any reason
        self.died: str | None = None  # why the engine thread died, if it did
        self._step_started: float | None = None  # time.monotonic() of the running step

    # ---- any thread ----

    def submit(self, request: Request) -> Request:
        """Queue a request; ConfigError/BudgetError at once if it can never run."""
        self.batcher.check(request)
        with self._wake:
            if self.died is not None:
                raise SchedulerDown(f"the scheduler has stopped: {self.died}")
            self._incoming.append(Sequence(request))
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
        return len(self.batcher.running)

    @property
    def n_waiting(self) -> int:
        return len(self.batcher.waiting) + len(self._incoming)

    # ---- engine thread ----

    def step(self) -> bool:
        """Run one step over what is runnable; False if there was nothing to run."""
        with self._wake:
            new, self._incoming = self._incoming, []
        self._deliver(self.batcher.admit(new))
        batch = self.batcher.schedule()
        if batch is None:
            return False
        self._deliver(self.batcher.postprocess(batch, self.runner.run(batch)))
        return True

    def _deliver(self, outputs: list[Delivery]) -> None:
        """Hand each output to its request; a callback that raises fails its own request
        only (its final output is still attempted)."""
        for seq, out in outputs:
            try:
                seq.request.emit(out)
            except Exception as e:
                if out.finish_reason is None:
                    self._fail([seq], "error", message(e))
                else:
                    log.exception(
                        "request %d: its output callback failed on the final output",
                        seq.request.id,
                    )

    def _emit_final(self, seq: Sequence, out: Output) -> None:
        try:
            seq.request.emit(out)
        except Exception:
            log.exception(
                "request %d: its output callback failed on the final output", seq.request.id
            )

    def _fail(self, seqs: list[Sequence], reason: str, error: str | None = None) -> None:
        for seq in seqs:
            if final := self.batcher.finish(seq, reason, error):
                self._emit_final(*final)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug: nothing may wait forever on a dead engine
            with self._wake:
                self.died = message(e) if isinstance(e, Exception) else type(e).__name__
                held = [*self.batcher.running, *self.batcher.waiting, *self._incoming]
                self._incoming.clear()
            for seq in held:
                try:
                    self._fail([seq], "error", f"the scheduler thread died: {self.died}")
                except Exception:  # its KV state may be what broke: tell the others anyway
                    log.exception("request %d: could not be failed cleanly", seq.request.id)
            raise
        finally:
            self.stopped.set()

    def _loop(self) -> None:
        b = self.batcher
        while True:
            with self._wake:
                while not (self._stopping or self._incoming or b.waiting or b.running):
                    self._wake.wait()
                if self._stopping:
                    break
            self._step_started = time.monotonic()
            try:
                self.step()
            except Exception as e:  # outside the guarded phases: fail the step's requests
                log.exception("scheduler step failed")
                # Nothing running: admission failed, so the queue's head is the culprit.
                self._fail(list(b.running) or list(b.waiting)[:1], "error", message(e))
            finally:
                self._step_started = None
        self._fail([*b.running, *b.waiting, *self._incoming], "cancelled")


class SchedulerDown(MerError):
    """The engine thread has died; no request can run until the process restarts."""
