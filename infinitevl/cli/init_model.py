"""`infinitevl init-model`: a model folder of a named size with random weights, to try speed and memory.

Sizes are the benchmarks' (`bench/configs.py`): `4b` has InfiniteVL-4B's official widths (with the full vision
tower), `mini` the same structure scaled down (hidden 512, 8 layers), `tiny` the test model. `--set FIELD=VALUE`
changes any decoder field (`hidden_size`, `num_hidden_layers`, `sliding_window`, ...) or, as `vision.FIELD`, any
field of the vision tower. The weights are random, so the answers are meaningless (the folder says so and every
command prints it), but the time and memory of every command are those of a trained model of that size:
`infinitevl generate --model DIR --verbose` prints them. The tokenizer is byte-level, with the special tokens at
the configuration's ids."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from .common import CliError

HELP = "write a model folder of a named size (tiny, mini, 4b) with random weights, to try speed and memory"
QWEN_IM_START = 151644  # where Qwen2.5-VL's vocabulary (the 4b size) keeps <|im_start|>


def add_parser(sub) -> None:
    p = sub.add_parser("init-model", help=HELP, description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--size", choices=["tiny", "mini", "4b"], default="tiny", help="the named configuration")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change a decoder field, or vision.FIELD of the vision tower (repeatable), e.g. num_hidden_layers=12",
    )
    p.add_argument("--out", required=True, help="output folder (new or empty; its parent must exist)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="storage dtype")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.set_defaults(func=run)


def parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def sized_config(size: str, assignments: list[str]):
    """The named configuration with the --set changes applied; a wrong field or value is a CliError."""
    from ..bench.configs import infinitevl_config
    from ..config import TextConfig, VisionConfig

    config = infinitevl_config(size)
    text, vision = {}, {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        key = key.strip()
        target, cls, name = (vision, VisionConfig, key[7:]) if key.startswith("vision.") else (text, TextConfig, key)
        known = sorted(f.name for f in dataclasses.fields(cls) if f.name != "extra")
        if not sep:
            raise CliError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. num_hidden_layers=12")
        if name not in known:
            where = "vision tower" if cls is VisionConfig else "decoder"
            raise CliError(f"--set {key}: no field {name!r} in the {where}; known: {', '.join(known)}")
        target[name] = parse_value(value)
    if "num_hidden_layers" in text and "layer_types" not in text:
        text["layer_types"] = None  # the official rule again, for the new depth
    if "depth" in vision and "fullatt_block_indexes" not in vision:  # those of the named size that remain
        kept = [i for i in config.vision.fullatt_block_indexes if i < vision["depth"]]
        vision["fullatt_block_indexes"] = kept or [vision["depth"] - 1]
    if "hidden_size" in text and "out_hidden_size" not in vision:
        vision["out_hidden_size"] = text["hidden_size"]  # the tower's output feeds the decoder
    try:
        return dataclasses.replace(
            config,
            text=dataclasses.replace(config.text, **text),
            vision=dataclasses.replace(config.vision, **vision),
        )
    except (TypeError, ValueError) as err:
        raise CliError(f"--set: {err}") from err


def tokenizer_for_size(config, size: str):
    from ..bench.configs import byte_tokenizer
    from ..processing.tokenizer import SPECIAL_NAMES, byte_level_tokenizer

    if size != "4b":
        return byte_tokenizer(config)
    ids = {k: getattr(config, k) for k in SPECIAL_NAMES}
    return byte_level_tokenizer(config.text.vocab_size, ids, im_start_id=QWEN_IM_START)


def random_model(config, dtype, seed: int):
    """The model in `dtype` with random weights, materialised once (a 4b model never exists in float32 first)."""
    import torch

    from ..bench.configs import fill_random_
    from ..model import InfiniteVLForConditionalGeneration
    from ..model.vision import reset_rotary

    with torch.device("meta"):
        model = InfiniteVLForConditionalGeneration(config).to(dtype)
    model.to_empty(device="cpu")
    fill_random_(model, seed)
    reset_rotary(model.model.visual)
    model.tie_weights()
    return model.eval()


def count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def run(args) -> int:
    from ..engine.speed import plural

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CliError(f"--out {out}: already exists and is not an empty folder (nothing is overwritten)")
    if not out.parent.is_dir():
        raise CliError(f"--out {out}: the folder {out.parent} does not exist (create it first)")
    config = sized_config(args.size, args.set)

    import torch

    from ..bench.configs import state_bytes
    from ..defaults import UNTRAINED_NOTE
    from ..processing.processor import Processor

    start = time.perf_counter()
    config.extra[UNTRAINED_NOTE] = True
    config.extra["infinitevl_size"] = args.size + (" with " + ", ".join(args.set) if args.set else "")
    try:
        tokenizer = tokenizer_for_size(config, args.size)
    except ValueError as err:
        raise CliError(f"no byte-level tokenizer fits this vocabulary: {err}") from err
    model = random_model(config, getattr(torch, args.dtype), args.seed)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model.save_pretrained(out)
    Processor(tokenizer, config).save_pretrained(out)
    t = config.text
    print(
        f"{out}: {args.size}, {count(params)} parameters in {args.dtype}, {plural(t.num_hidden_layers, 'layer')} "
        f"of hidden {t.hidden_size}; state {state_bytes(config, getattr(torch, args.dtype)) / 2**20:.2f} MiB per "
        f"stream; random weights ({time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
    )
    print(f'try: infinitevl generate --model {out} --verbose --max-new-tokens 32 "Hello"', file=sys.stderr)
    print(out)
    return 0
