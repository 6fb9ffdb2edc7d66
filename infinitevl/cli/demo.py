"""`infinitevl demo` (what `make demo` runs): a stream through the default model, questions about the far past.

With the bundled model (trained on the miniature's digit tasks), a held-out stream of frames is generated from real
digit scans and photographs and played into a streaming session. The frames are stamped one second apart: that is
stream time, which sets each frame's temporal position; they are processed as fast as the machine allows, and the
progress bar and the summary show that processing rate. Questions about frames hundreds of frames back are answered
from branches of the state and checked against the truth, and the same questions go to the SWA-only model of the
miniature (shipped beside the default one) to show what the hybrid keeps that the window loses. A model trained on
the read-back task is also asked to read back the last frames of a second stream, exactly. With any other model
(`--model` not trained on the tasks), a real video is streamed instead with general questions."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from .common import CliError, add_model_args, check_file, load_engine, mb

HELP = "stream a long held-out sequence through the default model and ask about the far past"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help=HELP, description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--frames", type=int, default=400, help="stream length in frames (one token each)")
    p.add_argument("--seed", type=int, default=2026, help="seed of the held-out stream and its questions")
    p.add_argument(
        "--media",
        default=None,
        help="folder of photographs (*.jpg) for the backgrounds (default: the ones the package ships)",
    )
    p.add_argument("--video", default=None, help="video for models not trained on the task")
    p.add_argument(
        "--contrast",
        default=None,
        help="model that answers the same questions for contrast (default: the bundled SWA-only model)",
    )
    p.add_argument("--no-contrast", action="store_true", help="ask the demo's model only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.frames < 16:
        raise CliError("--frames must be at least 16")
    if args.video:
        check_file(args.video, "--video")
    if args.media and not (Path(args.media).is_dir() and any(Path(args.media).glob("*.jpg"))):
        raise CliError(f"--media {args.media}: not a folder of photographs (*.jpg)")
    contrast_path = None
    if not args.no_contrast:
        from ..defaults import BUNDLED_SWA_ONLY

        contrast_path = Path(args.contrast) if args.contrast else BUNDLED_SWA_ONLY
        if args.contrast and not (contrast_path / "config.json").exists():
            raise CliError(f"--contrast {args.contrast}: no model folder there (config.json is missing)")
    engine = load_engine(args)
    size = engine.model.config.extra.get("infinitevl_frame_size")
    if size is None:
        return _video_demo(engine, args)
    contrast = _load_contrast(contrast_path)
    media = Path(args.media) if args.media else None  # None: the photographs the package ships
    _recall_demo(engine, contrast, args, media)
    if engine.model.config.extra.get("infinitevl_read_frame_size") is not None:
        _read_back_demo(engine, contrast, args, media)
    return 0


def _load_contrast(path: Path | None):
    """The contrast model (its note is not repeated: the demo says what it is), or None when it is not there."""
    if path is None or not (path / "config.json").exists():
        return None
    from ..engine.runtime import InfiniteVL

    engine = InfiniteVL.load(path)
    if not engine.model.config.extra.get("infinitevl_frame_size"):
        raise CliError(f"--contrast {path}: not a model trained on the digit tasks")
    return engine


def _play(session, frames, bar=None) -> tuple[float, set[int]]:
    """Append the frames one second apart in stream time; returns the processing time and the state sizes seen."""
    sizes = set()
    t0 = time.perf_counter()
    for i, frame in enumerate(frames):
        session.append_frame(frame.image, float(i))
        sizes.add(session.stats.state_bytes)
        if bar is not None:
            s = session.stats
            bar.set_postfix_str(f"{s.tokens} tokens, state {mb(s.state_bytes)}", refresh=False)
            bar.update(1)
    return time.perf_counter() - t0, sizes


def _warm_up(engine, frame, size) -> None:
    """One throwaway frame and answer, so that one-time costs (first calls into torch) stay out of the rate."""
    from ..engine.generation import SamplingParams

    session = engine.session(frame_size=size)
    session.append_frame(frame.image, 0.0)
    session.ask("?", SamplingParams(max_new_tokens=1))


def _verdict(ok: bool) -> str:
    return "correct" if ok else "WRONG"


def _recall_demo(engine, contrast, args, media) -> None:
    from tqdm import tqdm

    from ..engine.generation import SamplingParams
    from ..tasks.digit_recall import FRAME, QUESTION, FrameMaker, probe_stream

    rng = random.Random(args.seed)
    far = sorted({args.frames - 1 - rng.randrange(args.frames // 8), args.frames // 2, args.frames // 4, 40})
    stream, truth = probe_stream(
        FrameMaker("eval", args.seed, media), args.frames, [d for d in far if d < args.frames] + [1], rng
    )
    size = (FRAME, FRAME)
    _warm_up(engine, stream.frames[0], size)
    session = engine.session(frame_size=size)
    print(
        f"demo: {args.frames} held-out frames ({FRAME}x{FRAME}, one token each), stamped 1 frame/s in stream time "
        f"(the time a frame is shown, which sets its position) and processed as fast as this machine allows; "
        f"state {mb(session.stats.state_bytes)}; questions about frames up to "
        f"{max(d for _, d in truth.values())} frames back",
        file=sys.stderr,
    )
    bar = tqdm(total=args.frames, unit="frame", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    wall, sizes = _play(session, stream.frames, bar)
    bar.close()
    other = None
    if contrast is not None:
        other = contrast.session(frame_size=size)
        _play(other, stream.frames)
    right = other_right = 0
    greedy = SamplingParams(max_new_tokens=3)
    for tag, (digit, distance) in sorted(truth.items(), key=lambda kv: -kv[1][1]):
        answer = session.ask(QUESTION.format(tag=tag), greedy).strip()
        ok = answer == str(digit)
        right += ok
        line = f"  tag {tag}, shown {distance:4d} frame{'s' if distance != 1 else ' '} ago: answer {answer!r:5} truth {digit}  {_verdict(ok):7}"
        if other is not None:
            theirs = other.ask(QUESTION.format(tag=tag), greedy).strip()
            other_right += theirs == str(digit)
            line += f"   SWA-only: {theirs!r:5} {_verdict(theirs == str(digit))}"
        print(line.rstrip())
    print(
        f"{right}/{len(truth)} correct; {args.frames} frames in {wall:.1f} s ({args.frames / wall:.0f} frames/s of "
        f"processing); state {mb(session.stats.state_bytes)}, {'constant' if len(sizes) == 1 else 'CHANGED'} "
        "throughout"
    )
    if other is not None:
        w = contrast.model.config.text.window
        print(
            f"SWA-only: {other_right}/{len(truth)} correct: every layer sees only the last {w} tokens (the question "
            f"and about {max(0, (w or 0) - 15)} frames), so what lies further back is gone; the hybrid's Gated "
            "DeltaNet layers keep it in their fixed-size state"
        )


def _read_back_demo(engine, contrast, args, media) -> None:
    from ..engine.generation import SamplingParams
    from ..tasks import digit_copy
    from ..tasks.comparison import probe_distances
    from ..tasks.digit_recall import FrameMaker

    length = 64
    rng = random.Random(args.seed + 1)
    frames, _, reads = digit_copy.probe_stream(
        FrameMaker("eval", f"demo-{args.seed}", media), length, probe_distances(length, rng), rng
    )
    size = digit_copy.SIZE
    session = engine.session(frame_size=size)
    _play(session, frames)
    other = None
    if contrast is not None and contrast.model.config.extra.get("infinitevl_read_frame_size"):
        other = contrast.session(frame_size=size)
        _play(other, frames)
    print(
        f"read-back: {length} more held-out frames ({size[0]}x{size[1]}, four digits and four tokens each); the "
        "last frames' digits, in order, must come back exactly:"
    )
    right = 0
    for k, want in reads.items():
        sampling = SamplingParams(max_new_tokens=digit_copy.CELLS * k + 2)
        answer = session.ask(digit_copy.copy_question(k), sampling).strip()
        ok = digit_copy.copy_score(answer, want)[0]
        right += ok
        line = f"  {digit_copy.copy_question(k):24} answer {answer!r:34} truth {want!r:34} {_verdict(ok):7}"
        if other is not None:
            theirs = other.ask(digit_copy.copy_question(k), sampling).strip()
            line += f"   SWA-only: {_verdict(digit_copy.copy_score(theirs, want)[0])}"
        print(line.rstrip())
    print(f"{right}/{len(reads)} read back exactly")


def _video_demo(engine, args) -> int:
    from ..defaults import PHOTOS, media_file
    from ..processing.media import iter_video

    video = Path(args.video) if args.video else media_file(PHOTOS / "1.mp4")
    session = engine.session()
    for frame, t in iter_video(video, fps=2.0, max_frames=40):
        session.append_frame(frame, t)
    for q in ("What is happening?", "What happened at the start?"):
        print(f"Q: {q}\nA: {session.ask(q)}")
    print(f"{session.stats.frames} frames, state {mb(session.stats.state_bytes)}")
    return 0
