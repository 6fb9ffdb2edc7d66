"""Answers that are not sampled: a task model's fixed reply to a prompt outside its tasks.

A model folder whose config lists the tasks it was trained for (the bundled model: `tasks/off_task.py`) answers
every other prompt with one fixed reply. The engine decides this before the model answers, in every entry point
(one-shot generation, chat, a session's questions, the server), so the reply does not depend on the sampling
settings or on what the stream holds. A `FixedAnswer` stands in for a `TokenGenerator`: the same iteration and
the same `unfed` tokens to commit to a conversation.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..tasks.off_task import fixed_reply


class FixedAnswer:
    """The tokens of a fixed reply, as a `TokenGenerator` yields an answer (cut at `max_new_tokens`)."""

    def __init__(self, token_ids: list[int], max_new_tokens: int):
        self.produced = list(token_ids[:max_new_tokens])
        self.fed = 0
        self.finish_reason = "stop" if len(token_ids) <= max_new_tokens else "length"

    @property
    def unfed(self) -> list[int]:
        return self.produced[self.fed :]

    def __iter__(self) -> Iterator[int]:
        yield from self.produced


def prompt_text(messages: list) -> str:
    """The text of the last user message (its text parts joined), what a task model's questions are matched on.
    Messages are dicts as `InfiniteVL.generate` takes them, or objects with the same fields (the server's)."""

    def get(x, key: str, default=None):
        return x.get(key, default) if isinstance(x, dict) else getattr(x, key, default)

    for m in reversed(messages):
        if get(m, "role") == "user":
            content = get(m, "content")
            if isinstance(content, str):
                return content
            return " ".join(get(p, "text") or "" for p in content or [] if get(p, "type") == "text")
    return ""


def fixed_answer(model, processor, prompt: str, max_new_tokens: int) -> FixedAnswer | None:
    """The model's fixed reply to `prompt` when it is a task model and `prompt` is none of its tasks' questions."""
    reply = fixed_reply(model.config.extra, prompt)
    if reply is None:
        return None
    return FixedAnswer(processor.tokenize_text(reply), max_new_tokens)
