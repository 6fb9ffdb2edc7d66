"""`infinitevl chat`: an interactive multi-turn conversation in constant memory.

Lines typed are user messages; `/image PATH` attaches an image to the next message, `/stats` shows the state,
`/save PATH` writes a snapshot, `/reset` starts over, `/quit` (or end of input) leaves."""

from __future__ import annotations

import sys

from .common import add_model_args, add_sampling_args, load_engine, mb, sampling_from

HELP = "interactive multi-turn chat (images by path with /image PATH)"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help=HELP, description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    engine = load_engine(args)
    sampling = sampling_from(args)
    session = engine.session(args.system)
    pending: list[str] = []
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
        if line.startswith("/image "):
            pending.append(line[len("/image ") :].strip())
            print(f"[image queued: {pending[-1]}]", file=sys.stderr)
            continue
        if line == "/reset":
            session, pending = engine.session(args.system), []
            print("[conversation reset]", file=sys.stderr)
            continue
        if line == "/stats":
            s = session.stats
            print(f"[tokens {s.tokens}, state {mb(s.state_bytes)}, turns {s.questions}]", file=sys.stderr)
            continue
        if line.startswith("/save "):
            print(f"[saved {session.save(line[len('/save ') :].strip())}]", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(
                f"[unknown command {line.split()[0]}; known: /image PATH, /stats, /save PATH, /reset, /quit]",
                file=sys.stderr,
            )
            continue
        answer = session.chat(line, sampling, images=pending)
        pending = []
        print(answer, flush=True)
    return 0
