"""Per-sequence key/value cache: one preallocated pair of tensors per layer.

Each layer caches two per-token tensors whose shapes the family gives
(`Family.kv_shapes`): keys and values [kv_heads, head_dim] by default;
DeepSeek's latent attention caches the compressed latent and the rope key.
Allocated once for the sequence's capacity, so decoding never allocates.
`truncate` rolls back to an earlier length (speculative decoding drops the
rejected draft tokens so); rolled-back entries are simply overwritten later.
"""

from __future__ import annotations

import torch

from mer.errors import ConfigError
from mer.models.config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, capacity: int, dtype: torch.dtype) -> None:
        if capacity > config.max_position_embeddings:
            raise ConfigError(
                f"context of {capacity} tokens exceeds the model's "
                f"max_position_embeddings ({config.max_position_embeddings})"
            )
        k_shape, v_shape = config.family.kv_shapes(config)
        self.k = torch.zeros((config.num_hidden_layers, capacity, *k_shape), dtype=dtype)
        self.v = torch.zeros((config.num_hidden_layers, capacity, *v_shape), dtype=dtype)
        self.capacity = capacity
        self.length = 0

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [T, ...] after the current length; return all keys and values so far."""
        end = self.length + k.shape[0]
        if end > self.capacity:
            raise ConfigError(f"sequence of {end} tokens exceeds the KV cache ({self.capacity})")
        self.k[layer, self.length : end] = k
        self.v[layer, self.length : end] = v
        return self.k[layer, :end], self.v[layer, :end]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s key and value buffers [capacity, ...] whole, for a kernel that
        writes a token's row at `length` itself (`rowops.attend_decode`); rows from
        `length` on hold nothing committed."""
        return self.k[layer], self.v[layer]

    def reserve(self, tokens: list[int]) -> bool:
        """Whether `tokens` fit after the current length (the room was allocated up front)."""
        return self.length + len(tokens) <= self.capacity

    def advance(self, n: int) -> None:
        """Commit `n` tokens written to every layer by one forward pass."""
        self.length += n

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
