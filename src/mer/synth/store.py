"""Writes a random int4 store directly, with no bf16 checkpoint in between.

A full-size Mixtral in bf16 (~94 GB) does not fit where its int4 store
(~25 GB) does, so size and speed tests build the store straight away: random
nibbles with weight-like scales for experts, the synthetic checkpoint's own
random tensors for the dense part, the same tokenizer. One expert is in
memory at a time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from mer.config import ModelConfig
from mer.errors import ConfigError
from mer.models import naming
from mer.models.registry import family
from mer.progress import progress_bar
from mer.quant import int4
from mer.quant.expert import ExpertFormat
from mer.store.writer import StoreWriter, dense_nbytes
from mer.synth.checkpoint import random_tensor, tensor_specs
from mer.synth.tokenizer import build_tokenizer, write_tokenizer_files


def random_int4_extent(ef: ExpertFormat, rng: np.random.Generator) -> torch.Tensor:
    """An int4 (or int4-sym) extent of random nibbles whose scales and zeros look like a
    trained model's."""
    buf = torch.from_numpy(rng.integers(0, 256, ef.nbytes, dtype=np.uint8))
    for p in ef.parts:
        if p.name.endswith((".scales_zeros", ".scales")):
            k = p.shape[0] * p.shape[1]  # groups
            fan_in = p.shape[0] * ef.group_size
            step = 5.0 / np.sqrt(fan_in) / 15  # a group of N(0, 1/fan_in) spans ~5 std
            sz = np.empty((k, 2), dtype=np.float32)
            sz[:, 0] = step * rng.uniform(0.6, 1.4, k)
            sz[:, 1] = 0.1 * step * rng.standard_normal(k)
            if p.dtype == torch.float16:  # scales alone
                t = torch.from_numpy(sz[:, 0].copy()).to(torch.float16)
            else:
                t = torch.from_numpy(sz).to(torch.bfloat16).reshape(-1)
            buf[p.offset : p.offset + p.nbytes] = t.view(torch.uint8)
    return buf


def write_random_store(
    out: str | Path,
    hf: dict,
    quant: str = "int4",
    group_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    dense_quant: str = "bf16",
) -> Path:
    """`dense_quant` ("int8", "int4") stores the quantizable dense matrices so (as convert)."""
    if quant not in ("int4", "int4-sym"):
        raise ValueError("random stores are int4 or int4-sym only")
    cfg = ModelConfig.from_hf(hf)
    group_size = group_size or int4.default_group_size(cfg.hidden_size, cfg.intermediate_size)
    try:
        ef = ExpertFormat.for_machine(quant, cfg.hidden_size, cfg.intermediate_size, group_size)
    except ValueError as e:
        raise ConfigError(f"cannot store experts as {quant}: {e}") from None
    names = naming.dense_names(family(cfg.model_type), cfg)
    dense = [(n, s) for n, s in tensor_specs(hf) if n in names]
    total = len(dense) + cfg.num_experts_total
    gen = torch.Generator()
    planned = dense_nbytes(s for _, s in dense)
    with StoreWriter(out, cfg, hf, ef, planned_bytes=planned, dense_quant=dense_quant) as writer:
        with progress_bar(total, f"synth store {Path(out).name}", progress, unit="tensors") as bar:
            for name, shape in dense:
                t = random_tensor(name, shape, gen, torch.bfloat16, seed, cfg.num_hidden_layers)
                writer.add_dense(names[name], t)
                bar.advance()
            for layer, e in cfg.expert_keys():
                rng = np.random.default_rng([seed, layer, e])
                writer.add_expert(layer, e, random_int4_extent(ef, rng))
                bar.advance()
        with tempfile.TemporaryDirectory() as tmp:
            write_tokenizer_files(
                Path(tmp), build_tokenizer(cfg.vocab_size), cfg.max_position_embeddings
            )
            for f in sorted(Path(tmp).iterdir()):
                writer.add_tokenizer_file(f)
        return writer.close()
