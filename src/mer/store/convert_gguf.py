"""GGUF file (or split set) -> mer store, one tensor (one expert) at a time.

`plan` reads only the header and decides everything before a byte is written:
the config (from `<arch>.*` metadata and the tensors present), every tensor's
mer name and shape, and what happens to each GGUF tensor type. Then dense
tensors are dequantized by `gguf` and stored in bf16, and each expert is read
slice by slice from its layer's stacked tensors and encoded into its extent.

Expert choices, per GGUF type, for an int4 store:
- Q4_0 alone (every expert tensor of the file): an int4-sym store, whose
  nibbles and float16 scales are the file's blocks bit for bit, 4.5 bits a
  weight as in the file.
- Q4_0, Q4_1, Q4_K at group size 32 otherwise: the nibbles are kept and the
  block scales and mins become int4 scales and zeros (mer.quant.gguf_blocks),
  exact up to rounding scale and zero to bf16.
- everything else (Q8_0, Q5_K, Q6_K, MXFP4, F16, BF16, F32): dequantized by
  `gguf` and requantized to int4 at the store's group size. The alternative,
  an int8 store (`--quant int8`), keeps them closer at 1.6x the bytes read
  per expert; the conversion prints the error each choice measured.
int8 and bf16 stores take every type through `gguf`'s dequantization.
An mxfp4 store (gpt-oss) keeps MXFP4 experts bit for bit (ggml's block layout
turned back into the checkpoint's); other types are rounded to MXFP4.
Expert biases (gpt-oss) are stored in float32, as the file holds them.
The tokenizer and chat template come from the file's `tokenizer.*` metadata,
built into tokenizer.json by transformers' GGUF converter.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mer.config import ModelConfig
from mer.errors import ConvertError
from mer.models import naming
from mer.progress import progress_bar
from mer.quant import gguf_blocks, int4
from mer.quant.expert import SCHEMES, ExpertFormat
from mer.store import gguf_arch
from mer.store.gguf_source import GGUFSource
from mer.store.writer import StoreWriter

EXACT_ACTION = "int4 g32, blocks kept (scale, zero -> bf16)"
SYMMETRIC_ACTION = "int4-sym g32, blocks kept bit for bit"
MXFP4_ACTION = "mxfp4, blocks kept"
BIAS_ACTION = "expert bias, float32"
DENSE_ACTION = "dense, bf16"
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "MXFP4")


@dataclass
class Plan:
    """Everything decided from the header: what each tensor becomes."""

    cfg: ModelConfig
    hf_config: dict
    arch: gguf_arch.GGUFArch
    expert_format: ExpertFormat
    dense: dict[str, str]  # mer name -> GGUF name
    # layer -> {"w1","w3","w2" or "w13"} -> GGUF stack, or a per-expert name with "{e}"
    experts: dict[int, dict[str, str]]
    rows: list[tuple[str, str, tuple[int, ...], str, str]] = field(default_factory=list)
    # (GGUF name, type, shape, mer name, action)

    def exact(self, type_name: str) -> bool:
        ef = self.expert_format
        if ef.group_size != 32:
            return False
        if ef.scheme == "int4-sym":
            return type_name == "Q4_0"
        return ef.scheme == "int4" and type_name in gguf_blocks.EXACT_TYPES

    def native(self, type_name: str) -> bool:
        return self.expert_format.scheme == "mxfp4" and type_name == "MXFP4"

    def action(self, type_name: str, expert: bool | str) -> str:
        if expert == "bias":
            return BIAS_ACTION
        if not expert:
            return DENSE_ACTION  # until the writer says what it stored (convert_gguf)
        ef = self.expert_format
        if self.exact(type_name):
            return SYMMETRIC_ACTION if ef.scheme == "int4-sym" else EXACT_ACTION
        if self.native(type_name):
            return MXFP4_ACTION
        if ef.scheme == "mxfp4":
            return "mxfp4, requantized"
        if ef.scheme in ("int4", "int4-sym"):
            return f"{ef.scheme} g{ef.group_size}, requantized"
        if ef.scheme == "int8":
            return "int8 per row, requantized"
        return "bf16"


def _expert_layout(
    layer: int, shapes: dict, cfg: ModelConfig
) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """The tensors holding `layer`'s experts as the file lays them out (stacked gate/up/down,
    fused gate_up, or one tensor per expert), and each one's expected shape and mer name."""
    e, h, f = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    split = {w: n.format(i=layer) for w, n in gguf_arch.EXPERT_NAMES.items()}
    biases = {}
    if cfg.family.expert_bias:
        biases = {b: n.format(i=layer) for b, n in gguf_arch.EXPERT_BIAS_NAMES.items()}
    fused = gguf_arch.FUSED_GATE_UP.format(i=layer)
    single = {w: n.format(i=layer) for w, n in gguf_arch.PER_EXPERT_NAMES.items()}
    at = f"layers.{layer}.experts"
    if single["w2"].format(e=0) in shapes and split["w2"] not in shapes:
        parts = (("w1", (f, h), "gate"), ("w3", (f, h), "up"), ("w2", (h, f), "down"))
        expected = {
            single[w].format(e=x): (shape, f"{at}.{x}.{part}")
            for x in range(e)
            for w, shape, part in parts
        }
        return single, expected
    expected = {split["w2"]: ((e, h, f), f"{at}.down")}
    if fused in shapes:
        expected[fused] = ((e, 2 * f, h), f"{at}.gate_up")
        return {"w13": fused, "w2": split["w2"]}, expected
    expected[split["w1"]] = ((e, f, h), f"{at}.gate")
    expected[split["w3"]] = ((e, f, h), f"{at}.up")
    if biases:  # gpt-oss: biases of gate, up (rows of each) and down
        expected[biases["b1"]] = ((e, f), f"{at}.gate_bias")
        expected[biases["b3"]] = ((e, f), f"{at}.up_bias")
        expected[biases["b2"]] = ((e, h), f"{at}.down_bias")
    return split | biases, expected


