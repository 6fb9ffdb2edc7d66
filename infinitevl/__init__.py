"""InfiniteVL: a vision-language model with constant-size memory (Gated DeltaNet + sliding-window attention)."""

from .config import InfiniteVLConfig
from .engine.generation import SamplingParams
from .engine.runtime import InfiniteVL
from .engine.session import StreamSession
from .model import InfiniteVLForConditionalGeneration
from .state import InfiniteVLState

__version__ = "0.1.0"
__all__ = [
    "InfiniteVL",
    "InfiniteVLConfig",
    "InfiniteVLForConditionalGeneration",
    "InfiniteVLState",
    "SamplingParams",
    "StreamSession",
]
