"""A small learned speculator: an MLP from the last layers' routing to the experts ahead.

Input: the multi-hot of the experts chosen at the last `window` MoE layers (this
token's, then the previous token's last ones), through input weights of the source
layer (expert 5 means something else at each layer), plus an embedding of the
distance; two GELU layers; output: logits over the experts of the target layer
through that layer's own output weights. One network serves every (layer,
distance): batches are drawn from one (layer, distance) at a time, so each is a
few plain matrix products. Trained with binary cross-entropy against the
experts really chosen, by `mer train-speculator`; saved with what it was trained
on, so a benchmark can tell when it would be judged on its own training data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mer.errors import ConfigError
from mer.predict.base import Predictor, check_distance, check_shape, multi_hot, shifted
from mer.progress import progress_bar
from mer.trace.format import Trace

FORMAT = "mer-speculator"
VERSION = 1


@dataclass(frozen=True)
class SpeculatorConfig:
    n_layers: int
    n_experts: int
    top_k: int
    window: int = 3  # source layers seen: this one and the window - 1 before it
    max_distance: int = 3
    hidden: int = 256


class SpeculatorNet(torch.nn.Module):
    def __init__(self, c: SpeculatorConfig) -> None:
        super().__init__()
        self.c = c
        n_in = c.window * c.n_experts
        # Multi-hot inputs have window * top_k ones: scaled so the first layer starts ~N(0, 1).
        scale_in, scale_out = 1 / math.sqrt(c.window * c.top_k), 1 / math.sqrt(c.hidden)

        # One parameter per layer, not one bank indexed by layer: a batch (all of one layer)
        # then gives gradients, and optimizer work, only to its own layer's weights.
        def per_layer(*shape: int, scale: float = 0.0) -> torch.nn.ParameterList:
            return torch.nn.ParameterList(
                torch.nn.Parameter(torch.randn(*shape) * scale) for _ in range(c.n_layers)
            )

        self.w_in = per_layer(n_in, c.hidden, scale=scale_in)
        self.b_in = per_layer(c.hidden)
        self.distance = torch.nn.Parameter(torch.zeros(c.max_distance, c.hidden))
        self.mid = torch.nn.Linear(c.hidden, c.hidden)
        self.w_out = per_layer(c.hidden, c.n_experts, scale=scale_out)
        self.b_out = per_layer(c.n_experts)

    def forward(self, x: torch.Tensor, layer: int, distance: int) -> torch.Tensor:
        """x [B, window * E] (all from `layer`) -> logits [B, E] of layer + distance."""
        target = (layer + distance) % self.c.n_layers
        h = F.gelu(x @ self.w_in[layer] + self.b_in[layer] + self.distance[distance - 1])
        h = F.gelu(self.mid(h))  # [B, hidden]
        return h @ self.w_out[target] + self.b_out[target]


def features(trace: Trace, layer: int, window: int) -> np.ndarray:
    """float32 [T, window * E]: the multi-hot routing of `layer` and the window - 1 before."""
    parts = []
    for back in range(window):
        ok, experts = shifted(trace, layer, -back)
        parts.append(multi_hot(experts, trace.n_experts, ok))
    return np.concatenate(parts, 1)


class SpeculatorPredictor(Predictor):
    name = "speculator"

    def __init__(self, net: SpeculatorNet, info: dict | None = None) -> None:
        self.net = net.eval()
        self.info = info or {}

    @property
    def config(self) -> SpeculatorConfig:
        return self.net.c

    @torch.inference_mode()
    def scores(self, trace: Trace, layer: int, distance: int) -> np.ndarray:
        c = self.config
        check_shape(trace, c.n_layers, c.n_experts, "the speculator")
        check_distance(distance, c.max_distance, "the speculator")
        x = torch.from_numpy(features(trace, layer, c.window))
        return torch.sigmoid(self.net(x, layer, distance)).numpy()

    def save(self, path: str | Path) -> None:
        torch.save(
            {"format": FORMAT, "version": VERSION, "config": asdict(self.config),
             "state": self.net.state_dict(), "info": self.info},
            path,
        )  # fmt: skip


def load_speculator(path: str | Path) -> SpeculatorPredictor:
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such speculator file") from None
    except Exception as e:  # torch raises many kinds for a file that is not its own
        raise ConfigError(f"{path}: not a speculator file ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a speculator file (from mer train-speculator)")
    if blob.get("version") != VERSION:
        raise ConfigError(f"{path}: speculator format version {blob.get('version')}, "
                          f"this mer reads {VERSION}")  # fmt: skip
    try:
        net = SpeculatorNet(SpeculatorConfig(**blob["config"]))
        net.load_state_dict(blob["state"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ConfigError(f"{path}: damaged speculator file ({type(e).__name__})") from None
    return SpeculatorPredictor(net, blob.get("info", {}))


@dataclass
class _Data:
    """One trace's training examples, grouped by (layer, distance)."""

    x: dict[int, torch.Tensor]  # layer -> features [T, window * E]
    y: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]  # (l, d) -> (rows, targets)


