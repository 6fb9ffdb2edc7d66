"""Arguments and helpers shared by the subcommands.

Nothing here imports torch or the model at module level: building the parser, `--help`, `--version` and the
checks of files and options run before anything heavy is imported, so a mistake is reported in well under a second.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from pathlib import Path

DTYPES = ("auto", "bfloat16", "float16", "float32")  # "auto" or a torch dtype's name, resolved when the model loads
QUANTIZE = ("none", "int8", "int4")


class CliError(RuntimeError):
    """A user-facing error: printed as one line."""


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, unless the help already speaks of it or there is none to show
    (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _checked(kind, ok, rule: str):
    """An argparse type: the value parsed by `kind` and within its range, so that a bad value is refused with the
    command's usage at once (the engine's own checks need torch and the model code imported first)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {rule}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule} (got {text})")
        return value

    parse.__name__ = f"number {rule}"
    return parse


COUNT = _checked(int, lambda v: v >= 0, ">= 0")
NONNEGATIVE = _checked(float, lambda v: v >= 0, ">= 0")
POSITIVE = _checked(float, lambda v: v > 0, "> 0")
PROBABILITY = _checked(float, lambda v: 0 < v <= 1, "in (0, 1]")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="model folder or hub id (default: the small model bundled with the package, trained for two digit "
        "tasks only; make a random one of a real size with `infinitevl init-model`)",
    )
    g.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="auto",
        help="weight and activation dtype; auto: bfloat16 where the CPU has bf16 instructions (avx512_bf16 or AMX), "
        "else float32 (default: auto)",
    )
    g.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default="none",
        help="weight-only quantization of the decoder while loading: int8 (per row) or int4 (groups); the "
        "embedding / lm_head become int8, the vision tower keeps --dtype (default: none)",
    )
    g.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64, 128 or 256 (default: 128)")
    g.add_argument(
        "--int8-products",
        choices=("off", "on", "auto"),
        default="off",
        help="the vision tower and prefill through int8 x int8 matrix products (activations quantized per row as "
        "they come); decode is unchanged; auto: where a probe finds them at least 1.2x faster on this CPU; the "
        "error against fp32 is in docs/benchmarks.md (default: off)",
    )
    g.add_argument(
        "--verbose",
        action="store_true",
        help="print the precision chosen and why, and after each answer its speed (prefill and decode tokens/s), "
        "the peak memory and the state size",
    )
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    g.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk length in tokens")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=COUNT, default=max_new_tokens, help="longest answer, in tokens")
    g.add_argument("--temperature", type=NONNEGATIVE, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=COUNT, default=0, help="sample among the k likeliest tokens; 0: all of them")
    g.add_argument(
        "--top-p",
        type=PROBABILITY,
        default=1.0,
        help="nucleus sampling: the smallest set of tokens with this much probability; 1: off",
    )
    g.add_argument("--repetition-penalty", type=POSITIVE, default=1.0, help="> 1 discourages repeated tokens")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: not seeded)")


def sampling_from(args):
    from ..engine.generation import SamplingParams

    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            stop_strings=tuple(args.stop),
            seed=args.seed,
        ).validate()
    except ValueError as err:
        raise CliError(str(err)) from err


def check_model_args(args) -> None:
    """What can be checked about --model, --chunk-size and --group-size without loading anything."""
    if args.chunk_size < 1:
        raise CliError(f"--chunk-size must be >= 1 (got {args.chunk_size})")
    if args.group_size is not None and args.quantize != "int4":
        raise CliError("--group-size applies to --quantize int4 only")
    if getattr(args, "int8_products", "off") != "off" and not args.device.startswith("cpu"):
        raise CliError(f"--int8-products {args.int8_products}: they run on the CPU only (--device {args.device})")
    if args.model is not None:
        path = Path(args.model)
        if path.is_file():
            raise CliError(f"--model {args.model} is a file; give the folder that holds config.json and the weights")
        if path.is_dir() and not (path / "config.json").exists():
            raise CliError(f"--model {args.model}: no config.json in that folder")
        if not path.exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.model):
            raise CliError(f"--model: no model folder at {args.model}")


def check_file(path: str | Path, what: str) -> Path:
    """An input file that must exist (checked before the model loads)."""
    if re.match(r"[a-z]+://", str(path)):
        raise CliError(f"{what} {path}: URLs are not fetched here; download the file and give its path")
    p = Path(path)
    if p.is_dir():
        raise CliError(f"{what} {path}: is a folder, not a file")
    if not p.exists():
        raise CliError(f"{what} {path}: no such file")
    return p


def check_video(path: str | Path, what: str) -> Path:
    """An input video that exists and whose first frame decodes (checked before the model loads)."""
    from ..processing.media import MediaError, probe_video

    p = check_file(path, what)
    try:
        probe_video(p)
    except MediaError as err:
        raise CliError(f"{what} {err}") from err
    return p


def read_image(path: str | Path, what: str):
    """An input image, decoded now (a missing or unreadable file is reported before the model loads)."""
    from ..processing.media import MediaError, load_image

    check_file(path, what)
    try:
        return load_image(path)
    except MediaError as err:
        raise CliError(f"{what} {err}") from err


def load_engine(args):
    """The engine for --model (the bundled model by default). A model that is not a general assistant (the bundled
    task model, an untrained stand-in) says so once, on stderr, before its first answer."""
    check_model_args(args)
    import torch

    from ..engine.runtime import InfiniteVL
    from ..ops.int8_products import Int8ProductsError
    from ..ops.quant import QuantizationError

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {args.device}: CUDA is not available on this machine")
    try:
        engine = InfiniteVL.load(
            args.model,
            dtype=args.dtype if args.dtype == "auto" else getattr(torch, args.dtype),
            device=args.device,
            chunk_size=args.chunk_size,
            quantize=None if args.quantize == "none" else args.quantize,
            group_size=args.group_size,
            int8_products=args.int8_products,
        )
    except (QuantizationError, Int8ProductsError) as err:
        raise CliError(str(err)) from err
    if getattr(args, "verbose", False):
        print(f"precision: {engine.describe_precision()}", file=sys.stderr)
    if engine.note:
        print(f"note: {engine.note}", file=sys.stderr, flush=True)
    return engine


def mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MB"


class CtrlC:
    """Within `with CtrlC() as ctrl_c:`, a first Ctrl-C (SIGINT) sets `ctrl_c.pressed` instead of raising, so that the
    work in hand stops at its next safe point (after a token, after a frame) and never halfway through a change of
    the state; a second Ctrl-C raises KeyboardInterrupt as usual."""

    def __enter__(self) -> CtrlC:
        self.pressed = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def check_output_file(path: str | Path, what: str) -> Path:
    """A file to be written: its folder must exist (nothing is created on the user's behalf), and it must not be a
    folder itself. Checked before the model loads."""
    p = Path(path)
    if p.is_dir():
        raise CliError(f"{what} {path}: is a folder; give a file name, e.g. {p / 'state.safetensors'}")
    parent = p.parent
    if parent.exists() and not parent.is_dir():
        raise CliError(f"{what} {path}: {parent} is a file, not a folder")
    if not parent.exists():
        raise CliError(f"{what} {path}: the folder {parent} does not exist (create it first)")
    return p
