"""The one list of model families, and how a config or a name finds its family.

A family is a `Family` subclass in its own module (`mer.models.family`); each
module lists its families in `FAMILIES`. Adding a family is adding its module
to `MODULES`: the config reader, the converter, the synthetic checkpoints, the
forward pass and the GGUF reader all find it here. Modules are imported on the
first lookup, not at import time (a family module imports `ModelConfig`, whose
`from_hf` looks families up here).
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING, Any

from mer.errors import ConfigError

if TYPE_CHECKING:
    from mer.models.family import Family

MODULES = (
    "mer.models.mixtral",
    "mer.models.qwen_moe",
    "mer.models.olmoe",
    "mer.models.gpt_oss",
    "mer.models.deepseek",
    "mer.models.glm",
)


@cache
def families() -> tuple[Family, ...]:
    """Every registered family, in registry order."""
    return tuple(f for m in MODULES for f in importlib.import_module(m).FAMILIES)


def family(model_type: str) -> Family:
    """The family serving `model_type` (ours, or any of the Hugging Face spellings it takes)."""
    for f in families():
        if model_type == f.name or model_type in f.model_types:
            return f
    raise ConfigError(
        f"model type {model_type!r} is not supported (supported: "
        f"{', '.join(f.name for f in families())})"
    )


def family_of(hf: dict[str, Any], where: str = "config.json") -> Family:
    """The family of a `config.json` dict: by `model_type`, else by its first architecture."""
    model_type, archs = hf.get("model_type"), hf.get("architectures") or []
    for f in families():
        if model_type is not None:
            if model_type == f.name or model_type in f.model_types:
                return f
        elif archs and archs[0] in f.architectures:
            return f
    found = model_type or (archs[0] if archs else "nothing")
    supported = [a for f in families() for a in f.architectures]
    raise ConfigError(
        f"{where}: unsupported architecture {found!r} (supported: {', '.join(supported)})"
    )


def family_for_gguf(arch: str) -> Family:
    """The family of a GGUF file's `general.architecture` (e.g. "qwen3moe")."""
    for f in families():
        if arch in f.gguf_architectures:
            return f
    supported = [a for f in families() for a in f.gguf_architectures]
    raise ConfigError(
        f"GGUF architecture {arch!r} is not supported (supported: {', '.join(supported)})"
    )
