"""Model configuration: one frozen dataclass built from a Hugging Face `config.json`.

Every part of mer reads model shapes from `ModelConfig`; nothing else parses
`config.json`. Field names follow the common Hugging Face spelling. `from_hf`
finds the family in the registry (by `model_type`, else by architecture), which
supplies its defaults, smooths its own spellings (`normalise`) and names its
config class (a subclass with the family's own fields); the differences common
to all (`num_local_experts` vs `num_experts`, `rope_theta` vs `rope_parameters`)
are smoothed here, once. Unknown keys are dropped. `from_hf` also reads back
what `to_dict` wrote (a store's manifest), so normalising is idempotent.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mer.errors import ConfigError
from mer.models.registry import family, family_of


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # routed expert FFN width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    head_dim: int
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    hidden_act: str = "silu"
    norm_topk_prob: bool = True  # renormalise the top-k router weights to sum to 1
    qk_norm: str = "none"  # "head": RMSNorm per head (Qwen3); "full": over the projection (OLMoE)
    qkv_bias: bool = False
    clip_qkv: float | None = None
    shared_expert_intermediate_size: int = 0  # a resident shared expert (Qwen: sigmoid-gated)
    dense_intermediate_size: int = 0  # FFN width of dense (non-MoE) layers
    dense_layers: tuple[int, ...] = ()  # layers with a plain MLP instead of experts

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
        """Normalise a Hugging Face config dict; `where` names the source in errors."""
        if not isinstance(hf, dict):
            raise ConfigError(f"{where}: expected a JSON object, got a {type(hf).__name__}")
        _check_types(hf, where)
        fam = family_of(hf, where)
        values = fam.normalise({**fam.defaults, **hf}, where)
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in (*fam.rope_types, None):
            raise ConfigError(f"{where}: rope scaling {rope_type!r} is not supported")
        values["model_type"] = fam.name
        values.setdefault("num_local_experts", hf.get("num_experts"))
        values["dense_layers"] = tuple(values.get("dense_layers") or ())
        values["rope_theta"] = hf.get("rope_theta", rope.get("rope_theta", 1e6))
        if not values.get("head_dim"):
            try:
                values["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
            except (KeyError, TypeError, ZeroDivisionError):
                pass
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = hf.get("num_attention_heads")
        cls = fam.config_class
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in values.items() if k in names and v is not None}
        try:
            config = cls(**kept)
        except TypeError as e:
            missing = sorted(
                f.name
                for f in dataclasses.fields(cls)
                if f.name not in kept and f.default is dataclasses.MISSING
            )
            raise ConfigError(f"{where}: missing fields {', '.join(missing)}") from e
        config.validate(where)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf(read_json(path), where=str(path))

    def validate(self, where: str = "config") -> None:
        ints = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.type == "int" and (f.default is dataclasses.MISSING or f.name.startswith("max_"))
        }
        for name, v in ints.items():
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{where}: {name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{where}: num_attention_heads ({self.num_attention_heads}) is not a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"{where}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})"
            )
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise ConfigError(f"{where}: {name} must be a positive number, got {v!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"{where}: hidden_act {self.hidden_act!r} is not supported")
        if self.qk_norm not in ("none", "head", "full"):
            raise ConfigError(f"{where}: qk_norm {self.qk_norm!r} is not one of none, head, full")
        if self.dense_layers and self.dense_intermediate_size <= 0:
            raise ConfigError(f"{where}: dense layers {self.dense_layers} need intermediate_size")

    @property
    def family(self):
        """The `Family` that serves this config (names, shapes, compute quirks)."""
        return family(self.model_type)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        dense = set(self.dense_layers)
        return tuple(i for i in range(self.num_hidden_layers) if i not in dense)

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def num_experts_total(self) -> int:
        return len(self.moe_layers) * self.num_local_experts

    def expert_keys(self) -> list[tuple[int, int]]:
        """Every routed expert as (layer, expert), in store order."""
        return [(m, e) for m in self.moe_layers for e in range(self.num_local_experts)]


def read_json(path: str | Path) -> Any:
    """A JSON file's value; missing, unreadable, not UTF-8 or not JSON: a one-line ConfigError."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


# The container fields `from_hf` reads before the dataclass can check anything: each must
# have its JSON type, or the normalisation itself would fail with a traceback.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "architectures": (list,),
    "model_type": (str,),
    "rope_parameters": (dict,),
    "rope_scaling": (dict,),
    "mlp_only_layers": (list,),
    "dense_layers": (list,),
    "decoder_sparse_step": (int,),
    "num_hidden_layers": (int,),
    "hidden_size": (int,),
    "num_attention_heads": (int,),
}


def _check_types(hf: dict, where: str) -> None:
    for name, types in _FIELD_TYPES.items():
        v = hf.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, types)):
            want = {list: "a list", dict: "an object", int: "an integer", str: "a string"}
            raise ConfigError(f"{where}: {name} must be {want[types[0]]}, got {v!r}")
    for name in ("architectures", "mlp_only_layers", "dense_layers"):
        items = hf.get(name) or []
        kind = str if name == "architectures" else int
        if any(isinstance(x, bool) or not isinstance(x, kind) for x in items):
            raise ConfigError(f"{where}: {name} has an entry that is not a {kind.__name__}")
