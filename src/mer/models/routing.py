"""Cache-aware routing: an opt-in change of the router's choice that reads fewer experts.

Exact routing (the default) leaves the family's top-k untouched. Cache-aware routing
adjusts it per token and MoE layer, after the family routed, from the router's scores
over all experts (`Family.router_scores`, [T, E]) and which experts are resident:

- the top-1 pick is always kept;
- a later pick that is not resident is swapped for the best-scoring resident expert
  not picked yet whose score is at least the pick's minus the slack;
- a non-resident pick with no such substitute is dropped when its renormalised weight
  (its share of the picks' weights) is below the drop threshold (the slack by default);
- the weights of what remains are the router's scores of the kept experts, scaled to the
  sum the family's weights had (1 when the family renormalises). Tokens with nothing
  changed keep the family's weights bit for bit.

A dropped pick stays in the [T, k] shape as the top-1 expert with weight 0, so the MoE
block, the hooks and the trace keep their shapes and the dropped expert is never read.

Residency is a snapshot taken once per layer before the rule runs: an expert counts as
resident once its read has been issued (in flight or done), so the same prompt with the
same cache state gives the same routing whatever the reader threads are doing. The rule
knows nothing about the cache beyond that boolean mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mer.errors import ConfigError

ROUTINGS = ("exact", "cache-aware")
DEFAULT_SLACK = 0.1


@dataclass
class RoutingStats:
    picks: int = 0  # token-expert picks the router made under cache-aware routing
    substituted: int = 0  # non-resident picks replaced by a resident expert
    dropped: int = 0  # non-resident picks left out


def cache_aware(
    scores: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    resident: torch.Tensor,
    slack: float,
    drop: float,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The rule above on one layer: scores [T, E] float32, weights [T, k] float32, ids
    [T, k] (top-1 first), resident bool [E] -> (weights, ids, substituted, dropped)."""
    t, k = ids.shape
    if k < 2:
        return weights, ids, 0, 0
    miss = ~resident[ids[:, 1:]]  # [T, k-1]: non-resident later picks
    rows = miss.any(1).nonzero().flatten().tolist()
    if not rows:
        return weights, ids, 0, 0
    weights, ids = weights.clone(), ids.clone()
    sub = dropped = 0
    total = weights.sum(-1)  # [T]
    for r in rows:
        s, picked = scores[r], ids[r].tolist()
        kept = [picked[0]]
        share = (weights[r] / total[r]).tolist()
        for j in range(1, k):
            e = picked[j]
            if resident[e]:
                kept.append(e)
                continue
            free = resident.clone()
            free[picked + kept] = False
            candidates = torch.where(free & (s >= s[e] - slack), s, float("-inf"))
            best = int(candidates.argmax())
            if candidates[best] > float("-inf"):
                kept.append(best)
                sub += 1
            elif share[j] < drop:
                dropped += 1
            else:
                kept.append(e)
        mass = s[kept]
        new_w = mass * (total[r] / mass.sum())
        pad = k - len(kept)
        ids[r] = torch.tensor(kept + [kept[0]] * pad)
        weights[r] = torch.cat([new_w, new_w.new_zeros(pad)])
    return weights, ids, sub, dropped


class CacheAwareRouting:
    """The post-routing adjustment the transformer applies (`MoETransformer.routing`)."""

    def __init__(self, slack: float = DEFAULT_SLACK, drop: float | None = None) -> None:
        check_slack(slack)
        self.slack = slack
        self.drop = slack if drop is None else drop
        self.stats = RoutingStats()

    def adjust(self, m, i: int, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        """(weights, ids) of layer `i` for h [T, H] after the family's exact routing."""
        resident = m._resident(i, held=True)  # a read in flight counts: a fixed rule
        scores = m.family.router_scores(m, i, h)  # [T, E] float32
        weights, ids, sub, dropped = cache_aware(
            scores, weights, ids, resident, self.slack, self.drop
        )
        self.stats.picks += ids.numel()
        self.stats.substituted += sub
        self.stats.dropped += dropped
        return weights, ids


def check_slack(slack: float) -> None:
    if not 0 <= slack <= 1:
        raise ConfigError(f"routing slack must be between 0 and 1, got {slack}")


def make_routing(routing: str, slack: float = DEFAULT_SLACK) -> CacheAwareRouting | None:
    """None for exact routing, else the cache-aware adjustment with that slack."""
    if routing not in ROUTINGS:
        raise ConfigError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    check_slack(slack)
    return CacheAwareRouting(slack) if routing == "cache-aware" else None
