"""The InfiniteVL model: hybrid decoder (Gated DeltaNet + sliding-window attention) and Qwen2.5-VL vision tower."""

from .vlm import InfiniteVLForConditionalGeneration, InfiniteVLOutput

__all__ = ["InfiniteVLForConditionalGeneration", "InfiniteVLOutput"]
