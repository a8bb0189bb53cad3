"""Checks a store manifest read from disk, field by field, before anything uses it.

A manifest may have been edited by hand or damaged: every field the reader relies on is
checked for presence, JSON type and range here, and the first bad one becomes a one-line
StoreError naming the file and the field (`dense.tensors['lm_head'].shape`). What passes
is safe to index, reshape and seek with. The model config inside is judged by
`ModelConfig.from_hf`, and whether files are as long as the manifest says by the reader.
"""

from __future__ import annotations

import math
from pathlib import Path

from mer.errors import StoreError
from mer.quant import dense as qdense
from mer.quant import int4
from mer.quant.expert import EXTENT_ALIGN, ExpertFormat
from mer.store import format as fmt

DENSE_DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}
PART_DTYPES = {**DENSE_DTYPES, "int8": 1, "uint8": 1}  # a quantized matrix's parts


def check_manifest(m, path: Path) -> ExpertFormat:
    """Raise StoreError at the first field of `m` that is missing or wrong; else the format."""

    def fail(field: str, problem: str):
        raise StoreError(f"{path}: field {field} {problem}")

    if not isinstance(m, dict) or m.get("format") != fmt.FORMAT_NAME:
        raise StoreError(f"{path}: not a mer store manifest")
    version = m.get("format_version")
    if not _is_int(version):
        fail("format_version", f"must be an integer, got {version!r}")
    if version > fmt.FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {version} is newer than this mer reads "
            f"(up to {fmt.FORMAT_VERSION}); upgrade mer (field format_version)"
        )
    if version < 1:
        fail("format_version", f"is {version}, not a format version (1 to {fmt.FORMAT_VERSION})")
    if not isinstance(m.get("model_config"), dict):
        fail("model_config", "must be an object")

    dense = _object(m, "dense", fail)
    _file_name(dense, "dense.file", fail)
    dense_size = _count(dense, "dense.nbytes", fail)
    tensors = dense.get("tensors")
    if not isinstance(tensors, dict):
        fail("dense.tensors", "must be an object of tensor name -> entry")
    quant = dense.get("quant", "bf16")
    if quant not in qdense.DENSE_QUANTS:
        fail("dense.quant", f"is {quant!r}, not one of {', '.join(qdense.DENSE_QUANTS)}")
    for name, t in tensors.items():
        where = f"dense.tensors[{name!r}]"
        if not isinstance(t, dict):
            fail(where, "must be an object")
        if "parts" in t:
            if version < 3:
                fail(f"{where}.parts", f"needs format version 3 (the manifest says {version})")
            _check_quantized(t, where, dense_size, fail)
        else:
            _check_entry(t, where, DENSE_DTYPES, dense_size, fail)

    experts = _object(m, "experts", fail)
    _file_name(experts, "experts.file", fail)
    experts_size = _count(experts, "experts.nbytes", fail)
    if not isinstance(experts.get("format"), dict):
        fail("experts.format", "must be an object")
    try:
        ef = ExpertFormat.from_dict(experts["format"])
    except (KeyError, TypeError, ValueError) as e:
        fail("experts.format", f"is not an expert format this mer reads ({e!r})")
    table = experts.get("table")
    if not isinstance(table, list):
        fail("experts.table", "must be a list of [layer, expert, offset, length, checksum]")
    seen = set()
    for i, row in enumerate(table):
        where = f"experts.table[{i}]"
        if (
            not isinstance(row, list)
            or len(row) != 5
            or not all(_is_int(x) and x >= 0 for x in row[:4])
            or not isinstance(row[4], str)
        ):
            fail(where, f"must be [layer, expert, offset, length, checksum], got {row!r}")
        layer, expert, offset, length, _ = row
        if length != ef.nbytes:
            fail(where, f"has length {length}; the expert format's extent is {ef.nbytes}")
        if offset % EXTENT_ALIGN or offset + length > experts_size:
            fail(where, f"offset {offset} is unaligned or runs past experts.nbytes")
        if (layer, expert) in seen:
            fail(where, f"repeats {fmt.expert_name(layer, expert)}")
        seen.add((layer, expert))
    if "shard" in m:
        _check_shard(m["shard"], fail)
    return ef


