"""Per-sequence key/value cache: one preallocated [max_len, kv_heads, head_dim] pair per layer.

Allocated once for the sequence's capacity, so decoding never allocates.
`truncate` rolls back to an earlier length (speculative decoding drops the
rejected draft tokens so); rolled-back entries are simply overwritten later.
"""

from __future__ import annotations

import torch

from mer.config import ModelConfig
from mer.errors import ConfigError


class KVCache:
    def __init__(self, config: ModelConfig, capacity: int, dtype: torch.dtype) -> None:
        if capacity > config.max_position_embeddings:
            raise ConfigError(
                f"context of {capacity} tokens exceeds the model's "
                f"max_position_embeddings ({config.max_position_embeddings})"
            )
        shape = (config.num_hidden_layers, capacity, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.capacity = capacity
        self.length = 0

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [T, Hkv, D] after the current length; return all keys and values so far."""
        end = self.length + k.shape[0]
        if end > self.capacity:
            raise ConfigError(f"sequence of {end} tokens exceeds the KV cache ({self.capacity})")
        self.k[layer, self.length : end] = k
        self.v[layer, self.length : end] = v
        return self.k[layer, :end], self.v[layer, :end]

    def reserve(self, tokens: list[int]) -> bool:
        """Whether `tokens` fit after the current length (the room was allocated up front)."""
        return self.length + len(tokens) <= self.capacity

    def advance(self, n: int) -> None:
        """Commit `n` tokens written to every layer by one forward pass."""
        self.length += n

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
