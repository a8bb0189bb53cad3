"""`mer` command line: a table of commands and `main()`.

Each command lives in its own module, which declares its options
(`add_arguments(parser)`) next to the function that runs it (`run(...)`, typed
keyword parameters). Only the chosen command's module is imported, so
`mer --help` and argument errors never load torch. Errors meant for users
(MerError, and bad arguments) print as one line, `error: ...`, and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mer.errors import MerError
from mer.options import call

# name: (module with add_arguments and run, or with a COMMANDS table of its own; help)
COMMANDS = {
    "generate": ("mer.commands.generate", "generate text from a store"),
    "serve": ("mer.commands.serve", "OpenAI-compatible HTTP server with continuous batching"),
    "convert": ("mer.commands.convert", "convert a Hugging Face checkpoint to a store"),
    "info": ("mer.commands.info", "describe a store"),
    "synth": ("mer.commands.synth", "write a synthetic checkpoint (or store)"),
    "demo": ("mer.commands.demo", "convert the bundled model and generate with experts on disk"),
    "train-speculator": ("mer.predict.training", "train the learned expert predictor on traces"),
    "bench": ("mer.bench.commands", "benchmarks"),
    "store": ("mer.commands.store", "store operations (split for a cluster)"),
}


class UsageError(MerError):
    """A command-line argument the parser refused."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and exit 1, like every other user error."""

    def error(self, message: str):
        flag, sep, problem = message.removeprefix("argument ").partition(": ")
        if sep and problem.startswith(("must ", "is ")):  # our value types' messages
            message = f"{flag} {problem}"
        raise UsageError(message.removeprefix("argument "))


def chosen(argv: list[str], names) -> str | None:
    """The first argument, if it names a command: only that command's options are built."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in names else None


def add_commands(parser: argparse.ArgumentParser, table: dict, argv: list[str], dest: str):
    """One subparser per entry of `table`; the chosen one gets its module's options."""
    sub = parser.add_subparsers(dest=dest, required=True, metavar=dest.upper())
    pick = chosen(argv, table)
    for name, (module, help_text) in table.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != pick:
            continue
        mod = importlib.import_module(module)
        if hasattr(mod, "COMMANDS"):  # a command of commands (bench)
            add_commands(p, mod.COMMANDS, argv[argv.index(name) + 1 :], "what")
        else:
            mod.add_arguments(p)
            p.set_defaults(run=mod.run)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = Parser(
        prog="mer", description="Run Mixture-of-Experts models with experts streamed from an SSD."
    )
    add_commands(parser, COMMANDS, argv, "command")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = build_parser(argv).parse_args(argv)
        call(args.run, args)
    except MerError as e:
        # Written as it is: user text (paths, values) must not pass through markup or emoji.
        sys.stderr.write(f"error: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
