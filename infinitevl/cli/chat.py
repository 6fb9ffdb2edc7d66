"""`infinitevl chat`: an interactive multi-turn conversation in constant memory.

Lines typed are user messages, answered as the text is made; `/image PATH` attaches an image to the next message
(the file is read at once), `/stats` shows the state and the speed of the last answer, `/save PATH` writes a
snapshot, `/reset` starts over, `/quit` (or end of input) leaves. Ctrl-C during an answer stops that answer only:
the part already written stays in the conversation. A mistake (a missing file, a failed save) is reported and the
conversation goes on."""

from __future__ import annotations

import sys

from .common import (
    CliError,
    CtrlC,
    add_model_args,
    add_sampling_args,
    check_model_args,
    check_output_file,
    load_engine,
    mb,
    read_image,
    sampling_from,
)

HELP = "interactive multi-turn chat (images by path with /image PATH)"
COMMANDS = "/image PATH, /stats, /save PATH, /reset, /quit"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help=HELP, description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)


def say(text: str) -> None:
    print(f"[{text}]", file=sys.stderr, flush=True)


def run(args) -> int:
    check_model_args(args)
    sampling = sampling_from(args)
    engine = load_engine(args)
    session = engine.session(args.system)
    pending: list = []  # images for the next message, already decoded
    last = None  # the speed of the last answer, for /stats
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        try:
            if line.startswith("/"):
                session, pending = command(line, engine, session, pending, args, last)
                continue
            images, pending = pending, []  # attached to this message only, even if it fails
            last = answer(session, line, sampling, images, args.verbose)
        except Exception as err:  # an error never ends the conversation
            if args.debug:
                raise
            say(f"error: {err}")
    return 0


def answer(session, line: str, sampling, images: list, verbose: bool):
    """One answer, printed as it is made; Ctrl-C stops it after the current token (the conversation goes on, with
    the part already printed in it). Returns the answer's speed."""
    from ..engine.speed import Speed, memory_text

    speed = Speed()
    pieces = session.chat_stream(line, sampling, images=images, speed=speed)
    stopped = False
    with CtrlC() as ctrl_c:
        try:
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
                if ctrl_c.pressed:
                    stopped = True
                    break
        finally:
            pieces.close()  # commits the answer (all of it, or the part made before Ctrl-C)
    print(flush=True)
    if stopped:
        say("answer stopped by Ctrl-C; the part above stays in the conversation")
    if verbose:
        say(f"{speed.describe()}; {memory_text(session.stats.state_bytes)}")
    return speed


def command(line: str, engine, session, pending: list, args, last=None):
    """One /command; returns the (possibly new) session and the pending images."""
    from ..engine.speed import memory_text, plural

    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name == "/image" and rest:
        try:
            pending.append(read_image(rest, "/image"))
        except CliError as err:
            say(f"{err}; nothing attached")
            return session, pending
        say(f"image attached to the next message: {rest}")
    elif name == "/reset":
        session, pending = engine.session(args.system), []
        say("conversation reset")
    elif name == "/stats":
        s = session.stats
        say(f"{plural(s.tokens, 'token')}, state {mb(s.state_bytes)}, {plural(s.questions, 'turn')}")
        say(f"last answer: {last.describe()}" if last is not None else "no answer yet")
        say(memory_text())
    elif name == "/save" and rest:
        try:
            path = check_output_file(rest, "/save")
        except CliError as err:
            say(f"{err}; nothing saved")
            return session, pending
        say(f"saved {session.save(path)}")
    else:
        say(f"unknown command {line}; known: {COMMANDS}")
    return session, pending
