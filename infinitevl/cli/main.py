"""The `infinitevl` command: one entry point, one small module per subcommand."""

from __future__ import annotations

import argparse
import os
import sys

from . import bench, chat, convert, demo, evaluate, generate, merge, miniature, quantize, serve, state, stream, train

SUBCOMMANDS = [generate, chat, stream, demo, state, convert, train, merge, quantize, evaluate, serve, bench, miniature]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinitevl", description="InfiniteVL: a vision-language model with constant-size memory, on any CPU."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
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
