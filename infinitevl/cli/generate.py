"""`infinitevl generate`: one prompt, optional images and a video, the answer streamed to stdout."""

from __future__ import annotations

import sys

from .common import (
    CliError,
    add_model_args,
    add_sampling_args,
    check_model_args,
    check_video,
    load_engine,
    read_image,
    sampling_from,
)

HELP = "answer one prompt (with optional images / video), streaming the text"


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help=HELP, description=HELP)
    p.add_argument("prompt", help="the user message")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable, in order)")
    p.add_argument("--video", default=None, help="video file")
    p.add_argument("--video-fps", type=float, default=2.0, help="video sampling rate (frames per second)")
    p.add_argument("--video-max-frames", type=int, default=64, help="most frames taken from the video")
    p.add_argument("--system", default=None, help="system prompt")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check_model_args(args)
    images = [read_image(path, "--image") for path in args.image]
    if args.video:
        check_video(args.video, "--video")
    if args.video_fps <= 0 or args.video_max_frames < 1:
        raise CliError("--video-fps must be > 0 and --video-max-frames >= 1")
    sampling = sampling_from(args)
    engine = load_engine(args)
    content = [{"type": "image", "image": image} for image in images]
    if args.video:
        content.append(
            {"type": "video", "video": args.video, "fps": args.video_fps, "max_frames": args.video_max_frames}
        )
    content.append({"type": "text", "text": args.prompt})
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}
    ]
    from ..engine.speed import Speed, memory_text

    speed = Speed()
    for piece in engine.generate_stream(messages, sampling, speed=speed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        state_bytes = engine.model.new_state().nbytes
        print(f"{speed.describe()}; {memory_text(state_bytes)}", file=sys.stderr)
    return 0
