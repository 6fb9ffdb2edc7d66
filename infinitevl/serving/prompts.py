"""From validated requests to the engine's token ids, within the tokens-per-request limit, cheaply refused first.

Huge prompts are refused before they cost anything: a text cannot have fewer tokens than its UTF-8 bytes divided by
the tokenizer's longest token, so a prompt over that bound is refused without tokenizing; below it, the text is
counted piece by piece and the count stops as soon as it passes the limit. Only then is the prompt tokenized (and
its media decoded). Everything here runs in the event loop's thread pool, never on the loop or the model's thread.
Message text is tokenized as plain text (`Processor.chat_ids`); a completion prompt given as text is plain text too,
and control tokens reach the model only as token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..processing.media import MediaError
from ..processing.processor import Prompt
from .config import ServerConfig
from .errors import APIError
from .media import MediaLoader
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, Unsupported

PIECE_CHARS = 16384  # characters counted at a time while looking for the limit


@dataclass
class TextBudget:
    """The limit on prompt tokens of one request, and the cheapest ways to see that a text exceeds it."""

    limit: int
    max_token_bytes: int  # the longest token of the vocabulary, in UTF-8 bytes

    @classmethod
    def of(cls, processor, limit: int) -> TextBudget:
        tok = processor.tokenizer
        added = set(tok.get_added_vocab())
        longest = max((len(t) for t in tok.get_vocab() if t not in added), default=1)
        return cls(limit, max(longest, 1))  # byte-level vocabularies spell one byte per character

    def check(self, texts: list[str], processor, param: str) -> None:
        """Refuse texts that certainly have more than `limit` tokens, without tokenizing what is far over it."""
        nbytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if nbytes // self.max_token_bytes > self.limit:
            raise _too_long(f"the text has {nbytes} bytes, more than {self.limit} tokens can hold", self.limit, param)
        count = 0
        for text in texts:
            for s in range(0, len(text), PIECE_CHARS):
                count += len(processor.tokenize_text(text[s : s + PIECE_CHARS]))
                if count > self.limit + len(text) // PIECE_CHARS + 1:  # pieces may add a token at each cut
                    raise _too_long(f"the text has more than {self.limit} tokens", self.limit, param)


def _too_long(what: str, limit: int, param: str) -> APIError:
    return APIError(
        400,
        f"{what}; this server allows {limit} tokens per request (prompt and completion)",
        code="context_length_exceeded",
        param=param,
    )


def check_supported(req: SamplingFields) -> None:
    problem: Unsupported | None = req.unsupported()
    if problem is not None:
        raise APIError(400, str(problem), code="unsupported_parameter", param=problem.param)


def chat_prompt(engine, media: MediaLoader, budget: TextBudget, req: ChatCompletionRequest) -> Prompt:
    """Check the text against the limit, decode every image and video, then render, tokenize and expand."""
    texts = []
    for m in req.messages:
        texts += [m.content] if isinstance(m.content, str) else [p.text for p in m.content if p.type == "text"]
    budget.check(texts, engine.processor, "messages")
    processor = engine.processor
    messages = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            messages.append({"role": role, "content": m.content})
            continue
        parts: list[dict] = []
        for j, part in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            try:
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                elif part.type == "image_url":
                    image = media.image(part.image_url.url, where)
                    parts.append({"type": "image", "image": processor.encode_image(image)})
                else:
                    video = media.video(part.video_url.url, where=where)
                    parts.append({"type": "video", "video": processor.encode_video(video)})
            except MediaError as err:  # e.g. an aspect ratio the processor cannot resize
                raise APIError(400, f"{where}: {err}", code="invalid_media", param=where) from err
        messages.append({"role": role, "content": parts})
    try:
        return processor.prompt(messages)
    except ValueError as err:
        raise APIError(400, f"messages: {err}", code="invalid_request", param="messages") from err


def completion_prompts(engine, budget: TextBudget, req: CompletionRequest) -> list[list[int]]:
    """Each prompt of a completions request as token ids (text as plain text; ids checked against the vocabulary)."""
    vocab = engine.model.config.text.vocab_size
    out = []
    for i, p in enumerate(req.prompts()):
        where = "prompt" if not isinstance(req.prompt, list) or isinstance(req.prompt[0], int) else f"prompt[{i}]"
        if isinstance(p, str):
            budget.check([p], engine.processor, where)
            ids = engine.processor.tokenize_text(p)
        else:
            ids = list(p)
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"{where}: {bad} is not a token id in [0, {vocab})", param=where)
        if not ids:
            raise APIError(400, f"{where}: the prompt is empty", param=where)
        out.append(ids)
    return out


def completion_budget(req: SamplingFields, prompt_tokens: int, config: ServerConfig, minimum: int = 1) -> int:
    """max_new_tokens for a request, within the tokens-per-request limit."""
    limit = config.max_request_tokens
    room = limit - prompt_tokens
    requested = req.max_completion_tokens or req.max_tokens
    if room < minimum or (requested is not None and requested > room):
        asked = f" plus max_tokens {requested}" if requested is not None else ""
        raise APIError(
            400,
            f"the prompt has {prompt_tokens} tokens{asked}; this server allows {limit} tokens per request "
            "(prompt and completion)",
            code="context_length_exceeded",
            param="max_tokens" if room >= minimum else "messages",
        )
    return requested if requested is not None else min(config.default_max_tokens, room)


def prompt_tensor(ids: list[int]) -> dict:
    return {"input_ids": torch.tensor([ids])}
