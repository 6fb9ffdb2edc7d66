"""InfiniteVL: a vision-language model with constant-size memory (Gated DeltaNet + sliding-window attention).

The public names load on first use, so that `infinitevl --help` and light imports stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "InfiniteVL": "infinitevl.engine.runtime",
    "InfiniteVLConfig": "infinitevl.config",
    "InfiniteVLForConditionalGeneration": "infinitevl.model",
    "InfiniteVLState": "infinitevl.state",
    "SamplingParams": "infinitevl.engine.generation",
    "StreamSession": "infinitevl.engine.session",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'infinitevl' has no attribute {name!r}")
