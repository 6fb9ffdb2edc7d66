"""`infinitevl generate`: one prompt, optional images and a video, the answer streamed to stdout."""

from __future__ import annotations

import sys

from .common import add_model_args, add_sampling_args, load_engine, sampling_from

HELP = "answer one prompt (with optional images / video), streaming the text"


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help=HELP, description=HELP)
    p.add_argument("prompt", help="the user message")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable, in order)")
    p.add_argument("--video", default=None, help="video file")
    p.add_argument("--video-fps", type=float, default=2.0, help="video sampling rate (frames per second)")
    p.add_argument("--video-max-frames", type=int, default=64)
    p.add_argument("--system", default=None, help="system prompt")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    engine = load_engine(args)
    content = [{"type": "image", "image": path} for path in args.image]
    if args.video:
        content.append(
            {"type": "video", "video": args.video, "fps": args.video_fps, "max_frames": args.video_max_frames}
        )
    content.append({"type": "text", "text": args.prompt})
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}
    ]
    for piece in engine.generate_stream(messages, sampling_from(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
