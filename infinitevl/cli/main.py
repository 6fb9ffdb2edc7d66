"""The `infinitevl` command: one entry point, one small module per subcommand.

Building the parser imports no torch, transformers or model code (each subcommand imports what it needs when it
runs), so `--help`, `--version` and mistakes in the command line answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys

from .. import __version__
from . import (
    bench,
    chat,
    convert,
    demo,
    evaluate,
    generate,
    init_model,
    merge,
    miniature,
    quantize,
    serve,
    state,
    stream,
    train,
)
from .common import HelpFormatter

SUBCOMMANDS = [
    generate,
    chat,
    stream,
    demo,
    state,
    init_model,
    convert,
    train,
    merge,
    quantize,
    evaluate,
    serve,
    bench,
    miniature,
]


def did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word.split("=", 1)[0], list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse names an unknown subcommand without suggesting the one meant
        bad = re.match(r"argument COMMAND: invalid choice: '([^']*)'", message)
        if bad and self._subparsers is not None:
            choices = next(a.choices for a in self._subparsers._group_actions if a.choices)
            message += did_you_mean(bad.group(1), choices)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="infinitevl",
        description="InfiniteVL: a vision-language model with constant-size memory, on any CPU.",
        epilog="`infinitevl COMMAND --help` documents each command. Without --model, commands use the small model "
        "bundled with the package, which was trained for two digit tasks only (see `infinitevl demo`); "
        "`infinitevl init-model` writes a random model of a real size to try speed and memory.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"infinitevl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments; an unknown option gets its subcommand's usage and the nearest known option."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        sub = next(a for a in parser._subparsers._group_actions if a.choices).choices[args.command]
        options = [s for a in sub._actions for s in a.option_strings if a.help is not argparse.SUPPRESS]
        first = next((u for u in unknown if u.startswith("-")), "")
        sub.error(f"unrecognized arguments: {' '.join(unknown)}" + (did_you_mean(first, options) if first else ""))
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one readable line unless --debug
        if args.debug:
            raise
        print(f"infinitevl {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
