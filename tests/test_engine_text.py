"""Streamed answer text: pieces end at character boundaries, so a character whose UTF-8 bytes arrive in several tokens
is printed whole, never as U+FFFD, and the pieces join to the full decode."""

from __future__ import annotations

from infinitevl.config import tiny_config
from infinitevl.defaults import tiny_tokenizer
from infinitevl.engine.text import stream_text


class Decoder:
    def __init__(self):
        self.tokenizer = tiny_tokenizer(tiny_config())  # byte-level: one token per UTF-8 byte

    def decode(self, ids):
        return self.tokenizer.decode(ids)


def test_multi_byte_characters_split_over_tokens_stream_whole():
    processor = Decoder()
    text = "naïve café: 3 € for 🍰, ok"
    ids = processor.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))  # every byte its own token: the characters are split
    pieces = list(stream_text(ids, processor))
    assert "".join(pieces) == text == processor.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > len(text) // 2  # streamed as the tokens came, not held to the end
