"""The model runner: a `Batch` in, a `StepResult` out.

A plain batch is one packed forward pass (`MoETransformer.forward_batch`), then a
sample for each sequence whose chunk ends what it had to run; a speculative batch
is one draft-and-verify round for its sequence (`SpecSession.round`). The expert
dedup counts come from the routing of this batch's own forward, heard through a
routing hook subscribed for that forward only.

Faults are data: a forward that raises fails every sequence of the batch, a
sample that raises (NaN logits) fails its sequence only; nothing escapes `run`
but a bug in the runner itself. The runner changes no sequence state beyond what
running it means (the KV cache, the sampler's generator, the speculation's
record); what the results mean for each request is `Batcher.postprocess`'s job.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from mer.engine.batching import Batch, StepResult, message
from mer.engine.steering import TokenLogprob, choose, token_logprob
from mer.models.transformer import MoETransformer


class ModelRunner:
    """Runs batches on one model. `before_forward(batch)`, if given, is told of each plain
    batch just before its forward pass (forced routing feeds its trace rows so)."""

    def __init__(
        self, model: MoETransformer, before_forward: Callable[[Batch], None] | None = None
    ) -> None:
        self.model = model
        self.before_forward = before_forward

    def run(self, batch: Batch) -> StepResult:
        t0 = time.perf_counter()
        if batch.draft:
            return self._speculate(batch, t0)
        tally = _RoutingTally(batch.spans)
        hooks = self.model.routing_hooks
        hooks.append(tally)
        scoring = any(s.scoring for s in batch.seqs)  # a prompt's logprobs: every row's logits
        try:
            if self.before_forward is not None:
                self.before_forward(batch)
            logits = self.model.forward_batch(
                [(torch.tensor(c), s.kv) for s, c in zip(batch.seqs, batch.chunks, strict=True)],
                all_logits=scoring,
            )  # [sequences, V]: each one's last position ([tokens, V] when scoring)
        except Exception as e:  # e.g. an unreadable expert: it fails this batch, not the server
            return _failed(batch, message(e), t0)
        finally:
            hooks.remove(tally)
        prompt_logprobs = None
        if scoring:
            rows, spans = logits, batch.spans
            logits = rows[[span.stop - 1 for span in spans]]
            prompt_logprobs = [
                _prompt_logprobs(seq, rows[span]) if seq.scoring else []
                for seq, span in zip(batch.seqs, spans, strict=True)
            ]
        tokens, errors = [], []
        for seq, sample, row in zip(batch.seqs, batch.sample, logits, strict=True):
            try:
                tokens.append([choose(row, seq.params, seq.gen, seq.steer)] if sample else [])
                errors.append(None)
            except Exception as e:  # NaN logits: this sequence only
                tokens.append([])
                errors.append(message(e))
        seconds = time.perf_counter() - t0
        return StepResult(
            tokens, errors, seconds, True, tally.demand, tally.acquired, prompt_logprobs
        )

    def _speculate(self, batch: Batch, t0: float) -> StepResult:
        (seq,) = batch.seqs
        try:
            tokens = seq.spec.round(
                seq.kv,
                seq.context[: seq.kv.length],
                batch.chunks[0][0],
                batch.draft,
                seq.params,
                seq.gen,
                seq.steer,
            )
        except Exception as e:
            return _failed(batch, message(e), t0)
        return StepResult([tokens], [None], time.perf_counter() - t0)


def _prompt_logprobs(seq, rows: torch.Tensor) -> list[TokenLogprob]:
    """The logprobs of the prompt tokens that `rows` (the logits of this step's chunk of
    the prompt) predict: row j, at prompt position p + j, gives token p + j + 1's."""
    prompt, n = seq.request.prompt, seq.request.prompt_logprobs
    start = len(prompt) - len(seq.pending)  # the chunk's first position
    return [
        token_logprob(row, prompt[start + j + 1], n)
        for j, row in enumerate(rows)
        if start + j + 1 < len(prompt)
    ]


def _failed(batch: Batch, error: str, t0: float) -> StepResult:
    n = len(batch.seqs)
    return StepResult([[]] * n, [error] * n, time.perf_counter() - t0, ran=False)


class _RoutingTally:
    """A routing hook counting, per MoE layer, the experts each sequence of a batch wants
    and the experts the batch acquires (their union)."""

    def __init__(self, spans: list[slice]) -> None:
        self.spans, self.demand, self.acquired = spans, 0, 0

    def __call__(
        self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> None:
        self.demand += sum(len(ids[s].unique()) for s in self.spans)
        self.acquired += len(ids.unique())
