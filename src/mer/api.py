"""The public Python API: open a store, generate or stream text, read what happened.

    import mer
    model = mer.open("store/", ram_budget="4GiB")
    for piece in model.stream("def fib(n):", max_tokens=32):
        print(piece, end="")
    print(model.stats())

The CLI and the server are built on this and nothing else.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mer.cache.expert_cache import CacheStats, ExpertCache
from mer.chat import ChatTemplate
from mer.engine.generate import GenerationStats, generate
from mer.engine.sampling import SamplingParams
from mer.engine.scheduler import Scheduler
from mer.engine.speculative import SpecStats, Speculation, generate_speculative
from mer.engine.text import TextStream
from mer.errors import ConfigError
from mer.memory import (
    MemoryPlan,
    current_rss,
    growth_margin,
    kv_bytes_per_token,
    release_freed,
    tensor_bytes,
    workspace_bytes,
)
from mer.memory import plan as plan_memory
from mer.models.routing import DEFAULT_SLACK, RoutingStats, make_routing
from mer.models.transformer import MoETransformer
from mer.options import PREFETCHERS
from mer.predict.live import LivePrefetcher, live_predictor
from mer.predict.lookahead import LookaheadPrefetcher
from mer.procfs import kib_field
from mer.quant import int4_paths
from mer.quant.dense import DENSE_QUANTS, quantizable
from mer.quant.dense import prepare as prepare_dense
from mer.quant.dense import quantize as quantize_dense
from mer.quant.stream_hint import HintTrial
from mer.store.embedding import EmbeddingRows
from mer.store.reader import Store
from mer.tokenizer import Tokenizer
from mer.trace.pins import read_pin_file
from mer.trace.record import TraceRecorder
from mer.units import parse_bytes

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class RunStats:
    generation: GenerationStats
    cache: CacheStats
    peak_rss_bytes: int
    budget_bytes: int
    slots: int
    speculation: SpecStats | None = None
    routing: RoutingStats | None = None  # under cache-aware routing
    memory_target: int | None = None  # the whole process's target (`memory=`), if given

    @property
    def bytes_read_per_token(self) -> float:
        n = self.generation.prompt_tokens + self.generation.generated_tokens
        return self.cache.bytes_read / n if n else 0.0


@dataclass
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" when a stop token or string ended it


class Model:
    def __init__(
        self,
        store: Store,
        cache: ExpertCache,
        dtype: torch.dtype,
        budget: int,
        prefetch: bool | str,
        routing: str = "exact",
        routing_slack: float = DEFAULT_SLACK,
        transformer: MoETransformer | None = None,
        memory: MemoryPlan | None = None,
        speculator: str | Path | None = None,
    ) -> None:
        """`transformer`: built already (by `open` with a memory target), its experts not
        yet given; `memory`: the split of that target."""
        self.store = store
        self.config = store.config
        self.cache = cache
        self.budget_bytes = budget
        self.memory = memory
        if transformer is None:
            transformer = MoETransformer(self.config, store.load_dense(), cache, dtype)
        else:
            transformer.experts = transformer.family.experts(self.config, cache)
        self.transformer = transformer
        self.transformer.routing = make_routing(routing, routing_slack)
        hooks = self.transformer.routing_hooks
        if cache.policy != "lru":  # first: a prefetch asks the policy, which learns routing
            hooks.append(lambda layer, hidden, ids, weights: cache.observe(layer, ids))
        prefetch = {True: "lookahead", False: "off"}.get(prefetch, prefetch)
        self.prefetcher: LivePrefetcher | None = None
        if prefetch == "lookahead":
            hooks.append(LookaheadPrefetcher(self.transformer, cache))
        elif prefetch != "off":
            predictor = live_predictor(prefetch, self.config, speculator=speculator)
            self.prefetcher = LivePrefetcher(predictor, cache, self.config)
            hooks.append(self.prefetcher)
        self._tokenizer: Tokenizer | None = None
        self._chat: ChatTemplate | None = None
        self._recorders: list[TraceRecorder] = []
        self.generation_stats = GenerationStats()
        self._speculation: Speculation | None = None
        self.spec_stats = SpecStats()

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_dir(self.store.path)
        return self._tokenizer

    def sampling_params(self, **kw) -> SamplingParams:
        """Sampling parameters with this model's EOS tokens as stop tokens unless given."""
        stop_ids = tuple(kw.pop("stop_token_ids", ())) or self.config.eos_token_ids
        return SamplingParams(stop_token_ids=stop_ids, **kw)

    @property
    def chat_template(self) -> ChatTemplate:
        if self._chat is None:
            self._chat = ChatTemplate.from_dir(self.store.path)
        return self._chat

    def use_chat_template(self, source: str) -> None:
        """Render chats with `source` (Jinja) instead of the checkpoint's own template, as
        `mer serve --chat-template` asks; the checkpoint's BOS and EOS texts are kept."""
        own = ChatTemplate.from_dir(self.store.path)
        self._chat = ChatTemplate(source, own.bos_token, own.eos_token)

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation in the checkpoint's chat template, ready to answer;
        `tools` are OpenAI-shaped function definitions, for templates that take them."""
        text = self.chat_template.render(messages, tools=tools)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def record_trace(self) -> TraceRecorder:
        """Record routing of every generation from now on; `.trace()` returns what was seen."""
        recorder = TraceRecorder(self.config, self.store.expert_format.nbytes)
        self.transformer.routing_hooks.append(recorder)
        self._recorders.append(recorder)
        return recorder

    def tokens(self, prompt: str | list[int], **sampling) -> Iterator[int]:
        """Generated token ids for a prompt given as text or ids."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        for recorder in self._recorders:
            recorder.begin_sequence()
        if self.prefetcher is not None:
            self.prefetcher.begin_sequence()
        params = self.sampling_params(**sampling)
        if self._speculation is not None:
            return generate_speculative(
                self.transformer,
                self._speculation,
                ids,
                params,
                self.generation_stats,
                self.spec_stats,
            )
        return generate(self.transformer, ids, params, self.generation_stats)

    def speculate(self, draft: str | Model | None = "self", k: int = 4, adaptive: bool = True):
        """Decode speculatively from now on: `draft` is "self" (this model routed to the
        experts already in RAM, reading nothing from the SSD), a smaller Model with the
        same tokenizer, or None to stop. `k` tokens are drafted per verification pass,
        adapted to the acceptance rate unless `adaptive` is False."""
        self._speculation = None if draft is None else self._speculation_with(draft, k, adaptive)
        return self

    def stream(self, prompt: str | list[int], stop: list[str] | None = None, **sampling):
        """Yield text pieces as they are generated; ends at max_tokens, EOS or a stop string."""
        yield from self._pieces(prompt, stop or [], sampling, Completion(""))

    def generate(self, prompt: str | list[int], stop: list[str] | None = None, **sampling):
        """The whole completion at once, with its token ids and why it ended."""
        done = Completion("")
        done.text = "".join(self._pieces(prompt, stop or [], sampling, done))
        return done

    def _pieces(self, prompt, stop: list[str], sampling: dict, done: Completion):
        stream = TextStream(self.tokenizer, stop, self.sampling_params(**sampling).stop_token_ids)
        for token in self.tokens(prompt, **sampling):
            done.token_ids.append(token)
            piece = stream.push(token)
            if piece:
                yield piece
            if stream.finish_reason:
                break
        piece = stream.finish()
        if piece:
            yield piece
        done.finish_reason = stream.finish_reason

    def scheduler(
        self,
        kv_budget: str | int = "512MiB",
        draft: str | Model | None = None,
        spec_k: int = 4,
        **options,
    ) -> Scheduler:
        """A continuous-batching scheduler over this model (what `mer serve` runs), with a
        paged KV cache of `kv_budget` bytes; call `.start()` to run it on its own thread.
        With a `draft` ("self" or a smaller Model), a request running alone decodes
        speculatively. Its outputs are token ids: text and stop strings are the caller's
        (`mer.engine.text.TextStream`, as `stream` and the server use it)."""
        try:
            budget = kv_budget if isinstance(kv_budget, int) else parse_bytes(kv_budget)
        except ValueError as e:
            raise ConfigError(f"--kv-budget: {e}") from None
        speculation = None if draft is None else self._speculation_with(draft, spec_k)
        return Scheduler(self.transformer, budget, speculation=speculation, **options)

    def _speculation_with(self, draft: str | Model, k: int, adaptive: bool = True) -> Speculation:
        if not (draft == "self" or isinstance(draft, Model)):
            raise ConfigError(f"draft must be 'self', a mer Model or None, got {draft!r}")
        if isinstance(draft, Model) and draft.config.vocab_size != self.config.vocab_size:
            raise ConfigError(
                f"the draft's vocabulary ({draft.config.vocab_size}) differs from the "
                f"target's ({self.config.vocab_size})"
            )
        return Speculation("self" if draft == "self" else draft.transformer, k, adaptive)

    def close(self) -> None:
        """Stop the reader threads (or a cluster's workers); the model cannot generate after."""
        close = getattr(self.cache, "close", None)  # a cluster's experts (mer.cluster)
        close() if close else self.cache.engine.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> RunStats:
        return RunStats(
            self.generation_stats,
            self.cache.stats,
            peak_rss(),
            self.budget_bytes,
            self.cache.n_slots,
            self.spec_stats if self.spec_stats.rounds or self.spec_stats.plain_tokens else None,
            self.transformer.routing.stats if self.transformer.routing is not None else None,
            self.memory.target if self.memory is not None else None,
        )


