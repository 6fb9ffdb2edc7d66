"""`infinitevl quantize`: write a weight-only int8 / int4 copy of a model folder.

The input is read one tensor at a time and each decoder weight is quantized as it arrives, so the float model is
never in memory. The output folder holds the quantized tensors (`weight`, `weight_scale`, `weight_zero` per layer),
the rest in --dtype, a `quantization_config` in config.json, and the tokenizer and processor files; `from_pretrained`
and every command's --model load it directly."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .common import CliError

HELP = "write an int8 / int4 weight-only quantized copy of a model folder"


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help=HELP, description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=None, help="input model folder or hub id (default: the bundled model)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--bits", type=int, choices=[4, 8], required=True, help="4: int4 in groups; 8: int8 per row")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64, 128 or 256 (default: 128)")
    p.add_argument(
        "--embeddings",
        choices=["int8", "none"],
        default="int8",
        help="the tied embedding / lm_head: one int8 table (default) or kept in --dtype",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="dtype of what stays unquantized: vision tower, norms, biases, gates (default: bfloat16)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this size")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..checkpoint import resolve
    from ..defaults import default_model_folder
    from ..model import InfiniteVLForConditionalGeneration
    from ..ops.quant import QuantizationError, quantized_bytes
    from ..training.convert import PROCESSOR_FILES

    source = default_model_folder() if args.model is None else resolve(args.model)
    out = Path(args.out)
    if out.resolve() == Path(source).resolve():
        raise CliError("--out must differ from the input folder")
    if args.group_size is not None and args.bits != 4:
        raise CliError("--group-size applies to --bits 4 only")
    start = time.perf_counter()
    try:
        model = InfiniteVLForConditionalGeneration.from_pretrained(
            source,
            dtype=getattr(torch, args.dtype),
            quantize=f"int{args.bits}",
            group_size=args.group_size,
            embeddings=args.embeddings,
        )
    except QuantizationError as err:
        raise CliError(str(err)) from err
    model.save_pretrained(out, max_shard_size=args.max_shard_size)
    for name in PROCESSOR_FILES:
        if (Path(source) / name).exists() and not (out / name).exists():
            (out / name).write_bytes((Path(source) / name).read_bytes())
    print(
        f"{out}: {model.quantization.describe()}; weights {quantized_bytes(model) / 2**20:.1f} MiB "
        f"({time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
    )
    print(out)
    return 0
