"""`infinitevl distill-layer | distill-e2e | sft | sft-long`: the training stages, each driven by a config file.

    infinitevl sft --config configs/sft-tiny.yaml --set optim.lr=1e-4

Any config field can be overridden with --set (unknown fields are refused with the list of known ones); --student,
--teacher, --data, --out and --max-steps are shortcuts. Runs under `accelerate launch` or `torchrun` unchanged."""

from __future__ import annotations

import argparse

from ..training.config import STAGES

HELPS = {
    "distill-layer": "stage I-a: layer-wise MSE distillation of the GDN layers from a teacher",
    "distill-e2e": "stage I-b: end-to-end KL distillation from a teacher",
    "sft": "stage II: supervised fine-tuning on answer tokens",
    "sft-long": "stage III: long-sequence fine-tuning through LoRA adapters",
}


def add_parser(sub) -> None:
    for stage in STAGES:
        p = sub.add_parser(stage, help=HELPS[stage], description=HELPS[stage] + ". " + __doc__.split("\n\n", 2)[2])
        p.add_argument("--config", default=None, help="YAML config file (its header shows how it is run)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            dest="overrides",
            help="override a config field, e.g. optim.lr=1e-4 (repeatable)",
        )
        p.add_argument("--student", default=None, help="student model folder")
        p.add_argument("--teacher", default=None, help="teacher model folder (distillation)")
        p.add_argument("--data", default=None, help="training data file (sets data.train)")
        p.add_argument("--out", default=None, help="output folder")
        p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
        # for the tests only (the first step's gradients, compared between process layouts): not shown in --help
        p.add_argument("--dump-first-grads", default=None, help=argparse.SUPPRESS)
        p.set_defaults(func=run, stage=stage)


def run(args) -> int:
    from ..training.config import load_config
    from ..training.loop import Trainer

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.train={args.data}")
    cfg = load_config(
        args.config,
        overrides,
        stage=args.stage,
        student=args.student,
        teacher=args.teacher,
        out=args.out,
        max_steps=args.max_steps,
    )
    trainer = Trainer(cfg, dump_first_grads=args.dump_first_grads)
    final = trainer.fit()
    if trainer.accelerator.is_main_process:
        shown = {k: round(v, 6) if isinstance(v, float) else v for k, v in final.items()}
        print(f"{cfg.stage} done after {trainer.step} steps: {shown}")
        print(f"result: {trainer.out / ('adapters' if cfg.stage == 'sft-long' else 'final')}")
    return 0