def plan(source: GGUFSource, quant: str = "int4", group_size: int | None = None) -> Plan:
    """Check the file and decide every tensor's fate; raises ConvertError on anything amiss."""
    where = str(source.path)
    if quant not in SCHEMES:
        raise ConvertError(f"unknown --quant {quant!r} (choose from {', '.join(SCHEMES)})")
    arch = gguf_arch.arch_of(source.meta, where)
    shapes = source.shapes()
    hf = gguf_arch.hf_config(source.meta, shapes, where)
    cfg = ModelConfig.from_hf(hf, where=where)
    if group_size is None:
        group_size = 32  # GGUF's own block: keeps 4-bit blocks exact
    try:
        bias = "float32" if cfg.family.expert_bias else ""
        ef = ExpertFormat.for_machine(
            quant, cfg.hidden_size, cfg.intermediate_size, group_size, bias=bias
        )
    except ValueError as e:
        raise ConvertError(f"{where}: cannot store experts as {quant}: {e}") from None

    want = naming.dense_shapes(cfg)
    names = [n for n in want if not (n == "lm_head" and cfg.tie_word_embeddings)]
    dense = gguf_arch.gguf_names(names, cfg.num_hidden_layers, arch)
    p = Plan(cfg, hf, arch, ef, dense, {})
    # name -> shape, mer name, expert (True, False, or "bias")
    expected: dict[str, tuple[tuple[int, ...], str, bool | str]] = {}
    for ours, g in dense.items():
        expected[g] = (want[ours], ours, False)
    for ours, g in list(dense.items()):  # newer deepseek2 files: kv_b split in k_b and v_b
        k_b = g.replace("attn_kv_b", "attn_k_b")
        if g.endswith("attn_kv_b.weight") and g not in source and k_b in source:
            heads, r = cfg.num_attention_heads, cfg.kv_lora_rank
            dense[ours] = k_b
            del expected[g]
            expected[k_b] = ((heads, r, cfg.qk_nope_head_dim), ours, False)
            expected[g.replace("attn_kv_b", "attn_v_b")] = ((heads, cfg.v_head_dim, r), ours, False)
    for layer in cfg.moe_layers:
        p.experts[layer], tensors = _expert_layout(layer, shapes, cfg)
        expected.update({
            g: (shape, ours, "bias" if ours.endswith("_bias") else True)
            for g, (shape, ours) in tensors.items()
        })  # fmt: skip

    missing = [g for g in expected if g not in source]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConvertError(f"{where}: missing tensors {', '.join(missing[:3])}{more}")
    expert_types = {source.tensors[g].type_name for g, (_, _, x) in expected.items() if x is True}
    if quant == "int4" and group_size == 32 and expert_types == {"Q4_0"}:
        # Q4_0 is symmetric: its blocks kept as they are read 10% fewer bytes than as pairs
        p.expert_format = replace(ef, scheme="int4-sym")
    # A tensor nobody asked for would be silently dropped (a router bias, a rope table):
    # refuse rather than convert a different model.
    mtp = range(cfg.num_hidden_layers, cfg.num_hidden_layers + gguf_arch.mtp_layers(source.meta))
    unused = [  # a glm4moe file's MTP layers are not part of the model: not read
        g for g in source.tensors
        if g not in expected and not (g.startswith("blk.") and int(g.split(".")[1]) in mtp)
    ]  # fmt: skip
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        raise ConvertError(
            f"{where}: tensors {', '.join(unused[:3])}{more} have no place in a "
            f"{cfg.model_type} store (converting would drop them)"
        )
    for g, (shape, ours, expert) in expected.items():
        t = source.tensors[g]
        if t.type_name not in SUPPORTED_TYPES:
            raise ConvertError(
                f"{t.path}: tensor {g} has type {t.type_name}, which mer does not convert "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )
        if expert == "bias" and t.type_name not in ("F32", "F16", "BF16"):
            raise ConvertError(f"{t.path}: expert bias {g} has type {t.type_name}, not a float")
        same = t.shape == shape or (not expert and _numel(t.shape) == _numel(shape) and
                                    len(shape) <= 2 and 1 in (*shape, *t.shape))  # fmt: skip
        if not same:
            raise ConvertError(
                f"{t.path}: tensor {g} has shape {list(t.shape)}, "
                f"the metadata implies {list(shape)}"
            )
        p.rows.append((g, t.type_name, t.shape, ours, p.action(t.type_name, expert)))
    return p


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k row permutation: interleaved RoPE pairs -> rotate-half."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dense_tensor(source: GGUFSource, p: Plan, ours: str) -> torch.Tensor:
    g = p.dense[ours]
    if g.endswith("attn_k_b.weight"):  # per head: W_uk^T [r, nope] and W_uv [v, r]
        k_b, v_b = source.floats(g), source.floats(g.replace("attn_k_b", "attn_v_b"))
        w = torch.cat([k_b.transpose(1, 2), v_b], 1)  # [H, nope + v, r]
        return w.reshape(naming.dense_shapes(p.cfg)[ours])
    w = source.floats(g).reshape(naming.dense_shapes(p.cfg)[ours])
    short = ours.rsplit(".", 1)[-1]
    if p.arch.permute_qk and short in ("q", "k"):
        heads = p.cfg.num_attention_heads if short == "q" else p.cfg.num_key_value_heads
        w = _unpermute_qk(w, heads)
    return w