def open(  # noqa: A001 - mer.open reads naturally
    store: str | Path,
    ram_budget: str | int = "4GiB",
    dtype: str = "bfloat16",
    direct_io: bool = True,
    io_threads: int = 4,
    prefetch: bool | str = True,
    cache_policy: str = "lru",
    pin_share: float = 0.0,
    pin_file: str | Path | None = None,
    compute_threads: int | None = None,
    routing: str = "exact",
    routing_slack: float = DEFAULT_SLACK,
    memory: str | int | None = None,
    kv_budget: str | int | None = None,
    context: int | None = None,
    pass_tokens: int = 512,
    dense_quant: str | None = None,
    speculator: str | Path | None = None,
    embed_rows: bool | None = None,
    cluster: str | None = None,
    workers: int | None = None,
    worker_stores: list[str | Path] | None = None,
    placement_trace: str | Path | None = None,
    cluster_timeout: float = 60.0,
    cluster_replicas: int = 0,
    cluster_rebalance: int = 0,
) -> Model:
    """Open a store with an expert cache of `ram_budget` bytes (e.g. '4GiB'), or, with
    `memory` (e.g. '8GiB'), whatever that target for the whole process leaves once the
    dense weights are loaded, the KV cache (`kv_budget` bytes, or `context` tokens' worth;
    default 4096 tokens, or the model's context if shorter) and the workspace of a forward
    pass of up to `pass_tokens` tokens are counted (`mer.memory`); `ram_budget` is then
    ignored. `dense_quant` ("int8", "int4") holds the attention, shared-expert, dense-layer
    and output-head matrices at that width (`mer.quant.dense`): as stored when the store
    holds them so (`mer convert --dense-quant`; None, the default, takes what the store
    holds), else quantized as they load from a bf16 store; never requantized from 8 or 4
    bits. `embed_rows` reads the token embedding from the store row by row as tokens need
    it, with a small row cache, instead of holding it (`mer.store.embedding`); by default
    it does so with a `memory` target. Only an embedding separate from the output head can
    be read so: a tied one is multiplied whole at every step and stays resident.

    `io_threads` reader threads fetch missing experts; with `prefetch` the next layer's
    experts are predicted and read while the current layer computes: by its router
    ("lookahead", or True), or by a predictor of routing history that learns as it runs
    ("markov"; "speculator" or "ensemble" with a `speculator` file), or not ("off", False).
    `pin_file` (JSON [layer, expert] pairs, or a trace) or `pin_share` > 0 (most used
    experts, chosen as it runs) pins experts in RAM within that share of the budget
    (`mer.cache.pinning`).
    `compute_threads` sets PyTorch's (process-wide) thread count; by default see
    `default_compute_threads`. `routing="cache-aware"` (opt-in; exact by default) prefers
    experts already in RAM when the router's scores are within `routing_slack` and drops
    low-weight reads (`mer.models.routing`); it changes the output.

    `cluster` ("local", "local:N", "auto" or a Ray address host:port) runs the experts on
    `workers` Ray actors (`mer.cluster`), each with an expert cache of `ram_budget` bytes
    (per machine), reading `store` or its own `worker_stores[i]` (a shard from
    `mer store split`); experts are placed to balance the load of `placement_trace`
    (a routing trace), else split evenly. A layer call that fails, its worker restarted,
    fails the pass after `cluster_timeout` seconds. `cluster_replicas` of the most loaded
    experts get a second worker where the budgets have room, and every `cluster_rebalance`
    forward passes the experts are placed again from the counts of what they did
    (`mer.cluster.head.ClusterExperts.rebalance`; full-copy worker stores only).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        budget = ram_budget if isinstance(ram_budget, int) else parse_bytes(ram_budget)
    except ValueError as e:
        raise ConfigError(f"--ram-budget: {e}") from None
    s = Store(store)
    if s.shard is not None and cluster is None:
        raise ConfigError(
            f"{s.path} is the shard of cluster worker {s.shard['index']} (mer store split): "
            "open the full store, or give the shard to a worker (--cluster, --worker-store)"
        )
    if cluster is not None:
        from mer.cluster.open import open_experts

        threads = compute_threads or default_compute_threads(s.config)
        experts = open_experts(
            s, cluster, workers, budget, worker_stores, placement_trace, cluster_timeout,
            io_threads=io_threads, direct=direct_io, prefetch=prefetch, policy=cache_policy,
            pin_share=pin_share, threads=threads, refused=dict(
                memory=memory, pin_file=pin_file, dense_quant=dense_quant not in (None, "bf16"),
            ), replicas=cluster_replicas, rebalance_every=cluster_rebalance,
        )  # fmt: skip
        torch.set_num_threads(threads)
        return Model(s, experts, DTYPES[dtype], budget, False, routing, routing_slack)
    if compute_threads is not None and compute_threads < 1:
        raise ConfigError(f"compute_threads must be at least 1, got {compute_threads}")
    torch.set_num_threads(compute_threads or default_compute_threads(s.config))
    prepare_kernels(s, DTYPES[dtype])
    if io_threads < 1:
        raise ConfigError(f"io_threads must be at least 1, got {io_threads}")
    pins = read_pin_file(pin_file, s.config, pin_share) if pin_file is not None else None
    dense_quant = resolve_dense_quant(s, dense_quant)
    tied = "lm_head" not in s.dense_table
    if embed_rows and tied:
        raise ConfigError(
            f"{s.path}: the token embedding is tied to the output head, which multiplies "
            "all of it at every step; it cannot be read row by row"
        )
    rows = (memory is not None if embed_rows is None else embed_rows) and not tied
    transformer = split = None
    if memory is not None or dense_quant != "bf16" or rows:
        weights = dense_weights(s, dense_quant, skip={"embed"} if rows else ())
        if rows:
            weights["embed"] = EmbeddingRows(s.dense_path, s.dense_table["embed"], DTYPES[dtype])
        transformer = MoETransformer(s.config, weights, None, DTYPES[dtype])
        del weights
    if memory is not None:
        split = fit_memory(s, transformer, memory, kv_budget, context, pass_tokens, DTYPES[dtype])
        budget = split.cache
    cache = ExpertCache(
        s, budget, threads=io_threads, direct=direct_io, policy=cache_policy,
        pin_share=pin_share, pins=pins,
    )  # fmt: skip
    if prefetch not in (True, False, *PREFETCHERS):
        raise ConfigError(f"prefetch must be one of {', '.join(PREFETCHERS)}, got {prefetch!r}")
    model = Model(
        s,
        cache,
        DTYPES[dtype],
        budget,
        prefetch,
        routing,
        routing_slack,
        transformer,
        split,
        speculator,
    )
    prepare_dense(model.transformer.w, DTYPES[dtype])  # one token's kernels, measured
    if s.expert_format.scheme.startswith("int4") or dense_quant == "int4":
        model.transformer.hint_trial = hint_trial(s, dense_quant, cache)
    return model


def hint_trial(s: Store, dense_quant: str, cache: ExpertCache) -> HintTrial:
    """The int4 kernels' prefetch hint for this model on this machine (`mer.quant.
    stream_hint`): steps that read from the SSD are not timed."""
    c = s.config
    shape = repr((c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_local_experts,
                  c.num_experts_per_tok, s.expert_format.scheme, dense_quant))  # fmt: skip
    try:
        return HintTrial(shape, reads=lambda: cache.engine.stats.bytes_read)
    except ValueError as e:  # a bad MER_STREAM_HINT
        raise ConfigError(str(e)) from None


def prepare_kernels(s: Store, dtype: torch.dtype, progress: bool = True) -> None:
    """Choose the expert kernel path per shape class now, at the thread count just set, so
    the first token pays no measurement: from this machine's cache, or measured on the
    store's first expert (read once here, before the dense weights and the expert cache
    take their memory, so the buffer never adds to the peak)."""
    first = s.extent(*min(s.extents))

    def read_into(buf: torch.Tensor) -> None:
        with builtins.open(s.expert_path, "rb", buffering=0) as f:
            f.seek(first.offset)
            f.readinto(buf.numpy())
            os.posix_fadvise(f.fileno(), first.offset, first.length, os.POSIX_FADV_DONTNEED)

    int4_paths.prepare(s.expert_format, read_into, dtype, progress)


def resolve_dense_quant(s: Store, asked: str | None) -> str:
    """The dense scheme to run: what the store holds unless `asked` differs; a store already
    at 8 or 4 bits is used as stored (quantizing again would only add error), so asking it
    for another scheme is refused in one line."""
    if asked is not None and asked not in DENSE_QUANTS:
        raise ConfigError(f"--dense-quant must be one of {', '.join(DENSE_QUANTS)}")
    held = s.dense_quant
    if asked is None or asked == held:
        return held
    if held != "bf16":
        raise ConfigError(
            f"--dense-quant {asked}: {s.path} holds its dense weights as {held}, and they are "
            f"requantized only from bf16 (drop --dense-quant, or convert again with "
            f"--dense-quant {asked})"
        )
    return asked


def dense_weights(s: Store, dense_quant: str = "bf16", skip=()) -> dict:
    """The store's dense tensors but those in `skip`, the quantizable matrices in
    `dense_quant`, loaded one by one so that no more than one of them is ever held at full
    width beside the rest (a store that holds them in `dense_quant` gives them as they are)."""
    names = [n for n in s.dense_table if n not in skip]
    if dense_quant == s.dense_quant:
        return s.load_dense(names=names)
    out = {}
    for name in names:
        t = s.load_dense(names=[name])[name]
        out[name] = quantize_dense(t, dense_quant) if quantizable(name, t) else t
    return out


def fit_memory(s: Store, transformer, memory, kv_budget, context, pass_tokens: int, dtype):
    """Measure what is resident with the dense weights loaded, and split the memory target."""
    try:
        target = memory if isinstance(memory, int) else parse_bytes(memory)
        kv = (
            kv_budget if isinstance(kv_budget, int) or kv_budget is None else parse_bytes(kv_budget)
        )
    except ValueError as e:
        raise ConfigError(f"--memory: {e}") from None
    cfg = s.config
    per_token = kv_bytes_per_token(cfg, dtype)
    release_freed()
    if kv is None:
        kv = per_token * min(context or 4096, cfg.max_position_embeddings)
    split = plan_memory(
        target,
        dense=tensor_bytes(transformer.w.values()),
        resident=current_rss(),
        kv=kv,
        workspace=workspace_bytes(cfg, min(pass_tokens, kv // per_token), kv // per_token),
        slot_bytes=s.expert_format.nbytes,
        min_slots=cfg.num_experts_per_tok,
        max_slots=cfg.num_experts_total,
        margin=growth_margin(target),
    )
    return split


def default_compute_threads(config) -> int:
    """One thread below a hidden size of 2048, else every core.

    Small models run thousands of tiny ops per token, and on 2 cores OpenMP's fork and
    join cost more than the second core gives: the bundled 256-wide model decodes 2.3x
    faster on one thread (4.3 vs 10.1 ms per token; 8 sequences 13.5 vs 40.4 ms per
    step); a 1024-wide one 1.1x; at 2048 the two are even, and larger matmuls gain."""
    return 1 if config.hidden_size < 2048 else (os.cpu_count() or 1)


def peak_rss() -> int:
    """High-water mark of this process's resident memory, in bytes (Linux VmHWM)."""
    hwm = kib_field("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