def _check_shard(shard, fail) -> None:
    """`shard`: {"index": i, "workers": n, "experts": [[layer, expert], ...]}, written by
    `mer store split` for one cluster worker."""
    if not isinstance(shard, dict):
        fail("shard", "must be an object")
    index, workers, experts = shard.get("index"), shard.get("workers"), shard.get("experts")
    if not (_is_int(workers) and workers >= 1):
        fail("shard.workers", f"must be a worker count, got {workers!r}")
    if not (_is_int(index) and 0 <= index < workers):
        fail("shard.index", f"must be a worker index below {workers}, got {index!r}")
    if not isinstance(experts, list) or not all(
        isinstance(k, list) and len(k) == 2 and all(_is_int(x) and x >= 0 for x in k)
        for k in experts
    ):
        fail("shard.experts", "must be a list of [layer, expert]")


def _check_entry(t, where: str, dtypes: dict, dense_size: int, fail) -> None:
    """One stored tensor: offset, size, dtype, shape and checksum fields."""
    if not isinstance(t, dict):
        fail(where, "must be an object")
    offset = _count(t, f"{where}.offset", fail)
    nbytes = _count(t, f"{where}.nbytes", fail)
    dtype, shape = t.get("dtype"), t.get("shape")
    if dtype not in dtypes:
        fail(f"{where}.dtype", f"is {dtype!r}, not one of {', '.join(dtypes)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        fail(f"{where}.shape", f"must be a list of sizes, got {shape!r}")
    if math.prod(shape) * dtypes[dtype] != nbytes:
        fail(f"{where}.shape", f"{shape} of {dtype} does not fill its {nbytes} bytes")
    if offset + nbytes > dense_size:
        fail(f"{where}.offset", f"{offset} + {nbytes} bytes runs past dense.nbytes")
    if not isinstance(t.get("checksum"), str):
        fail(f"{where}.checksum", "must be a string")


def _check_quantized(t: dict, where: str, dense_size: int, fail) -> None:
    """A matrix stored quantized: its scheme, its [n, k] shape, each part as the scheme
    lays it out (so loading can view the bytes with no surprise)."""
    scheme, shape = t.get("scheme"), t.get("shape")
    if scheme not in qdense.PARTS:
        fail(f"{where}.scheme", f"is {scheme!r}, not one of {', '.join(qdense.PARTS)}")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(_is_int(d) and d > 0 for d in shape)
    ):
        fail(f"{where}.shape", f"must be [rows, columns], got {shape!r}")
    g = 1
    if scheme == "int4":
        g = t.get("group_size")
        if g not in int4.GROUP_SIZES or shape[1] % g:
            fail(f"{where}.group_size", f"is {g!r}, not an int4 group size dividing {shape[1]}")
        if t.get("layout") not in int4.LAYOUTS:
            fail(f"{where}.layout", f"is {t.get('layout')!r}, not one of {', '.join(int4.LAYOUTS)}")
    parts = t["parts"]
    if not isinstance(parts, dict) or set(parts) != set(qdense.PARTS[scheme]):
        fail(f"{where}.parts", f"must hold exactly {', '.join(qdense.PARTS[scheme])}")
    for part, (dtype, shape_of) in qdense.PARTS[scheme].items():
        p = parts[part]
        _check_entry(p, f"{where}.parts.{part}", PART_DTYPES, dense_size, fail)
        want_dtype = str(dtype).removeprefix("torch.")
        if p["dtype"] != want_dtype or p["shape"] != shape_of(*shape, g):
            fail(f"{where}.parts.{part}", f"must be {want_dtype} {shape_of(*shape, g)} for "
                 f"{scheme} {shape}, got {p['dtype']} {p['shape']}")  # fmt: skip


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _object(m: dict, key: str, fail) -> dict:
    v = m.get(key)
    if not isinstance(v, dict):
        fail(key, "must be an object" if key in m else "is missing")
    return v


def _count(d: dict, field: str, fail) -> int:
    v = d.get(field.rsplit(".", 1)[-1])
    if not _is_int(v) or v < 0:
        fail(field, f"must be a byte count, got {v!r}")
    return v


def _file_name(d: dict, field: str, fail) -> None:
    """A file inside the store directory: a plain name, no path."""
    v = d.get(field.rsplit(".", 1)[-1])
    if not isinstance(v, str) or not v or Path(v).name != v or v in (".", ".."):
        fail(field, f"must be a file name inside the store, got {v!r}")