def _where(p: Plan, name: str, e: int) -> tuple[str, int | None, int]:
    """(GGUF tensor, slice index or None for all of it, slices) holding expert e's `name`."""
    if "{e}" in name:
        return name.format(e=e), None, 1
    return name, e, p.cfg.num_local_experts


def _floats(source: GGUFSource, p: Plan, name: str, e: int) -> torch.Tensor:
    return source.floats(*_where(p, name, e))


def _int4_rows(source: GGUFSource, p: Plan, name: str, e: int):
    """One expert's slice of a stack as int4 (q, scales, zeros; for int4-sym q and scales),
    exactly where the type allows."""
    tensor, index, count = _where(p, name, e)
    t, ef = source.tensors[tensor], p.expert_format
    if p.exact(t.type_name):
        q, scales, zeros = gguf_blocks.decode(
            source.raw(tensor, index, count), t.type_name, t.shape[-1]
        )
        return (q, scales) if ef.scheme == "int4-sym" else (q, scales, zeros)
    w = source.floats(tensor, index, count)
    if ef.scheme == "int4-sym":
        return int4.quantize_symmetric(w, ef.group_size)
    return int4.quantize(w, ef.group_size)


def _mxfp4_parts(source: GGUFSource, p: Plan, name: str, e: int) -> dict[str, torch.Tensor]:
    """One expert's slice of an MXFP4 stack as the checkpoint's {"blocks", "scales"}, bit
    for bit. ggml's block is [scale byte, 16 bytes] with element j in byte j's low nibble and
    element j + 16 in its high one; the checkpoint packs elements 2j, 2j + 1 into byte j."""
    raw = source.raw(*_where(p, name, e))
    x = torch.from_numpy(raw.reshape(raw.shape[0], -1, 17))
    qs = x[..., 1:]
    codes = torch.cat([qs & 15, qs >> 4], -1)  # [rows, blocks, 32] in element order
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return {"blocks": blocks.contiguous(), "scales": x[..., 0].contiguous()}


