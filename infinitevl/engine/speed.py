"""How fast an answer was made, and how much memory the process used: what `--verbose` and `/stats` print.

`Speed` is filled in by the engine while it works (prompt tokens and the seconds of their prefill, vision tower
included; answer tokens and the seconds spent making them, not the caller's time between them). Nothing here
changes what is computed.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass
class Speed:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    new_tokens: int = 0
    decode_seconds: float = 0.0

    @staticmethod
    def rate(count: int, seconds: float) -> float:
        return count / seconds if seconds > 0 else 0.0

    def describe(self) -> str:
        """e.g. "prefill 120 tokens in 0.31 s (387.1 tokens/s); decode 16 tokens in 0.20 s (80.0 tokens/s)"."""
        pre = rate_text(self.prompt_tokens, "token", self.prefill_seconds)
        dec = rate_text(self.new_tokens, "token", self.decode_seconds)
        return f"prefill {pre}; decode {dec}"


def rate_text(count: int, unit: str, seconds: float) -> str:
    return f"{plural(count, unit)} in {seconds:.2f} s ({Speed.rate(count, seconds):.1f} {unit}s/s)"


def plural(count: int, unit: str) -> str:
    """ "1 frame", "2 frames"."""
    return f"{count} {unit}{'' if count == 1 else 's'}"


def timed(tokens: Iterable[int], speed: Speed) -> Iterator[int]:
    """`tokens`, counting them and the time spent producing them into `speed`."""
    it = iter(tokens)
    while True:
        start = time.perf_counter()
        try:
            token = next(it)
        except StopIteration:
            speed.decode_seconds += time.perf_counter() - start
            return
        speed.decode_seconds += time.perf_counter() - start
        speed.new_tokens += 1
        yield token


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_text(state_bytes: int | None = None) -> str:
    text = f"peak memory (RSS) {peak_rss_bytes() / 2**20:.0f} MiB"
    return text + (f"; state {state_bytes / 2**20:.2f} MiB" if state_bytes is not None else "")
