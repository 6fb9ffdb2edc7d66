"""The llama.cpp peer in the report's precision section (its markdown and its targets), from the `llamacpp` part of
the precision record (bench/llamacpp.py). Records from before the hybrid hold only the Transformer's types at the
top of that part; they render as they did."""

from __future__ import annotations

from typing import Any

from .llamacpp import outcome
from .timing import fmt_tokens

PAIRS = (("Q8_0", "int8"), ("Q4_0", "int4"))


def _ms(p: dict | None) -> str:
    return f"{p['median_s'] * 1e3:.1f}" if p else "-"


def _points(m: dict) -> dict[int, dict]:
    return {p["context"]: p for p in m.get("decode", [])} if m.get("status") == "measured" else {}


def _build(lcpp: dict) -> str:
    flags = lcpp.get("build_flags")
    if flags is None:
        return ""
    amx = [f for f in flags if f.startswith("AMX")]
    return f" Built with {' '.join(flags) or 'no CPU feature flags'}" + (
        "." if amx else " (no AMX: its tile path traps with SIGILL in this VM; `make peer`)."
    )


def transformer_md(lcpp: dict, modes: dict) -> str:
    rows = []
    for kind, ours in (("Q4_0", "int4"), ("Q8_0", "int8")):
        theirs = lcpp.get(kind, {})
        if theirs.get("status") != "measured":
            rows.append([f"llama.cpp {kind}", "-", outcome(theirs), f"InfiniteVL {ours}", "-"])
            continue
        mine = _points(modes.get(ours, {}))
        for p in theirs["decode"]:
            o = mine.get(p["context"])
            rows.append(
                [
                    f"llama.cpp {kind}",
                    fmt_tokens(p["context"]),
                    _ms(p),
                    f"InfiniteVL {ours}: {_ms(o)}",
                    f"{o['median_s'] / p['median_s']:.2f}x" if o else "-",
                ]
            )
    return (
        f"llama.cpp {lcpp.get('version', '')} on {lcpp.get('model', '')} ({lcpp.get('threads')} threads), in the "
        f"same run:{_build(lcpp)}\n\n" + _table(["engine", "context", "decode ms", "ours ms", "ours / llama.cpp"], rows)
    )


def hybrid_md(h: dict, modes: dict) -> str:
    """The Qwen3.5-style hybrid beside our int8 / int4: decode at every context, prefill, the ratio at the first."""
    contexts = sorted({c for kind, _ in PAIRS for c in _points(h.get(kind, {}))})
    contexts = contexts or sorted({p["context"] for m in modes.values() for p in m.get("decode", [])})
    rows, ratios = [], []
    for kind, ours in PAIRS:
        theirs, mine = h.get(kind, {}), modes.get(ours, {})
        for name, m in ((f"llama.cpp qwen35 {kind}", theirs), (f"InfiniteVL {ours}", mine)):
            if m.get("status") != "measured":
                rows.append([name, outcome(m)] + ["-"] * (len(contexts) + 1))
                continue
            pts = _points(m)
            pre = m.get("prefill")
            rows.append(
                [name, "measured"]
                + [_ms(pts.get(c)) for c in contexts]
                + [f"{pre['tokens_per_s']:.1f} ({fmt_tokens(pre['tokens'])})" if pre else "-"]
            )
        a, b = _points(mine).get(contexts[0]) if contexts else None, _points(theirs).get(contexts[0] if contexts else 0)
        if a and b:
            ratios.append(
                f"InfiniteVL {ours} / llama.cpp qwen35 {kind} at {fmt_tokens(contexts[0])}: "
                f"{a['median_s'] / b['median_s']:.2f}x its time per token"
            )
    head = ["engine", "status"] + [f"decode ms at {fmt_tokens(c)}" for c in contexts] + ["prefill tok/s (tokens)"]
    return (
        f"llama.cpp beside the same kind of model: {h.get('model', '')}, in the same run. Its attention layers "
        "attend over the whole context (ours: a sliding window), and its decode contexts are its real prefill's "
        "attention cells repeated, with the recurrent state that prefill left (see below).\n\n"
        + _table(head, rows)
        + ("\n\n" + "; ".join(ratios) + " (the issue's target for int8: within 1.3x)." if ratios else "")
    )


def llamacpp_md(lcpp: dict, r: dict) -> str:
    if lcpp.get("status") != "measured":
        stage = f" in its {lcpp['stage']}" if lcpp.get("stage") else ""
        return f"llama.cpp: {outcome(lcpp)}{stage}."
    text = transformer_md(lcpp, r["modes"])
    if lcpp.get("qwen35"):
        from . import gguf_models, llamacpp

        docs = "\n\n".join(m.__doc__.strip() for m in (llamacpp, gguf_models))
        text += "\n\n" + hybrid_md(lcpp["qwen35"], r["modes"])
        text += "\n\n<details><summary>The llama.cpp models and their contexts</summary>\n\n```\n" + docs
        text += "\n```\n</details>"
    return text


def llamacpp_targets(lcpp: dict, modes: dict, cpu: str, target) -> list[dict[str, Any]]:
    """Our int4 / int8 decode against llama.cpp's Q4_0 / Q8_0: within 1.3x at the first context, faster at the
    longest; against the Transformer and (when measured) the hybrid."""
    out = []
    peers = [("", lcpp)] + ([("qwen35 ", lcpp["qwen35"])] if lcpp.get("qwen35") else [])
    for label, peer in peers:
        for kind, ours in (("Q4_0", "int4"), ("Q8_0", "int8")):
            mine, pts = modes.get(ours, {}), _points(peer.get(kind, {}))
            if mine.get("status") != "measured" or mine["decode"][0]["context"] not in pts:
                continue
            first = mine["decode"][0]
            other = pts[first["context"]]["median_s"]
            out.append(
                target(
                    f"precision: {ours} decode within 1.3x of llama.cpp {label}{kind} at {fmt_tokens(first['context'])}",
                    first["median_s"] <= 1.3 * other,
                    f"{first['median_s'] / other:.2f}x llama.cpp's time",
                    f"{first['median_s'] * 1e3:.0f} vs {other * 1e3:.0f} ms ({peer.get('model', '')}); {cpu}",
                )
            )
            longest = max(p for p in pts if p in {x["context"] for x in mine["decode"]})
            if longest != first["context"]:
                a = next(x for x in mine["decode"] if x["context"] == longest)["median_s"]
                b = pts[longest]["median_s"]
                out.append(
                    target(
                        f"precision: {ours} decode faster than llama.cpp {label}{kind} at {fmt_tokens(longest)}",
                        a < b,
                        f"{b / a:.2f}x faster" if a < b else f"{a / b:.2f}x slower",
                        f"{a * 1e3:.0f} vs {b * 1e3:.0f} ms",
                    )
                )
    return out


def _table(header: list[str], rows: list[list]) -> str:
    from .report import _table as table

    return table(header, rows)
