"""Incremental detokenisation: text pieces that are safe to print as tokens arrive (no split UTF-8 characters)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class TextStreamer:
    def __init__(self, processor):
        self.decode = processor.decode
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return ""
        piece, self.emitted = text[len(self.emitted) :], text
        return piece

    def flush(self) -> str:
        text = self.decode(self.ids)
        piece, self.emitted = text[len(self.emitted) :], text
        return piece


def stream_text(tokens: Iterable[int], processor) -> Iterator[str]:
    """Text pieces for a token iterator, each printable as it comes."""
    streamer = TextStreamer(processor)
    for token in tokens:
        piece = streamer.push(token)
        if piece:
            yield piece
    tail = streamer.flush()
    if tail:
        yield tail
