"""`infinitevl stream`: play a video file or a folder of frames into a session as a live stream.

Frames are sampled at --fps and appended one by one with their timestamps; questions scheduled with
--ask "SECONDS:question" are answered from a branch of the state when the stream reaches that time, without
disturbing it. The progress bar shows frames per second, tokens seen and the (constant) state size. Ctrl-C stops
the stream after the frame in hand (a second Ctrl-C quits at once): questions not yet reached are skipped, and
--save-state is still written. With --realtime, frames come at their timestamps as from a camera; when the model is
slower than the source, each frame taken is the newest one due (so the frames kept are evenly spaced in stream time)
and the others are skipped and counted; the bar and the summary say what rate is kept. --pair-frames encodes frames
two per temporal step, as a video file's frames are (half the tokens and vision-tower work per frame);
--frames-per-step N gathers N frames into one prefill (the decoder's weights read once per N frames)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .common import (
    CliError,
    CtrlC,
    add_model_args,
    add_sampling_args,
    check_file,
    check_model_args,
    check_output_file,
    check_video,
    load_engine,
    mb,
    sampling_from,
)

HELP = "stream a video file or a folder of frames, answering scheduled questions"


def parse_question(text: str) -> tuple[float, str]:
    when, sep, question = text.partition(":")
    try:
        seconds = float(when)
    except ValueError:
        seconds = None
    if not sep or seconds is None or not question.strip():
        raise CliError(f"--ask {text!r}: expected SECONDS:question, e.g. '12.5:What is on the table?'")
    return seconds, question.strip()


def add_parser(sub) -> None:
    p = sub.add_parser("stream", help=HELP, description=__doc__.split("\n\n", 1)[1])
    p.add_argument("source", help="video file (mp4, avi, ...) or folder of image frames")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second taken from the source")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="frame side in pixels, a multiple of 28 (default: the model's own, else 448 = 256 tokens)",
    )
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames (default: all)")
    p.add_argument(
        "--ask",
        action="append",
        default=[],
        metavar="SECONDS:QUESTION",
        help="question to answer when the stream reaches SECONDS (repeatable)",
    )
    p.add_argument("--final", default=None, help="question to answer after the last frame")
    p.add_argument(
        "--realtime",
        action="store_true",
        help="pace frames by their timestamps (a live feed); frames the model cannot keep up with are skipped",
    )
    p.add_argument(
        "--pair-frames", action="store_true", help="encode frames in pairs, as a video file's frames (half the cost)"
    )
    p.add_argument(
        "--frames-per-step",
        type=int,
        default=None,
        metavar="N",
        help="live frames gathered into one prefill (default: one temporal step; even with --pair-frames): the "
        "tower runs once and the decoder's weights are read once per N frames, at N frames of latency",
    )
    p.add_argument("--loops", type=int, default=1, help="play the source this many times (a longer stream)")
    p.add_argument("--load-state", default=None, help="continue a saved stream")
    p.add_argument(
        "--save-state", default=None, help="write the stream's state here at the end (also when stopped by Ctrl-C)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    add_sampling_args(p, max_new_tokens=48)
    p.set_defaults(func=run)


def check_inputs(args) -> Path:
    """Everything about the command line that can be wrong, checked before the model loads."""
    source = Path(args.source)
    if not source.exists():
        raise CliError(f"{source}: no such file or folder")
    check_model_args(args)
    if args.fps <= 0:
        raise CliError(f"--fps must be > 0 (got {args.fps:g})")
    if args.size is not None and (args.size < 28 or args.size % 28):
        raise CliError(f"--size {args.size} is not a positive multiple of 28")
    if args.max_frames is not None and args.max_frames < 1:
        raise CliError(f"--max-frames must be >= 1 (got {args.max_frames})")
    if args.loops < 1:
        raise CliError(f"--loops must be >= 1 (got {args.loops})")
    if args.frames_per_step is not None:
        from ..engine.session import frames_per_step_for

        try:  # a resumed stream's pairing is checked again once its file is read
            frames_per_step_for(args.frames_per_step, args.pair_frames)
        except ValueError as err:
            raise CliError(f"--frames-per-step: {err}") from None
    if args.load_state:
        check_file(args.load_state, "--load-state")
    if args.save_state:
        check_output_file(args.save_state, "--save-state")
    if source.is_dir():  # last: decoding the first frame imports PyAV
        check_frame_folder(source)
    else:
        check_video(source, "source")
    return source


def check_frame_folder(folder: Path) -> None:
    """A folder of frames holds images, and the first one decodes (before the model loads)."""
    from ..processing.media import IMAGE_SUFFIXES, MediaError, load_image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CliError(f"source {folder}: no image files in that folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
    try:
        load_image(files[0])
    except MediaError as err:
        raise CliError(f"source {err}") from err


def frames(source: Path, fps: float, max_frames: int | None, loops: int):
    from ..processing.media import frames_from_folder, iter_video

    offset = 0.0
    count = 0
    for _ in range(loops):
        last = 0.0
        it = frames_from_folder(source, fps) if source.is_dir() else iter_video(source, fps)
        for frame, t in it:
            if max_frames is not None and count >= max_frames:
                return
            yield frame, offset + t
            last = t
            count += 1
        offset += last + 1.0 / fps


class Paced:
    """A live source's frames at the rate a slower consumer keeps: each frame is released at its timestamp; when
    the consumer is late, a frame whose successor is already due is skipped (counted in `skipped`), so the frames
    taken are the newest available, evenly spaced in stream time. `clock` and `sleep` are injectable (tests)."""

    def __init__(self, frames, clock=time.perf_counter, sleep=time.sleep):
        self.frames, self.clock, self.sleep = frames, clock, sleep
        self.kept = self.skipped = 0
        self.first = self.last = None  # stream time of the first and last frames seen

    def __iter__(self):
        start, held = self.clock(), None
        for frame, t in self.frames:
            self.first = t if self.first is None else self.first
            self.last = t
            if held is not None:
                if t > self.clock() - start:  # nothing newer is due yet: the held frame is taken
                    self.kept += 1
                    yield held
                else:
                    self.skipped += 1
            held = (frame, t)
            delay = t - (self.clock() - start)
            if delay > 0:
                self.sleep(delay)
        if held is not None:
            self.kept += 1
            yield held

    def rate(self) -> str:
        """The rate kept, e.g. 'keeping 0.8 of 2 frames/s (12 skipped)'."""
        seen = self.kept + self.skipped
        span = (self.last - self.first) if seen > 1 else 0.0
        if span <= 0:
            return f"keeping {self.kept} of {seen} frames"
        return f"keeping {self.kept / span:.2g} of {(seen - 1) / span:.2g} frames/s ({self.skipped} skipped)"


def run(args) -> int:
    source = check_inputs(args)
    schedule = sorted(parse_question(q) for q in args.ask)
    sampling = sampling_from(args)

    from tqdm import tqdm

    from ..engine.session import StreamSession, frames_per_step_for
    from ..engine.speed import memory_text, plural

    engine = load_engine(args)
    if args.size is None:
        args.size = (engine.model.config.extra.get("infinitevl_frame_size") or [448])[0]
    size = (args.size, args.size)
    if args.load_state:
        session = StreamSession.restore(
            args.load_state, engine.model, engine.processor, frame_size=size, chunk_size=args.chunk_size
        )
    else:
        session = engine.session(frame_size=size, pair_frames=args.pair_frames)
    session.pair_frames = args.pair_frames or session.pair_frames  # a resumed paired stream stays paired
    if args.frames_per_step is not None:
        try:
            session.frames_per_step = frames_per_step_for(args.frames_per_step, session.pair_frames)
        except ValueError as err:
            raise CliError(f"--frames-per-step: {err} (the resumed stream is paired)") from None
    step = session.frames_per_step
    print(
        f"streaming {source} at {args.fps:g} frames/s, {args.size}x{args.size} per frame"
        f"{', in pairs' if session.pair_frames else ''}"
        f"{f', {step} frames per prefill' if step > 1 + session.pair_frames else ''}; "
        f"state {mb(session.stats.state_bytes)}",
        file=sys.stderr,
    )
    # a resumed stream continues after its last frame: the new source's clock starts there
    last = session.held[-1].timestamp if session.held else getattr(session.segment, "last_time", None)
    offset = last + 1.0 / args.fps if last is not None else 0.0
    # the bar's own rate is left out: the postfix has the frames per second of the last frames
    layout = "{n_fmt} frames [{elapsed}{postfix}]" if args.max_frames is None else None
    bar = tqdm(
        total=args.max_frames,
        unit=" frames",
        disable=args.no_progress,
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format=layout or "{l_bar}{bar}| {n_fmt}/{total_fmt} frames [{elapsed}<{remaining}{postfix}]",
    )
    start_wall = time.perf_counter()
    sizes = set()
    stopped = False
    source_frames = frames(source, args.fps, args.max_frames, args.loops)
    paced = Paced(source_frames) if args.realtime else None
    with CtrlC() as ctrl_c:
        for frame, t in paced if paced is not None else source_frames:
            while schedule and schedule[0][0] <= t and not ctrl_c.pressed:
                when, question = schedule.pop(0)
                answer = session.ask(question, sampling)
                bar.write(f"[{when:7.2f}s] Q: {question}\n           A: {answer}")
            if ctrl_c.pressed:
                stopped = True
                break
            session.append_frame(frame, offset + t)
            sizes.add(session.stats.state_bytes)
            s = session.stats
            kept = f", {paced.rate()}" if paced is not None else ""
            bar.set_postfix_str(f"{s.recent_fps:.1f} frames/s{kept}, {s.tokens} tokens, state {mb(s.state_bytes)}")
            bar.update(1)
            if ctrl_c.pressed:
                stopped = True
                break
        bar.close()
        if stopped:
            print(f"stopped by Ctrl-C after {plural(session.stats.frames, 'frame')}", file=sys.stderr, flush=True)
        else:
            session.flush_frames()  # held frames (an odd last one of a pair alone) go in
            for when, question in schedule + ([(None, args.final)] if args.final else []):
                answer = session.ask(question, sampling)
                label = "end" if when is None else f"{when:.2f}s"
                print(f"[{label:>7}] Q: {question}\n           A: {answer}")
        s = session.stats
        wall = time.perf_counter() - start_wall
        print(
            f"done: {plural(s.frames, 'frame')}, {plural(s.tokens, 'token')} in {wall:.1f} s "
            f"({s.frames / max(wall, 1e-9):.2f} frames/s overall, {s.tokens_per_second:.0f} tokens/s of prefill); "
            f"state size {mb(s.state_bytes)}, {'constant' if len(sizes) <= 1 else 'CHANGED'} throughout"
            + (f"; realtime: {paced.rate()}" if paced is not None else "")
        )
        if args.verbose:
            print(memory_text(s.state_bytes), file=sys.stderr)
        if args.save_state:
            print(f"state saved to {session.save(args.save_state)}", flush=True)
    return 0
