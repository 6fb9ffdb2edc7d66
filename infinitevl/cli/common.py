"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ("none", "int8", "int4")


class CliError(RuntimeError):
    """A user-facing error: printed as one line."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="model folder or hub id (default: the model bundled with the package)")
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
    g.add_argument("--verbose", action="store_true", help="print the precision chosen and why")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    g.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk length in tokens")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)


def sampling_from(args):
    from ..engine.generation import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_strings=tuple(args.stop),
        seed=args.seed,
    ).validate()


def load_engine(args):
    from ..engine.runtime import InfiniteVL

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {args.device}: CUDA is not available on this machine")
    from ..ops.quant import QuantizationError

    quantize = None if args.quantize == "none" else args.quantize
    if args.group_size is not None and quantize != "int4":
        raise CliError("--group-size applies to --quantize int4 only")
    try:
        engine = InfiniteVL.load(
            args.model,
            dtype=DTYPES[args.dtype],
            device=args.device,
            chunk_size=args.chunk_size,
            quantize=quantize,
            group_size=args.group_size,
        )
    except QuantizationError as err:
        raise CliError(str(err)) from err
    if getattr(args, "verbose", False):
        print(f"precision: {engine.describe_precision()}", file=sys.stderr)
    if engine.note:
        print(f"note: {engine.note}", file=sys.stderr)
    return engine


def mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MB"
