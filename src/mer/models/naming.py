"""Which resident tensors a model has, their shapes, and their names in a family's checkpoint.

mer names every resident tensor the same way whatever the family (`embed`,
`layers.3.q`, `layers.3.shared.down`, ...). What exists and its shape follow
from the config and are the family's to say (`Family.layer_shapes`); the family
also supplies the Hugging Face name template of each, so the converter can map
them once, offline. These functions put the two together for a whole model.
"""

from __future__ import annotations

from mer.models.config import ModelConfig
from mer.models.family import Family


def global_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return cfg.family.global_shapes(cfg)


def layer_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Short name (without `layers.{i}.`) -> shape, for every resident tensor of layer i."""
    return cfg.family.layer_shapes(cfg, i)


def dense_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """mer name -> shape for every resident tensor."""
    shapes = global_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        shapes.update({f"layers.{i}.{k}": s for k, s in layer_shapes(cfg, i).items()})
    return shapes


def dense_names(fam: Family, cfg: ModelConfig) -> dict[str, str]:
    """Hugging Face name -> mer name for every resident tensor of this config."""
    names = {fam.GLOBAL[k]: k for k in global_shapes(cfg)}
    for i in range(cfg.num_hidden_layers):
        for short in layer_shapes(cfg, i):
            names[fam.LAYER[short].format(i=i)] = f"layers.{i}.{short}"
    return names


def expert_names(fam: Family, layer: int, expert: int) -> dict[str, str]:
    """w1 (gate), w2 (down), w3 (up) -> Hugging Face names of one routed expert."""
    return {w: hf.format(i=layer, e=expert) for w, hf in fam.EXPERT.items()}


def expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    return cfg.family.expert_shapes(cfg)
