"""`infinitevl eval`: held-out KL to the teacher, perplexities, next-token agreement, layer MSE."""

from __future__ import annotations

import json

HELP = "evaluate a student (against a teacher) on held-out data"


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help=HELP, description=HELP)
    p.add_argument("--model", required=True, help="student folder")
    p.add_argument("--teacher", default=None, help="teacher folder (Qwen2.5-VL or InfiniteVL)")
    p.add_argument("--data", required=True, help="held-out data (.json/.jsonl conversations or text)")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per sample (longer ones are cut)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per forward pass")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (default: all)")
    p.add_argument("--image-max-pixels", type=int, default=512 * 512, help="images larger than this are resized down")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..model import InfiniteVLForConditionalGeneration
    from ..processing.processor import Processor
    from ..training.data import DataOptions, TokenDataset
    from ..training.evaluate import evaluate
    from ..training.teacher import Teacher

    model = InfiniteVLForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    processor = Processor.from_pretrained(args.model, model.config)
    data = TokenDataset(
        args.data,
        processor,
        DataOptions(max_length=args.max_length, image_max_pixels=args.image_max_pixels),
        model.config,
    )
    teacher = Teacher.load(args.teacher) if args.teacher else None
    result = evaluate(model, data, teacher, batch_size=args.batch_size, max_batches=args.max_batches)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>12}: {v:.6g}" if isinstance(v, float) else f"{k:>12}: {v}")
    return 0
