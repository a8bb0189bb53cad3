"""Pinned experts: a set kept in RAM once loaded and never evicted, within a share of the budget.

Where the set comes from:

- given (`Pins`): keys to pin whole, or a ranking (most wanted first) from which as
  many are taken as the share allows. Pin files (a JSON list, or a routing trace's
  most chosen experts) are read into `Pins` by `mer.trace.pins`: the cache takes
  keys, never files;
- automatically, from the experts the cache was asked for most often so far
  (`AutoPins`).

Pinning takes at most `share` of the slots and always leaves one token's top-k
unpinned, so a step can run whatever the router picks. This module only decides
*which* experts; the cache enforces that they stay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mer.config import ModelConfig
from mer.errors import ConfigError

Key = tuple[int, int]  # (layer, expert)
MAX_SHARE = 0.9
# Automatic pins are chosen at forward passes 32, 64, 128, ...: early counts are noisy, so
# the set is revised, but ever more rarely, so it settles and pinned experts are loaded once.
# (Cumulative counts, not the eviction policy's decayed ones: those follow the last few
# tokens, while a pin should hold what is used most in the long run.)
FIRST_AUTO_PIN_PASS = 32


@dataclass(frozen=True)
class Pins:
    """Experts to pin: `keys` all of them (an error if the budget leaves too few slots), or,
    `ranked`, the first of them as far as the pin share allows. `where` names their source
    in errors (a file)."""

    keys: tuple[Key, ...]
    ranked: bool = False
    where: str = "pins"


def pin_capacity(n_slots: int, share: float, top_k: int) -> int:
    """Slots pinning may take: `share` of them, leaving `top_k` for one token's experts."""
    check_share(share)
    return max(0, min(int(share * n_slots), n_slots - top_k))


def check_share(share: float) -> None:
    if not 0 <= share <= MAX_SHARE:
        raise ConfigError(f"--pin-share must be between 0 and {MAX_SHARE}, got {share}")


def most_frequent(counts: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` largest counts (ties: lower index first), never a zero count."""
    order = np.argsort(-counts, kind="stable")[:n]
    return order[counts[order] > 0]


def check_pins(pairs, config: ModelConfig, capacity: int, where: str = "pins") -> list[Key]:
    """`pairs` as a list of distinct (layer, expert) keys of the model, at most `capacity`."""
    keys = check_pairs(pairs, config, where)
    if len(keys) > capacity:
        raise ConfigError(
            f"{where}: pins {len(keys)} experts, but the budget leaves room for {capacity} "
            "(raise --ram-budget or --pin-share)"
        )
    return keys


def check_pairs(pairs, config: ModelConfig, path: str = "pins") -> list[Key]:
    """`pairs` as distinct (layer, expert) keys of the model, in order; else a one-line error."""
    moe, n = set(config.moe_layers), config.num_local_experts
    if not isinstance(pairs, list):
        raise ConfigError(f"{path}: not a JSON list of [layer, expert] pairs")
    keys: dict[Key, None] = {}  # ordered, duplicates once
    for item in pairs:
        ok = (
            isinstance(item, list | tuple)
            and len(item) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in item)
        )
        if not ok:
            raise ConfigError(f"{path}: {item!r} is not a [layer, expert] pair of integers")
        layer, expert = item
        if layer not in moe or not 0 <= expert < n:
            raise ConfigError(
                f"{path}: no expert {expert} at layer {layer} (MoE layers "
                f"{min(moe)}..{max(moe)}, experts 0..{n - 1})"
            )
        keys[(layer, expert)] = None
    return list(keys)


class AutoPins:
    """Chooses pins from how often each expert was acquired, at passes 32, 64, 128, ..."""

    def __init__(self, moe_layers: Sequence[int], n_experts: int, capacity: int) -> None:
        self.layers, self.n_experts, self.capacity = tuple(moe_layers), n_experts, capacity
        self.counts = np.zeros(len(self.layers) * n_experts, np.int64)
        self._ordinal = {layer: j for j, layer in enumerate(self.layers)}
        self._next_choice = FIRST_AUTO_PIN_PASS

    def count(self, layer: int, expert: int) -> None:
        self.counts[self._ordinal[layer] * self.n_experts + expert] += 1

    def due(self, passes: int) -> bool:
        """Whether `passes` forward passes call for a (new) choice; advances the schedule."""
        if passes < self._next_choice:
            return False
        self._next_choice *= 2
        return True

    def choose(self) -> set[Key]:
        n = self.n_experts
        return {
            (self.layers[int(i) // n], int(i) % n)
            for i in most_frequent(self.counts, self.capacity)
        }