def _examples(trace: Trace, c: SpeculatorConfig) -> _Data:
    """Kept as uint8 (0/1), a quarter of float32; a batch at a time is made float."""
    x = {m: _bits(features(trace, m, c.window)) for m in range(c.n_layers)}
    y = {}
    for m in range(c.n_layers):
        for d in range(1, c.max_distance + 1):
            ok, experts = shifted(trace, m, d)
            rows = np.nonzero(ok)[0]
            y[m, d] = (torch.from_numpy(rows), _bits(multi_hot(experts[rows], c.n_experts)))
    return _Data(x, y)


def _bits(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint8))


def train_speculator(
    traces: list[Trace],
    epochs: int = 3,
    hidden: int = 256,
    window: int = 3,
    max_distance: int = 3,
    batch: int = 512,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    info: dict | None = None,
) -> SpeculatorPredictor:
    """Train on the given traces (all of one shape); deterministic for a seed."""
    first = traces[0]
    for t in traces[1:]:
        check_shape(t, first.n_layers, first.n_experts, "the first training trace")
    c = SpeculatorConfig(first.n_layers, first.n_experts, first.top_k, window, max_distance, hidden)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = SpeculatorNet(c)
    data = [_examples(t, c) for t in traces]
    # Every batch comes from one (trace, layer, distance): its weights are one slice.
    groups = [(i, key) for i, dd in enumerate(data) for key, (rows, _) in dd.y.items() if len(rows)]
    sizes = {g: len(data[g[0]].y[g[1]][0]) for g in groups}
    per_epoch = sum(math.ceil(n / batch) for n in sizes.values())
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, lr, total_steps=epochs * per_epoch, pct_start=0.1
    )
    losses = []
    with progress_bar(epochs * per_epoch, "training speculator", progress, unit="batches") as bar:
        for epoch in range(epochs):
            order = [(g, a) for g in groups for a in range(0, sizes[g], batch)]
            shuffles = {g: torch.from_numpy(rng.permutation(sizes[g])) for g in groups}
            total = 0.0
            for j in rng.permutation(len(order)):
                (i, (m, d)), a = order[j]
                pick = shuffles[(i, (m, d))][a : a + batch]
                rows, target = data[i].y[m, d]
                logits = net(data[i].x[m][rows[pick]].float(), m, d)
                loss = F.binary_cross_entropy_with_logits(logits, target[pick].float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item()
                bar.advance()
            losses.append(total / per_epoch)
            bar.describe(f"training speculator (epoch {epoch + 1} loss {losses[-1]:.4f})")
    meta = dict(info or {}, epochs=epochs, seed=seed, batch=batch, lr=lr, epoch_losses=losses)
    return SpeculatorPredictor(net, meta)
