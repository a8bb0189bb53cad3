"""Generation for one sequence: prefill the prompt, then decode token by token.

A plain generator of token ids; the caller stops reading to stop early. It
knows nothing about text: tokenization and stop strings belong to the API.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mer.engine.sampling import SamplingParams
from mer.engine.steering import Steering, choose
from mer.errors import ConfigError
from mer.models.transformer import MoETransformer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0  # forward passes after the first token

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        steps = self.generated_tokens - 1  # the first token came from prefill
        return steps / self.decode_seconds if self.decode_seconds and steps > 0 else 0.0


def generate(
    model: MoETransformer,
    prompt: list[int],
    params: SamplingParams,
    stats: GenerationStats | None = None,
    steer: Steering | None = None,
) -> Iterator[int]:
    """Yield sampled token ids until max_tokens or a stop token (which is yielded, then ends);
    `steer` constrains the choice and records logprobs."""
    stats = stats if stats is not None else GenerationStats()
    limit = check_prompt(prompt, model.config.max_position_embeddings)
    if params.max_tokens == 0:
        return
    kv = model.new_kv_cache(min(len(prompt) + params.max_tokens, limit))
    gen = params.generator()
    stop = set(params.stop_token_ids)

    t0 = time.perf_counter()
    logits = model.forward(torch.tensor(prompt), kv)[-1]
    stats.prompt_tokens += len(prompt)
    stats.prefill_seconds += time.perf_counter() - t0
    for i in range(params.max_tokens):
        token = choose(logits, params, gen, steer)
        stats.generated_tokens += 1
        yield token
        if token in stop or i + 1 == params.max_tokens or kv.length >= kv.capacity:
            return
        t0 = time.perf_counter()
        logits = model.forward(torch.tensor([token]), kv)[-1]
        stats.decode_seconds += time.perf_counter() - t0


def check_prompt(prompt: list[int], limit: int) -> int:
    """The context size, once the prompt is known to fit it with room to generate."""
    if not prompt:
        raise ConfigError("the prompt is empty")
    if len(prompt) >= limit:
        raise ConfigError(f"prompt of {len(prompt)} tokens does not fit the context of {limit}")
    return limit
