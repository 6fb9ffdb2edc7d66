"""`infinitevl demo` (what `make demo` runs): a stream through the default model, questions about the far past.

With the bundled model (trained on the digit-recall task), a held-out stream of frames is generated from real
digit scans and photographs, played into a streaming session one frame per second, and questions about frames
hundreds of frames back are answered from branches of the state; every answer is checked against the truth. With
any other model (`--model`), a real video is streamed instead with general questions."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .common import CliError, add_model_args, load_engine, mb

HELP = "stream a long held-out sequence through the default model and ask about the far past"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help=HELP, description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--frames", type=int, default=400, help="stream length in frames (one token each)")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--media", default=None, help="photographs for the backgrounds (default: ../shared/media)")
    p.add_argument("--video", default=None, help="video for models not trained on the task")
    p.add_argument("--no-progress", action="store_true")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from ..engine.generation import SamplingParams
    from ..tasks.digit_recall import FRAME, demo_stream
    from ..tasks.miniature import MEDIA

    engine = load_engine(args)
    size = engine.model.config.extra.get("infinitevl_frame_size")
    if size is None:
        return _video_demo(engine, args)
    media = Path(args.media) if args.media else MEDIA
    if args.frames < 16:
        raise CliError("--frames must be at least 16")
    stream, truth = demo_stream(args.frames, args.seed, media if media.exists() else None)
    session = engine.session(frame_size=(FRAME, FRAME))
    print(
        f"demo: {args.frames} held-out frames ({FRAME}x{FRAME}, one token each, 1 frame/s), state "
        f"{mb(session.stats.state_bytes)}; questions about frames up to {max(d for _, d in truth.values())} "
        f"frames back",
        file=sys.stderr,
    )
    bar = tqdm(total=args.frames, unit="frame", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    sizes, t0 = set(), time.perf_counter()
    for i, frame in enumerate(stream.frames):
        session.append_frame(frame.image, float(i))
        sizes.add(session.stats.state_bytes)
        s = session.stats
        bar.set_postfix_str(f"{s.recent_fps:.0f} frames/s, {s.tokens} tokens, state {mb(s.state_bytes)}")
        bar.update(1)
    bar.close()
    wall = time.perf_counter() - t0
    right = 0
    for tag, (digit, distance) in sorted(truth.items(), key=lambda kv: -kv[1][1]):
        answer = session.ask(f"Which digit was last shown with tag {tag}?", SamplingParams(max_new_tokens=3)).strip()
        ok = answer == str(digit)
        right += ok
        print(
            f"  tag {tag}, shown {distance:4d} frames ago: answer {answer!r:5} truth {digit}  "
            f"{'correct' if ok else 'WRONG'}"
        )
    print(
        f"{right}/{len(truth)} correct; {args.frames} frames in {wall:.1f} s ({args.frames / wall:.0f} frames/s, "
        f"last 30: {session.stats.recent_fps:.0f} frames/s); state {mb(session.stats.state_bytes)}, "
        f"{'constant' if len(sizes) == 1 else 'CHANGED'} throughout"
    )
    return 0


def _video_demo(engine, args) -> int:
    from ..processing.media import iter_video

    video = Path(
        args.video
        or Path(__file__).resolve().parents[3] / "shared" / "media" / "mllm_demo" / "mllm_demo_data" / "1.mp4"
    )
    session = engine.session()
    for frame, t in iter_video(video, fps=2.0, max_frames=40):
        session.append_frame(frame, t)
    for q in ("What is happening?", "What happened at the start?"):
        print(f"Q: {q}\nA: {session.ask(q)}")
    print(f"{session.stats.frames} frames, state {mb(session.stats.state_bytes)}")
    return 0
