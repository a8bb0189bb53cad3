"""Hugging Face checkpoint directory -> mer store, one tensor at a time.

Everything is checked before a byte is written: the config, that every
tensor the family names exists with the shape the config implies, and that
the source dtypes are ones we read. Then dense tensors are copied and each
expert is quantized and placed, holding one expert in memory at a time, so
a checkpoint larger than RAM converts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mer.config import ModelConfig, read_json
from mer.errors import ConvertError
from mer.models import naming
from mer.models.registry import family
from mer.progress import progress_bar
from mer.quant import int4
from mer.quant.dense import DENSE_QUANTS
from mer.quant.expert import SCHEMES, ExpertFormat
from mer.store import format as fmt
from mer.store.hub import resolve_source
from mer.store.safetensors_source import SafetensorsSource
from mer.store.writer import StoreWriter, dense_nbytes

SOURCE_DTYPES = {"BF16", "F16", "F32"}


def convert(
    src: str | Path,  # a checkpoint directory, or a Hugging Face Hub repository id
    dst: str | Path,
    quant: str = "int4",
    group_size: int | None = None,
    force: bool = False,
    progress: bool = True,
    dense_quant: str = "bf16",
) -> Path:
    """`dense_quant` ("int8", "int4") stores the attention, shared-expert, dense-layer and
    output-head matrices quantized (`mer.quant.dense`); norms, routers, embedding stay."""
    if dense_quant not in DENSE_QUANTS:
        raise ConvertError(f"unknown --dense-quant {dense_quant!r} (choose from "
                           f"{', '.join(DENSE_QUANTS)})")  # fmt: skip
    if str(src).endswith(".gguf"):  # a GGUF file, or the first of a split set
        from mer.store.convert_gguf import convert_gguf

        return convert_gguf(src, dst, quant, group_size, force=force, progress=progress,
                            dense_quant=dense_quant)  # fmt: skip
    src, dst = resolve_source(src), Path(dst)
    if not src.is_dir():
        raise ConvertError(f"{src}: no such checkpoint directory")
    if quant not in SCHEMES:
        raise ConvertError(f"unknown --quant {quant!r} (choose from {', '.join(SCHEMES)})")
    if dst.resolve() == src.resolve() or dst.resolve() in src.resolve().parents:
        raise ConvertError(
            f"{dst}: is (or contains) the source checkpoint {src}; a convert never writes "
            "over its source, choose another destination"
        )
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{config_path}: missing (not a Hugging Face checkpoint?)")
    hf_config = read_json(config_path)
    cfg = ModelConfig.from_hf(hf_config, where=str(config_path))
    fam = family(cfg.model_type)
    if group_size is None:
        group_size = int4.default_group_size(cfg.hidden_size, cfg.intermediate_size)
    try:
        ef = ExpertFormat.for_machine(
            quant, cfg.hidden_size, cfg.intermediate_size, group_size, bias=fam.expert_bias
        )
    except ValueError as e:
        raise ConvertError(f"{src}: cannot store experts as {quant}: {e}") from None

    with SafetensorsSource(src) as source:
        dense = {
            hf: ours
            for hf, ours in naming.dense_names(fam, cfg).items()
            if not (ours == "lm_head" and cfg.tie_word_embeddings and hf not in source)
        }
        _check_tensors(source, cfg, fam, dense)

        expert_bytes = sum(
            _nbytes(source, hf)
            for layer in cfg.moe_layers
            for hf in fam.expert_tensors(cfg, layer, source)
        )
        per_expert = expert_bytes // max(1, cfg.num_experts_total)
        total = sum(_nbytes(source, hf) for hf in dense) + expert_bytes
        tokenizer_files = [src / n for n in fmt.TOKENIZER_FILES if (src / n).is_file()]
        planned = dense_nbytes(source.info(hf)[0] for hf in dense) + sum(
            f.stat().st_size for f in tokenizer_files
        )
        with StoreWriter(dst, cfg, hf_config, ef, overwrite=force, planned_bytes=planned,
                         dense_quant=dense_quant) as writer:  # fmt: skip
            with progress_bar(total, f"convert {src.name} -> {quant}", progress) as bar:
                for hf, ours in dense.items():
                    t = source.get(hf)
                    # What the family computes in float32 keeps float32 precision if it has it.
                    keep = t.dtype == torch.float32 and ours.rsplit(".", 1)[-1] in fam.keep_float32
                    writer.add_dense(ours, t, torch.float32 if keep else None)
                    bar.advance(_nbytes(source, hf))
                for layer, e in cfg.expert_keys():
                    writer.add_expert(layer, e, fam.expert_extent(source, cfg, layer, e, ef))
                    bar.advance(per_expert)
            for f in tokenizer_files:
                writer.add_tokenizer_file(f)
            return writer.close()


def _nbytes(source: SafetensorsSource, name: str) -> int:
    shape, dtype = source.info(name)
    n = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}.get(dtype, 4)
    for d in shape:
        n *= d
    return n


def _check_tensors(source: SafetensorsSource, cfg: ModelConfig, fam, dense: dict) -> None:
    """Every tensor present with the shape and dtype we expect, before writing anything."""
    expected: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
    shapes = naming.dense_shapes(cfg)
    for hf, ours in dense.items():
        expected[hf] = shapes[ours], tuple(SOURCE_DTYPES)
    for layer in cfg.moe_layers:
        expected.update(fam.expert_tensors(cfg, layer, source))
    missing = [name for name in expected if name not in source]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConvertError(f"checkpoint is missing tensors: {', '.join(missing[:3])}{more}")
    for name, (want, dtypes) in expected.items():
        shape, dtype = source.info(name)
        if shape != want:
            raise ConvertError(
                f"{source.where(name)}: tensor {name} has shape {list(shape)}, "
                f"config.json implies {list(want)}"
            )
        if dtype not in dtypes:
            raise ConvertError(f"{source.where(name)}: tensor {name} has unsupported dtype {dtype}")
