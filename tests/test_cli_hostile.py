"""Hostile command lines: every option of every command given wrong, empty, huge, non-finite
or non-UTF-8 values. Each must end in one line, `error: ...` naming the flag, exit 1, and
leave nothing behind; none may reach a traceback or start work."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from mer.cli import COMMANDS, build_parser, main

BAD = ["", "abc", "-1", "0", "nan", "inf", "-inf", "1e400", "9" * 40, "2.5", "caf\udce9"]


def command_paths() -> list[list[str]]:
    """Every command, a command of commands (bench, store) as each of its own."""
    import importlib

    paths = []
    for name, (module, _) in COMMANDS.items():
        table = getattr(importlib.import_module(module), "COMMANDS", None)
        paths += [[name, sub] for sub in table] if table else [[name]]
    return paths


def subparser(path: list[str]) -> argparse.ArgumentParser:
    p = build_parser(path)
    for name in path:
        action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        p = action.choices[name]
    return p


def base_args(path: list[str], tmp) -> list[str]:
    """The required arguments, pointing where nothing can be found, so a value that parses
    still ends in a one-line error without real work."""
    missing = str(tmp / "missing")
    return {
        "generate": ["--store", missing, "--prompt", "x"],
        "serve": ["--store", missing],
        "convert": [missing, str(tmp / "dst")],
        "info": [missing],
        "synth": [str(tmp / "out")],
        "train-speculator": ["--trace", missing + ".npz", "--out", str(tmp / "s.pt")],
        "io": ["--store", missing],
        "cache": ["--trace", missing + ".npz"],
        "routing": ["--trace", missing + ".npz"],
        "predict": ["--trace", missing + ".npz"],
        "vs-llamacpp": ["--gguf", missing + ".gguf"],
        "decode": ["--store", missing, "--routing-trace", missing + ".npz"],
        "split": [missing, "--workers", "2", "--out", str(tmp / "out")],
        "memory": ["--store", missing],
    }.get(path[-1], [])


def typed_options(path: list[str]):
    """(flag, value) pairs the option's own type or choices refuse."""
    for action in subparser(path)._actions:
        if not action.option_strings or action.nargs == 0 or action.dest == "help":
            continue
        flag = action.option_strings[0]
        for value in BAD:
            if action.choices is not None and value not in action.choices:
                yield flag, value
            elif action.type is not None and action.choices is None:
                try:
                    action.type(value)
                except (argparse.ArgumentTypeError, ValueError, TypeError):
                    yield flag, value


CASES = [(path, flag, value) for path in command_paths() for flag, value in typed_options(path)]


def test_the_suite_covers_every_command_and_many_options():
    assert {tuple(p) for p, _, _ in CASES} >= {("generate",), ("serve",), ("bench", "cache")}
    assert len({(tuple(p), f) for p, f, _ in CASES}) >= 60


@pytest.mark.parametrize(
    "path, flag, value", CASES, ids=[f"{' '.join(p)} {f}={v!a}" for p, f, v in CASES]
)
def test_a_refused_value_is_one_line_naming_the_flag(tmp_path, capsys, path, flag, value):
    argv = [*path, *base_args(path, tmp_path), f"{flag}={value}"]
    assert main(argv) == 1
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}"), out.err
    assert out.out == ""
    assert not (tmp_path / "out").exists() and not (tmp_path / "dst").exists()


@pytest.mark.parametrize("path", command_paths(), ids=" ".join)
def test_an_unknown_option_is_one_line(capsys, tmp_path, path):
    assert main([*path, *base_args(path, tmp_path), "--no-such-flag"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unrecognized arguments: --no-such-flag") and "\n" not in err


def run_mer(*args: bytes | str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mer.cli", *args], capture_output=True, timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )  # fmt: skip


def test_a_prompt_that_is_not_utf8_is_refused(tmp_path):
    proc = run_mer("generate", "--store", str(tmp_path), "--prompt", b"caf\xe9")
    assert proc.returncode == 1
    assert proc.stderr.decode() == ("error: --prompt is not valid UTF-8 (byte 0xe9 at offset 3)\n")


def test_user_text_in_errors_is_printed_literally():
    # rich turned ':-1:' into an emoji and '[red]' into markup
    proc = run_mer("serve", "--store", "[red]x:-1:", "--port", "-1")
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("error: --port must be a TCP port")
    proc = run_mer("info", "[bold]:-1:")
    assert proc.returncode == 1 and "[bold]:-1:" in proc.stderr.decode()


def test_argument_errors_exit_1_like_every_user_error():
    assert run_mer().returncode == 1
    assert run_mer("nonsense").returncode == 1
    assert run_mer("generate", "--store").returncode == 1


def test_prompt_file(store_factory, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def f(x):\n" + "    # é\n" * 3, encoding="utf-8")
    common = ["generate", "--store", str(store_factory("int4")), "--max-tokens", "2"]
    proc = run_mer(*common, "--prompt-file", str(prompt))
    assert proc.returncode == 0 and proc.stdout.decode().startswith("def f(x):\n    # é")
    prompt.write_bytes(b"caf\xe9")
    proc = run_mer(*common, "--prompt-file", str(prompt))
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == f"error: --prompt-file {prompt}: not valid UTF-8 " \
        "(byte offset 3)"  # fmt: skip
    proc = run_mer(*common, "--prompt-file", str(tmp_path / "none.txt"))
    assert proc.returncode == 1 and b"none.txt" in proc.stderr
    proc = run_mer(*common, "--prompt", "x", "--prompt-file", str(prompt))
    assert proc.returncode == 1 and b"not allowed with argument" in proc.stderr


def test_an_unwritable_trace_is_refused_before_generating(store_factory, tmp_path):
    for target in (tmp_path / "no" / "dir" / "t.npz", tmp_path):
        proc = run_mer("generate", "--store", str(store_factory("int4")), "--prompt", "x",
                       "--trace", str(target))  # fmt: skip
        assert proc.returncode == 1 and proc.stdout == b""  # nothing generated, nothing lost
        assert proc.stderr.decode().startswith(f"error: --trace {target}")


def test_synth_refuses_a_vocabulary_its_tokenizer_cannot_have(tmp_path):
    proc = run_mer("synth", str(tmp_path / "s"), "--vocab", "10")
    assert proc.returncode == 1 and b"--vocab must be at least 259" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_a_store_without_tokenizer_says_what_to_do(store_copy):
    store = store_copy("int4")
    (store / "tokenizer.json").unlink()
    proc = run_mer("generate", "--store", str(store), "--prompt", "x")
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "tokenizer.json" in err and "token ids" not in err


def test_option_policies_match_the_cache():
    from mer.cache.policy import POLICIES as CACHE_POLICIES
    from mer.options import POLICIES

    assert tuple(POLICIES) == tuple(CACHE_POLICIES)


def test_a_plain_file_as_store_is_called_a_file(tmp_path):
    plain = tmp_path / "model.bin"
    plain.write_bytes(b"x")
    proc = run_mer("info", str(plain))
    assert proc.returncode == 1
    assert proc.stderr.decode() == f"error: {plain}: a file, not a store directory\n"
