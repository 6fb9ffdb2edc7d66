"""Measuring helpers shared by the sections: repeated timings with their median, interleaved comparisons, a
sampler of the process's resident memory, deadlines and progress lines.

Every measurement keeps all its repetitions (`times_s`) next to the summary, so that the report can show the spread
and nothing is typed in afterwards.
"""

from __future__ import annotations

import gc
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

GiB = 2**30
MiB = 2**20


def summary(times: list[float]) -> dict[str, Any]:
    """All repetitions and their median / min / max (seconds, to 0.1 microsecond)."""
    times = [round(t, 7) for t in times]
    return {
        "times_s": times,
        "median_s": statistics.median(times) if times else None,
        "min_s": min(times) if times else None,
        "max_s": max(times) if times else None,
        "repeats": len(times),
    }


def time_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    fn: Callable[[], Any], repeats: int, warmup: int = 1, deadline: float | None = None, min_repeats: int = 1
) -> dict[str, Any]:
    """Time `fn` `repeats` times after `warmup` untimed calls; stops early (after `min_repeats`) past `deadline`
    (a `time.perf_counter()` value)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        times.append(time_call(fn))
        if deadline is not None and time.perf_counter() > deadline and len(times) >= min_repeats:
            break
    return summary(times)


def measure_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Time several functions alternately (a, b, a, b, ...) so that slow phases of a shared machine hit all of them
    alike; each gets `warmup` untimed calls first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn))
    return {name: summary(ts) for name, ts in times.items()}


def rss() -> int:
    """Resident set size of this process now (bytes)."""
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident set size of this process's memory so far (bytes).

    On Linux this is `VmHWM`, the high-water mark of the current address space. getrusage's ru_maxrss is not used
    there: it survives fork and exec, so a worker started by a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def available_ram() -> int:
    return psutil.virtual_memory().available


def free_memory(settle_s: float = 0.0) -> None:
    """Collect garbage and return freed heap pages to the OS; `settle_s` then waits for the kernel's own work on
    gigabytes just released (page reclaim shows up as noise in the next timings otherwise)."""
    gc.collect()
    try:  # give freed heap pages back to the OS so that RSS and `available` reflect the release
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if settle_s:
        time.sleep(settle_s)


class RSSSampler:
    """Samples this process's RSS in a background thread; `peak` is the highest value seen inside the block (a
    sampled peak: spikes shorter than `interval` can be missed)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RSSSampler:
        self.start = self.peak = rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss())


def _busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (every core, idle and I/O wait excluded)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own_seconds() -> float:
    """CPU seconds this process and its children (finished or running) have used."""
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            pass
    return total


class OtherLoad:
    """How many cores other processes kept busy while the block ran (machine CPU time, including time a hypervisor
    stole for other guests, minus this process tree's, per wall-clock second), sampled in a background thread: the
    benchmark's own work does not count."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OtherLoad:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        last = (time.perf_counter(), _busy_seconds(), _own_seconds())
        while not self._stop.wait(self.interval):
            now = (time.perf_counter(), _busy_seconds(), _own_seconds())
            wall = now[0] - last[0]
            if wall > 0:
                self.samples.append(max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / wall))
            last = now

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict[str, float | int]:
        s = self.samples
        return {
            "mean_cores": round(sum(s) / len(s), 3) if s else 0.0,
            "max_cores": round(max(s), 3) if s else 0.0,
            "samples": len(s),
        }


class Progress:
    """One line per event on stderr, with the time since the run started."""

    def __init__(self, quiet: bool = False):
        self.t0 = time.perf_counter()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[bench {time.perf_counter() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_tokens(n: int) -> str:
    """1024 -> 1K, 1048576 -> 1M (binary prefixes, as the contexts are powers of two)."""
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
