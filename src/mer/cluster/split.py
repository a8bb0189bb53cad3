"""`mer store split STORE --workers N --out DIR`: one shard store per cluster worker.

Each shard (DIR/worker-0, DIR/worker-1, ...) is a valid mer store holding the dense
weights, the tokenizer and only the experts its worker owns (`mer.cluster.placement`:
an even split, or balancing a trace's load), packed into its own aligned expert file with
their checksums unchanged; its manifest's `shard` field says which experts it holds, for
which worker of how many. A worker opened on a shard serves exactly those; the head reads
the shards' manifests where it can (else places again, the same way). Each shard is
written like any store: into a temporary directory, published by one rename.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from mer.errors import StoreError
from mer.options import count
from mer.store import format as fmt
from mer.store.reader import Store


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="the store to split (from mer convert)")
    p.add_argument("--workers", type=count, required=True, help="shards to write, one per worker")
    p.add_argument("--out", required=True, help="directory to write worker-0 ... worker-N-1 into")
    p.add_argument("--placement-trace", help="a routing trace whose expert load to balance")
    p.add_argument("--force", action="store_true", help="replace shards written before")


def run(*, store: str, workers: int, out: str, placement_trace: str | None, force: bool) -> None:
    paths = split_store(store, workers, out, placement_trace, force)
    for p in paths:
        s = Store(p)
        sys.stderr.write(f"wrote {p}: {len(s.extents)} experts\n")


def split_store(
    store: str | Path,
    workers: int,
    out: str | Path,
    placement_trace: str | Path | None = None,
    force: bool = False,
) -> list[Path]:
    """Write `workers` shard stores of `store` under `out`; their paths."""
    from mer.cluster.placement import counts_from_trace, place

    src = Store(store)
    if src.shard is not None:
        raise StoreError(f"{src.path}: already a shard (worker {src.shard['index']}); split "
                         "the full store")  # fmt: skip
    counts = counts_from_trace(placement_trace, src.config) if placement_trace else None
    owned = place(src.config, workers, counts)
    Path(out).mkdir(parents=True, exist_ok=True)
    return [
        write_shard(src, i, workers, keys, Path(out) / f"worker-{i}", force)
        for i, keys in enumerate(owned)
    ]


def write_shard(src: Store, index: int, workers: int, keys, dst: Path, force: bool) -> Path:
    from mer.store.staging import Staging
    from mer.store.writer import MANIFEST_SLACK, check_replaceable

    nbytes = src.expert_format.nbytes
    extra = [f for f in src.manifest.get("tokenizer_files", []) if (src.path / f).is_file()]
    needed = (
        len(keys) * nbytes
        + src.dense_path.stat().st_size
        + sum((src.path / f).stat().st_size for f in extra)
        + MANIFEST_SLACK
    )
    staging = Staging(dst, needed, force, check_replaceable)
    try:
        tmp = staging.tmp
        shutil.copyfile(src.dense_path, tmp / src.dense_path.name)
        for f in extra:
            shutil.copyfile(src.path / f, tmp / f)
        table = []
        with open(src.expert_path, "rb") as fin, open(tmp / fmt.EXPERT_FILE, "wb") as fout:
            for j, (layer, e) in enumerate(sorted(keys)):
                x = src.extent(layer, e)
                fin.seek(x.offset)
                data = fin.read(x.length)
                if len(data) != x.length or fmt.checksum(data) != x.checksum:
                    raise StoreError(
                        f"{src.expert_path}: {fmt.expert_name(layer, e)} fails its checksum; "
                        "the store is corrupted (re-convert it)"
                    )
                fout.write(data)  # extents are whole multiples of the alignment
                table.append([layer, e, j * nbytes, x.length, x.checksum])
            fout.flush()
            os.fdatasync(fout.fileno())
        manifest = json.loads(json.dumps(src.manifest))
        manifest["experts"].update(file=fmt.EXPERT_FILE, nbytes=len(keys) * nbytes, table=table)
        manifest["dense"]["file"] = src.dense_path.name
        manifest["shard"] = {
            "index": index,
            "workers": workers,
            "experts": [list(k) for k in sorted(keys)],
        }
        with open(tmp / fmt.MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        staging.publish()
    except BaseException:
        staging.abort()
        raise
    return dst
