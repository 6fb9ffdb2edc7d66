"""A task model's fixed reply, answered without the model (as the engine does: `engine/answers.py`).

The bundled model answers only its tasks' questions; any other chat message or session question gets its fixed
reply, the same one `infinitevl generate`, `chat` and `StreamSession.ask` give, whatever the sampling settings.
`FixedReply` stands in for the scheduler: it posts the reply's tokens as the events of each choice, so the answer
has the same shape (JSON or server-sent events) as a generated one.
"""

from __future__ import annotations

from ..engine.answers import fixed_answer
from .sampling import Event, Generation, TokenInfo


class FixedReply:
    def __init__(self, token_ids: list[int], finish_reason: str, decode, prompt_tokens: int):
        self.token_ids, self.finish_reason, self.decode = token_ids, finish_reason, decode
        self.prompt_tokens = prompt_tokens

    @classmethod
    def for_prompt(cls, engine, prompt: str, max_new_tokens: int, prompt_tokens: int) -> FixedReply | None:
        """The stand-in when `engine`'s model is a task model and `prompt` is none of its questions, else None."""
        fixed = fixed_answer(engine.model, engine.processor, prompt, max_new_tokens)
        if fixed is None:
            return None
        return cls(fixed.produced, fixed.finish_reason, engine.processor.decode, prompt_tokens)

    def submit_generation(self, gen: Generation) -> None:
        post = gen.handle.post
        post(Event("started", prompt_tokens=self.prompt_tokens))
        for index in range(gen.n):
            for i, token in enumerate(self.token_ids):
                # each token's text as the full decode continues it (the reply is plain ASCII-safe text)
                text = self.decode(self.token_ids[: i + 1])[len(self.decode(self.token_ids[:i])) :]
                post(Event("text", index=index, text=text, logprobs=[TokenInfo(token, 0.0, [])]))
            post(Event("done", index=index, finish_reason=self.finish_reason, completion_tokens=len(self.token_ids)))
