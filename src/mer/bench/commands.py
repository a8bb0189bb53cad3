"""`mer bench WHAT`: the table of benchmarks; each module declares its own options."""

COMMANDS = {
    "kernel": ("mer.bench.kernel", "int4 expert FFN vs memory bandwidth"),
    "io": ("mer.bench.io", "expert reads vs the device, and decode stall"),
    "cache": ("mer.bench.cache", "replay a routing trace through cache policies"),
    "decode": ("mer.bench.decode", "decode a routing trace's sequences on a store (real engine)"),
    "routing": ("mer.bench.routing", "routing statistics of a trace"),
    "predict": ("mer.bench.predict", "expert predictors' recall on held-out sequences"),
    "quality": ("mer.bench.quality", "cache-aware routing: held-out loss against reads"),
    "spec": ("mer.bench.spec", "speculative decoding (draft model, self) vs plain"),
    "serve": ("mer.bench.serve", "simulated agents: batched serving vs one at a time"),
    "grammar": ("mer.bench.grammar", "constrained decoding (a JSON schema) vs plain, per token"),
    "vs-llamacpp": ("mer.bench.vs_llamacpp", "mer and llama.cpp on one GGUF, same memory limit"),
    "cluster": ("mer.bench.cluster", "experts on 1, 2, 3 Ray workers vs one process"),
    "fits": ("mer.bench.fits", "the whole model in RAM: decode and prefill vs llama.cpp"),
    "memory": ("mer.bench.memory", "generate --memory L in a cgroup of L, per dense width"),
}
