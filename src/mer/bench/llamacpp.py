"""llama.cpp as a baseline, shared by the benchmarks that run it (`vs-llamacpp`, `fits`).

llama.cpp is never a dependency: a benchmark uses a `llama-bench` the user has (on PATH,
or a path given) and says how to build one when there is none. mer runs the store it
converts from the same GGUF once (kept under the cache directory), so both engines
compute with the same weights. This module runs nothing itself: it finds the binary,
builds its command line and reads its JSON.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

from mer.errors import ConfigError

HOW_TO_GET = (
    "no llama-bench found (give --llama-bench PATH, or put it on PATH). To build one: "
    "pip download --no-deps llama-cpp-python; tar xf llama_cpp_python-*.tar.gz; "
    "cd llama_cpp_python-*/vendor/llama.cpp; cmake -B build -DLLAMA_CURL=OFF && "
    "cmake --build build -j --target llama-bench"
)


def find_llama_bench(path: str | None) -> str:
    """`path`, or llama-bench on PATH; a one-line error saying how to get one otherwise."""
    bench = path or shutil.which("llama-bench")
    if not bench or not Path(bench).is_file():
        raise ConfigError(f"--llama-bench {path}: no such file" if path else HOW_TO_GET)
    return bench


def gguf_file(path: str) -> Path:
    model = Path(path)
    if not model.is_file():
        raise ConfigError(f"{model}: no such GGUF file")
    return model


def converted_store(model: Path, say=print) -> Path:
    """mer's store of the GGUF `model`, converted once and kept under the cache directory."""
    from mer.data import cache_dir, run_mer

    dst = cache_dir() / "vs-llamacpp" / f"{model.stem}-{model.stat().st_size}"
    if not dst.exists():
        say(f"converting once: mer convert {model} {dst}")
        run_mer("convert", model, dst)
    return dst


def bench_argv(
    bench: str, model: Path, prompt: int, tokens: int, threads: int, repeats: int = 1, flags=()
) -> list[str]:
    """llama-bench timing a `prompt`-token prefill and a `tokens`-token decode (0: skip)."""
    return [bench, "-m", str(model), "-p", str(prompt), "-n", str(tokens), "-t", str(threads),
            "-r", str(repeats), "-o", "json", *flags]  # fmt: skip


def bench_rates(stdout: str) -> dict[str, float]:
    """llama-bench's JSON -> {"prefill" or "decode": average tok/s}; {} if unreadable."""
    try:
        rows = json.loads(stdout)
        return {
            "prefill" if r["n_prompt"] > 0 else "decode": float(r["avg_ts"])
            for r in rows
            if r["n_prompt"] > 0 or r["n_gen"] > 0
        }
    except (ValueError, KeyError, TypeError):
        return {}


def exit_status(code: int) -> str:
    """A child's exit status in words: a signal by name, and what SIGILL means here (a native
    build of llama.cpp whose AMX path dies on some machines with AMX in their CPU flags)."""
    if code >= 0:
        return f"exit {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"killed by signal {-code}"
    if name == "SIGILL":
        return ("killed by SIGILL: an instruction this machine does not run; build llama.cpp "
                "without GGML_NATIVE and its AMX options")  # fmt: skip
    return f"killed by {name}"