def _biases(source: GGUFSource, p: Plan, names: dict, e: int) -> dict[str, torch.Tensor]:
    if "b2" not in names:
        return {}
    gate_up = torch.cat([_floats(source, p, names["b1"], e), _floats(source, p, names["b3"], e)])
    return {"gate_up_bias": gate_up, "down_bias": _floats(source, p, names["b2"], e)}


def expert_extent(source: GGUFSource, p: Plan, layer: int, e: int) -> torch.Tensor:
    """The store extent of expert (layer, e), reading only its slices of the stacks."""
    ef, names = p.expert_format, p.experts[layer]
    bias = _biases(source, p, names, e)
    stacks = [n for k, n in names.items() if k.startswith("w")]
    types = {source.tensors[_where(p, n, e)[0]].type_name for n in stacks}
    if "w13" not in names and types == {"MXFP4"} and ef.scheme == "mxfp4":
        gate, up = (_mxfp4_parts(source, p, names[w], e) for w in ("w1", "w3"))
        gate_up = {k: torch.cat([gate[k], up[k]]) for k in gate}
        down = _mxfp4_parts(source, p, names["w2"], e)
        return ef.encode_native(gate_up, down, bias.get("gate_up_bias"), bias.get("down_bias"))
    if ef.scheme in ("int4", "int4-sym"):
        parts = {}
        gate_up = [names["w13"]] if "w13" in names else [names["w1"], names["w3"]]
        for part, stacks in (("gate_up", gate_up), ("down", [names["w2"]])):
            pieces = [_int4_rows(source, p, n, e) for n in stacks]
            q, *scales = (torch.cat(x, 0) for x in zip(*pieces, strict=True))
            parts[f"{part}.packed"] = int4.pack(q, ef.layout)
            if ef.scheme == "int4-sym":
                parts[f"{part}.scales"] = int4.pack_scales(scales[0])
            else:
                parts[f"{part}.scales_zeros"] = int4.pack_scales_zeros(*scales)
        return ef.assemble(parts | ef._bias_parts(*bias.values()) if bias else parts)
    if "w13" in names:
        w1, w3 = _floats(source, p, names["w13"], e).chunk(2, 0)
    else:
        w1, w3 = _floats(source, p, names["w1"], e), _floats(source, p, names["w3"], e)
    return ef.encode(w1, _floats(source, p, names["w2"], e), w3, **bias)


