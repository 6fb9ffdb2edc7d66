"""`infinitevl chat`: an interactive multi-turn conversation in constant memory.

Lines typed are user messages; `/image PATH` attaches an image to the next message (the file is read at once),
`/stats` shows the state, `/save PATH` writes a snapshot, `/reset` starts over, `/quit` (or end of input) leaves.
A mistake (a missing file, a failed save) is reported and the conversation goes on."""

from __future__ import annotations

import sys

from .common import (
    CliError,
    add_model_args,
    add_sampling_args,
    check_model_args,
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
                session, pending = command(line, engine, session, pending, args)
                continue
            images, pending = pending, []  # attached to this message only, even if it fails
            print(session.chat(line, sampling, images=images), flush=True)
        except Exception as err:  # an error never ends the conversation
            if args.debug:
                raise
            say(f"error: {err}")
    return 0


def command(line: str, engine, session, pending: list, args):
    """One /command; returns the (possibly new) session and the pending images."""
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
        say(f"tokens {s.tokens}, state {mb(s.state_bytes)}, turns {s.questions}")
    elif name == "/save" and rest:
        say(f"saved {session.save(rest)}")
    else:
        say(f"unknown command {line}; known: {COMMANDS}")
    return session, pending
