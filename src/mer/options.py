"""Command-line values and the option groups several commands share.

Every value is checked and converted where it is typed (an argparse `type=`),
so a bad one is refused before any work, with the flag's name, and commands
receive ints, floats and dataclasses rather than strings. `call` hands a
command's function exactly the parameters it declares, so no `Namespace`
travels past the edge. Nothing here imports torch: `mer --help` stays fast.
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from mer.errors import ConfigError
from mer.units import parse_bytes

POLICIES = ("lru", "lfu", "ours")  # mer.cache.policy.POLICIES; a test keeps the two equal
ROUTINGS = ("exact", "cache-aware")  # mer.models.routing.ROUTINGS; a test keeps the two equal
# Live prefetchers: router lookahead, or mer.predict.live.LIVE (routing history), or none.
PREFETCHERS = ("lookahead", "markov", "speculator", "ensemble", "off")


# ---- value types: each raises ArgumentTypeError, shown after the flag's name ----


def _fail(message: str):
    raise argparse.ArgumentTypeError(message)


def size(text: str) -> int:
    """A byte size: 4GiB, 512MiB, 1.5G, 65536."""
    try:
        return parse_bytes(text)
    except ValueError:
        _fail(f"not a size: {text!r} (try 4GiB or 512MiB)")


def size_text(text: str) -> str:
    """A byte size checked here but passed on as typed (to a child process's command line)."""
    size(text)
    return text


def positive_size(text: str) -> int:
    n = size(text)
    return n if n > 0 else _fail(f"must be more than 0 bytes, got {text!r}")


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except (ValueError, OverflowError):
        _fail(f"is not {'an integer' if kind is int else 'a number'}: {text!r}")
    if kind is float and not math.isfinite(value):
        _fail(f"must be a finite number, got {text!r}")
    return value


INT_MAX = 2**31 - 1  # beyond this a count only overflows something further down


def count(text: str) -> int:
    """An integer of at least 1 (tokens, threads, layers, agents...)."""
    n = _number(text, int)
    if n > INT_MAX:
        _fail(f"must be at most {INT_MAX}, got {text}")
    return n if n >= 1 else _fail(f"must be at least 1, got {n}")


def natural(text: str) -> int:
    n = _number(text, int)
    if n > INT_MAX:
        _fail(f"must be at most {INT_MAX}, got {text}")
    return n if n >= 0 else _fail(f"must be at least 0, got {n}")


def seed(text: str) -> int:
    n = _number(text, int)
    return n if 0 <= n < 2**63 else _fail(f"must be between 0 and 2**63-1, got {text}")


def port(text: str) -> int:
    n = _number(text, int)
    return n if 0 <= n <= 65535 else _fail(f"must be a TCP port between 0 and 65535, got {n}")


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """A finite float in [lo, hi] (or (lo, hi] with lo_open)."""

    def parse(text: str) -> float:
        v = _number(text, float)
        low = lo is not None and (v < lo or (lo_open and v == lo))
        high = hi is not None and v > hi
        if low or high:
            lower = f"above {lo:g}" if lo_open else f"at least {lo:g}"
            lower = "positive" if lower == "above 0" else lower
            if lo is not None and hi is not None:
                span = f"{lower} and at most {hi:g}" if lo_open else f"between {lo:g} and {hi:g}"
            else:
                span = lower if low else f"at most {hi:g}"
            _fail(f"must be {span}, got {text}")
        return v

    return parse


def nonempty(text: str) -> str:
    return text if text else _fail("must not be empty")


def text_arg(text: str) -> str:
    """Text from the command line, which must be valid UTF-8 (Python passes undecodable
    bytes through as lone surrogates; they would fail deep in the tokenizer)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text.encode("utf-8", "surrogateescape")
        _fail(f"is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")
    return text


def stop_string(text: str) -> str:
    return text_arg(nonempty(text))


def read_text_file(path: str | Path, what: str) -> str:
    """A UTF-8 text file's contents, or a one-line error naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not valid UTF-8 (byte offset {e.start})") from None


def writable_file(path: str | Path, what: str) -> Path:
    """Check before any work that `path` can be written (its directory exists and is
    writable, and it is not a directory), so a long run is not lost at the end."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{what} {p}: directory {parent} does not exist")
    try:
        with open(p, "ab"):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {p}: cannot be written ({e.strerror or e})") from None
    return p


# ---- shared groups ----


def add_memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--memory",
        type=positive_size,
        help="RAM target for the whole process, e.g. 8GiB: the expert cache gets what the "
        "dense weights, KV cache and runtime leave (instead of --ram-budget)",
    )
    p.add_argument(
        "--dense-quant",
        choices=("bf16", "int8", "int4"),  # mer.quant.dense.DENSE_QUANTS
        help="hold attention, shared experts, dense layers and the output head at this width "
        "(default: as stored; a bf16 store is quantized as it loads)",
    )


@dataclass(frozen=True)
class IOOptions:
    """How a model reads its experts: what every generating command takes."""

    io_threads: int = 4
    threads: int | None = None
    no_prefetch: bool = False
    prefetch: str = "lookahead"
    speculator: str | None = None
    no_direct_io: bool = False
    cache_policy: str = "lru"
    pin_share: float = 0.0
    pin_file: str | None = None
    routing: str = "exact"
    routing_slack: float = 0.1


def add_io_options(p: argparse.ArgumentParser, io_threads: int = 4) -> None:
    p.add_argument("--io-threads", type=count, default=io_threads, help="expert reader threads")
    p.add_argument("--threads", type=count,
                   help="compute threads (default: 1 below hidden 2048, else all)")  # fmt: skip
    p.add_argument("--no-prefetch", action="store_true", help="read experts only on demand")
    p.add_argument("--prefetch", choices=PREFETCHERS, default="lookahead",
                   help="live prefetch: the next layer's router (lookahead), or a predictor "
                   "of routing history that learns as it runs (markov; speculator and "
                   "ensemble need --speculator); off = --no-prefetch")  # fmt: skip
    p.add_argument("--speculator", help="a trained speculator (mer train-speculator), for "
                   "--prefetch speculator or ensemble")  # fmt: skip
    p.add_argument("--no-direct-io", action="store_true", help="read through the page cache")
    p.add_argument("--cache-policy", choices=POLICIES, default="lru",
                   help="eviction policy (see mer bench cache)")  # fmt: skip
    p.add_argument("--pin-share", type=number(0, 0.9), default=0.0,
                   help="share of the budget (0..0.9) for experts pinned in RAM: the most used "
                   "so far, or those of --pin-file (default 0: no pinning)")  # fmt: skip
    p.add_argument("--pin-file",
                   help="experts to pin: JSON list of [layer, expert], or a trace .npz whose "
                   "most frequent experts fill --pin-share")  # fmt: skip
    p.add_argument("--routing", choices=ROUTINGS, default="exact",
                   help="exact (default) or cache-aware: prefer experts in RAM within "
                   "--routing-slack and skip low-weight reads; changes the output "
                   "(its cost: mer bench quality)")  # fmt: skip
    p.add_argument("--routing-slack", type=number(0, 1), default=0.1,
                   help="cache-aware routing: a resident expert may replace a pick whose "
                   "router score is at most S higher, and a non-resident pick with under S "
                   "of the weight is dropped (default 0.1)")  # fmt: skip


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def params(self) -> dict:
        """Keyword arguments of Model.stream / generate, stop strings apart."""
        return dict(
            max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, seed=self.seed,
        )  # fmt: skip


def add_sampling(p: argparse.ArgumentParser, max_tokens: int = 64) -> None:
    p.add_argument("--max-tokens", type=count, default=max_tokens)
    p.add_argument("--temperature", type=number(0, 2), default=0.0,
                   help="0 = greedy (default); at most 2")  # fmt: skip
    p.add_argument("--top-k", type=natural, default=0, help="0 = no cut")
    p.add_argument("--top-p", type=number(0, 1, lo_open=True), default=1.0)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--stop", type=stop_string, action="append", default=[],
                   help="stop string (repeatable)")  # fmt: skip


@dataclass(frozen=True)
class SpeculationOptions:
    speculate: bool = False
    draft: str | None = None
    draft_ram_budget: int = 256 << 20
    spec_k: int = 4


def add_speculation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculate",
        action="store_true",
        help="self-speculative decoding: drafts route to experts already in RAM",
    )
    p.add_argument("--draft", help="speculative decoding with this smaller store as the draft")
    p.add_argument("--draft-ram-budget", type=positive_size, default=256 << 20,
                   help="expert cache of the draft (default 256MiB)")  # fmt: skip
    p.add_argument("--spec-k", type=count, default=4, help="tokens drafted per verification")


def add_split_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """How a trace is split into a part to learn from and held-out sequences to judge on."""
    p.add_argument(
        "--held-out",
        type=number(0, 1, lo_open=True),
        default=0.5,
        help="share of the trace's sequences held out, the last ones (default 0.5)",
    )
    p.add_argument("--max-tokens", type=count, default=max_tokens,
                   help="judge on the first N held-out tokens (whole sequences)")  # fmt: skip
    p.add_argument("--train-tokens", type=count, default=20000,
                   help="learn from the first N tokens of the other part")  # fmt: skip


@dataclass(frozen=True)
class ClusterOptions:
    """Where the experts run: in this process, or on Ray workers (`mer.cluster`)."""

    cluster: str | None = None
    workers: int | None = None
    worker_store: str | None = None
    placement_trace: str | None = None
    cluster_timeout: float = 60.0
    replicate: int = 0
    rebalance_every: int = 0

    def open_kwargs(self) -> dict:
        """mer.open's cluster arguments (none without --cluster)."""
        if self.cluster is None:
            for flag, given in (("--workers", self.workers), ("--worker-store", self.worker_store),
                                ("--placement-trace", self.placement_trace),
                                ("--replicate", self.replicate or None),
                                ("--rebalance-every", self.rebalance_every or None)):  # fmt: skip
                if given is not None:
                    raise ConfigError(f"{flag} needs --cluster")
            return {}
        n = self.workers
        stores = None
        if self.worker_store is not None:
            if n is None and "{i}" in self.worker_store:
                raise ConfigError("--worker-store with {i} needs --workers N")
            stores = [self.worker_store.replace("{i}", str(i)) for i in range(n or 1)]
        return dict(cluster=self.cluster, workers=n, worker_stores=stores,
                    placement_trace=self.placement_trace,
                    cluster_timeout=self.cluster_timeout, cluster_replicas=self.replicate,
                    cluster_rebalance=self.rebalance_every)  # fmt: skip


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", type=nonempty,
                   help="run the experts on Ray workers: local, local:N, auto, or the address "
                   "`ray start --head` printed (pip install mer[cluster])")  # fmt: skip
    p.add_argument("--workers", type=count, help="expert workers (default: local:N's N, or 1)")
    p.add_argument(
        "--worker-store",
        help="the store each worker opens, {i} standing for its index (shards from mer store "
        "split); default: --store, at the same path on every machine",
    )
    p.add_argument(
        "--placement-trace", help="a routing trace whose expert load the placement balances"
    )
    p.add_argument(
        "--cluster-timeout",
        type=number(0, lo_open=True),
        default=60.0,
        help="seconds a layer call may take, retries of a dead worker included",
    )
    p.add_argument("--replicate", type=natural, default=0, metavar="N",
                   help="give the N most loaded experts a second worker, where the budget has "
                   "room (full-copy worker stores)")  # fmt: skip
    p.add_argument("--rebalance-every", type=natural, default=0, metavar="STEPS",
                   help="place the experts again from their running counts every STEPS forward "
                   "passes (full-copy worker stores)")  # fmt: skip


# ---- handing parsed values to a command ----

GROUPS: dict[str, type] = {
    "io": IOOptions,
    "sampling": SamplingOptions,
    "speculation": SpeculationOptions,
    "cluster": ClusterOptions,
}


def call(fn: Callable, args: argparse.Namespace):
    """fn(**what it declares): each parameter by its name from the parsed options, and a
    parameter named after a group (io, sampling, speculation) as that group's dataclass."""
    kwargs = {}
    for name, param in inspect.signature(fn).parameters.items():
        if name in GROUPS:
            group = GROUPS[name]
            given = [f.name for f in fields(group) if hasattr(args, f.name)]
            kwargs[name] = group(**{f: _plain(getattr(args, f)) for f in given})
        elif hasattr(args, name):
            kwargs[name] = getattr(args, name)
        elif param.default is inspect.Parameter.empty:
            raise TypeError(f"{fn.__qualname__} wants {name!r}, which no option provides")
    return fn(**kwargs)


def _plain(value):
    return tuple(value) if isinstance(value, list) else value