def measure(source: GGUFSource, p: Plan, layer: int, e: int, extent: torch.Tensor) -> dict:
    """Error of the stored expert against `gguf`'s dequantization, per GGUF stack it came
    from: (max |error| / max |weight|, RMS error / RMS weight)."""
    ef, names = p.expert_format, p.experts[layer]
    w = ef.view(extent.clone())
    gate_up, down = w.gate_up.dequantize().float(), w.down.dequantize().float()
    got = {"w2": down}
    if "w13" in names:
        got["w13"] = gate_up
    else:
        got["w1"], got["w3"] = gate_up.chunk(2, 0)
    out = {}
    for key, stored in got.items():
        ref = _floats(source, p, names[key], e)
        err = stored - ref
        out[_where(p, names[key], e)[0]] = (
            (err.abs().max() / ref.abs().max().clamp_min(1e-30)).item(),
            (err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item(),
        )
    return out


def tokenizer_files(path: Path, out_dir: Path, meta: dict | None = None) -> list[Path]:
    """tokenizer.json and tokenizer_config.json (with the chat template) from the file's
    `tokenizer.ggml.*` metadata, built by transformers' own GGUF tokenizer converter.
    `meta` (the file's metadata) lets a sentencepiece vocabulary split text as llama.cpp
    and the original tokenizer.json do (`_spm_like_llama_cpp`)."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:  # pragma: no cover - a dependency
        raise ConvertError(f"{path}: reading a GGUF tokenizer needs transformers ({e})") from None
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises many kinds; the message is what helps
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConvertError(
            f"{path}: cannot build the tokenizer from its metadata ({first})"
        ) from None
    tok.save_pretrained(str(out_dir))
    meta = meta or {}
    if meta.get("tokenizer.ggml.model") == "llama":
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        _spm_like_llama_cpp(out_dir / "tokenizer.json", bool(prefix))
    return [p for p in sorted(out_dir.iterdir()) if p.is_file()]


def _spm_like_llama_cpp(tokenizer_json: Path, add_space_prefix: bool) -> None:
    """transformers 5 builds a sentencepiece (Llama/Mixtral) vocabulary with a Metaspace
    pre-tokenizer that adds no "▁" before text that starts with a space, so " Hello"
    encodes differently from llama.cpp and from Mixtral's own tokenizer.json (15 of the 46
    llama.cpp test strings). Those prepend "▁" to all text and turn spaces into "▁" in the
    normalizer; do the same (tested against llama.cpp's own vocabulary test vectors)."""
    from tokenizers import Tokenizer, normalizers

    tok = Tokenizer.from_file(str(tokenizer_json))
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.save(str(tokenizer_json))


def convert_gguf(
    src: str | Path,
    dst: str | Path,
    quant: str = "int4",
    group_size: int | None = None,
    force: bool = False,
    progress: bool = True,
    report: list | None = None,
    dense_quant: str = "bf16",
) -> Path:
    """Convert; `report`, if given, receives (type, action, tensors, measured error) rows;
    `dense_quant` as for `mer.store.convert.convert`."""
    src, dst = Path(src), Path(dst)
    with GGUFSource(src) as source:
        p = plan(source, quant, group_size)
        if "tokenizer.ggml.tokens" not in source.meta:
            raise ConvertError(f"{src}: missing metadata tokenizer.ggml.tokens (no tokenizer)")
        cfg, ef = p.cfg, p.expert_format
        total = sum(source.tensors[g].nbytes for g in p.dense.values()) + sum(
            _expert_nbytes(source, p, layer, e) for layer, e in cfg.expert_keys()
        )
        measured: dict[str, list] = {}  # GGUF type -> [(max, rms) ...] of parts it made
        with tempfile.TemporaryDirectory(prefix="mer-gguf-tok-") as tok_dir:
            tok_files = tokenizer_files(source.parts[0], Path(tok_dir), source.meta)
            with StoreWriter(dst, cfg, p.hf_config, ef, overwrite=force,
                             dense_quant=dense_quant) as writer:  # fmt: skip
                with progress_bar(total, f"convert {src.name} -> {ef.scheme}", progress) as bar:
                    for ours, g in p.dense.items():
                        writer.add_dense(ours, dense_tensor(source, p, ours))
                        bar.advance(source.tensors[g].nbytes)
                    # what the writer made of each (--dense-quant quantizes what it can)
                    p.rows = [(g, kind, shape, ours, f"dense, {writer.stored_as(ours)}")
                              if action == DENSE_ACTION else (g, kind, shape, ours, action)
                              for g, kind, shape, ours, action in p.rows]  # fmt: skip
                    for layer, e in cfg.expert_keys():
                        extent = expert_extent(source, p, layer, e)
                        writer.add_expert(layer, e, extent)
                        _record(source, p, layer, e, extent, measured)
                        bar.advance(_expert_nbytes(source, p, layer, e))
                for f in tok_files:
                    writer.add_tokenizer_file(f)
                path = writer.close()
    rows = _summary(p, measured)
    if report is not None:
        report.extend(rows)
    if progress:
        from mer.store.gguf_report import print_choices

        print_choices(rows)
    return path


def _expert_nbytes(source: GGUFSource, p: Plan, layer: int, e: int) -> int:
    """Bytes of the file that hold expert (layer, e)."""
    n = 0
    for name in p.experts[layer].values():  # biases included
        tensor, index, count = _where(p, name, e)
        n += source.tensors[tensor].nbytes // count
    return n


def _record(source, p: Plan, layer: int, e: int, extent, measured: dict) -> None:
    """Measure the first expert made from each GGUF type (cheap: one expert per type)."""
    tensors = (_where(p, n, e)[0] for k, n in p.experts[layer].items() if k.startswith("w"))
    kinds = {t: source.tensors[t].type_name for t in tensors}
    if all(k in measured for k in kinds.values()):
        return
    for name, err in measure(source, p, layer, e, extent).items():
        measured.setdefault(kinds[name], []).append(err)


def _summary(p: Plan, measured: dict) -> list[tuple[str, str, int, tuple | None]]:
    """(GGUF type, what it became, tensors, worst (max, rms) error measured or None) rows."""
    counts: dict[tuple[str, str], int] = {}
    for _, kind, _, _, action in p.rows:
        counts[(kind, action)] = counts.get((kind, action), 0) + 1
    rows = []
    for (kind, action), n in sorted(counts.items()):
        err = None
        if not action.startswith("dense") and kind in measured:
            err = tuple(max(m[i] for m in measured[kind]) for i in range(2))
        rows.append((kind, action, n, err))
    return rows
