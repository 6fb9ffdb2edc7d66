"""The OpenAI-compatible routes: chat completions, completions (what evaluation harnesses score with), models.

Each route validates, builds the prompt in the event loop's thread pool (media decoded, text counted against the
limit before it is tokenized), then queues a `Generation` whose prefill runs chunk by chunk on the worker thread.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from ..engine.answers import prompt_text
from ..engine.generation import SamplingParams
from .errors import APIError
from .fixed import FixedReply
from .observability import current_request_id
from .prefill import prompt_steps
from .prompts import chat_prompt, check_supported, completion_budget, completion_prompts, prompt_tensor
from .responses import Reply, respond
from .sampling import Adjustments, Generation, GenerationHandle
from .schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 429, 500, 503)}
SSE = {"text/event-stream": {"schema": {"type": "string", "description": "chunk events, then [DONE]"}}}
STREAMED = {200: {"content": SSE, "description": "one JSON body, or server-sent events with stream: true"}}


def install_openai_routes(app: FastAPI, ctx) -> None:
    engine, config = ctx.engine, ctx.config
    model = engine.model

    def card() -> ModelCard:
        return ModelCard(
            id=config.model_name, created=ctx.started, max_model_len=config.max_request_tokens, model_note=engine.note
        )

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, tags=["openai"])
    async def models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERRORS, tags=["openai"])
    async def model_card(model_id: str) -> ModelCard:
        check_model(model_id, config)
        return card()

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**ERRORS, **STREAMED}, tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Chat with text, images (`image_url`) and videos (`video_url`); `stream: true` for server-sent events;
        `n` choices, `logprobs` / `top_logprobs`, penalties, `logit_bias`, `seed`, `stop`."""
        check_model(body.model, config)
        check_supported(body)
        prompt = await run_in_threadpool(chat_prompt, engine, ctx.media, ctx.budget, body)
        ids = prompt.input_ids[0].tolist()
        max_new = completion_budget(body, len(ids), config)
        inputs = prompt.model_inputs()
        top = (body.top_logprobs or 0) if body.logprobs else None

        def prepare(row):
            return prompt_steps(model, row, inputs, config.prefill_chunk)

        gen = new_generation(ctx, body, prepare, max_new, history=ids, top_logprobs=top)
        reply = chat_reply(ctx, body, logprobs=body.logprobs)
        fixed = FixedReply.for_prompt(engine, prompt_text(body.messages), max_new, len(ids))
        return await respond(fixed or ctx.scheduler, gen, reply, request)

    @app.post("/v1/completions", response_model=Completion, responses={**ERRORS, **STREAMED}, tags=["openai"])
    async def completions(body: CompletionRequest, request: Request):
        """Text completion of a raw prompt (no chat template): a string, token ids, or a list of either (one
        choice per prompt, `n` each). `echo` with `logprobs` scores the prompt's tokens; `max_tokens` 0 scores
        without generating. Text prompts are plain text: control tokens can only be given as token ids."""
        check_model(body.model, config)
        check_supported(body)
        prompts = await run_in_threadpool(completion_prompts, engine, ctx.budget, body)
        if body.stream and len(prompts) > 1:
            raise APIError(400, "stream: true takes one prompt per request", param="prompt")
        top = body.logprobs
        echo_scores = body.echo and top is not None
        gens, replies = [], []
        for ids in prompts:
            max_new = completion_budget(body, len(ids), config, minimum=0)

            def prepare(row, ids=ids):
                scores = top if echo_scores else None
                return prompt_steps(model, row, prompt_tensor(ids), config.prefill_chunk, scores)

            gen = new_generation(ctx, body, prepare, max_new, history=ids, top_logprobs=top)
            gen.echo_logprobs = echo_scores
            gens.append(gen)
            replies.append(
                Reply(
                    "completion",
                    config.model_name,
                    engine.note,
                    token_text(engine),
                    logprobs=top is not None,
                    echo=engine.processor.decode(ids, skip_special_tokens=False) if body.echo else None,
                    echo_ids=ids if body.echo else None,
                    stream=body.stream,
                    include_usage=bool(body.stream_options and body.stream_options.include_usage),
                )
            )
        if len(gens) == 1:
            return await respond(ctx.scheduler, gens[0], replies[0], request)
        results = await asyncio.gather(
            *(respond(ctx.scheduler, g, r, request) for g, r in zip(gens, replies)), return_exceptions=True
        )
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            for g in gens:
                g.handle.cancel()
            raise failed
        return merge_completions(results, body.n)


def check_model(name: str, config) -> None:
    if name != config.model_name:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {config.model_name!r}",
            code="model_not_found",
            param="model",
        )


def token_text(engine):
    decode = engine.processor.decode
    return lambda token: decode([token], skip_special_tokens=False)


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE spells byte b as one printable character: itself when printable, else chr(256 + k) for the
    k-th non-printable byte. Returns character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in spelled]
    spelled.update({b: chr(256 + k) for k, b in enumerate(others)})
    return {c: b for b, c in spelled.items()}


_TOKEN_BYTES: dict[int, object] = {}


def token_bytes(engine):
    """token id -> the token's own UTF-8 bytes (OpenAI's `bytes`): a token holding part of a character gives its
    bytes, not the replacement character's."""
    processor = engine.processor
    if id(processor) in _TOKEN_BYTES:
        return _TOKEN_BYTES[id(processor)]
    tok, text = processor.tokenizer, token_text(engine)
    backend = getattr(tok, "backend_tokenizer", None)
    byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
    alphabet, added = _byte_alphabet(), set(tok.get_added_vocab())

    def of(token: int) -> list[int]:
        piece = tok.convert_ids_to_tokens(token)
        if byte_level and piece not in added and all(c in alphabet for c in piece):
            return [alphabet[c] for c in piece]
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback (SentencePiece)
            return [int(piece[3:5], 16)]
        return list(text(token).encode("utf-8"))

    _TOKEN_BYTES[id(processor)] = of
    return of


def chat_reply(ctx, body: SamplingFields, logprobs: bool = False) -> Reply:
    return Reply(
        "chat",
        ctx.config.model_name,
        ctx.engine.note,
        token_text(ctx.engine),
        token_bytes=token_bytes(ctx.engine),
        logprobs=logprobs,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


def new_generation(ctx, req: SamplingFields, prepare, max_new_tokens: int, history=None, top_logprobs=None):
    model = ctx.engine.model
    tokenizer = ctx.engine.processor.tokenizer
    return Generation(
        handle=GenerationHandle(asyncio.get_running_loop()),
        prepare=prepare,
        params=sampling_params(req, max_new_tokens),
        decode_text=ctx.engine.processor.decode,
        stop_token_ids=frozenset(model.config.eos_token_ids),
        n=req.n,
        backend=getattr(tokenizer, "backend_tokenizer", None),
        min_tokens=min(req.min_tokens, max_new_tokens),
        ignore_eos=req.ignore_eos,
        request_id=current_request_id(),
        adjust=Adjustments(
            logit_bias(req.logit_bias, model.config.text.vocab_size), req.presence_penalty, req.frequency_penalty
        ),
        top_logprobs=top_logprobs,
        history=list(history or []),
    )


def sampling_params(req: SamplingFields, max_new_tokens: int) -> SamplingParams:
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=req.temperature if req.temperature is not None else 0.0,
        top_k=req.top_k or 0,
        top_p=req.top_p if req.top_p is not None else 1.0,
        repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else 1.0,
        min_p=req.min_p or 0.0,
        stop_strings=stops,
        seed=req.seed,
    )
    try:
        return params.validate()
    except ValueError as err:
        raise APIError(400, str(err), code="invalid_request") from err


def logit_bias(bias: dict[str, float] | None, vocab_size: int):
    import torch

    if not bias:
        return None
    if len(bias) > 1024:
        raise APIError(400, "logit_bias: at most 1024 tokens", param="logit_bias", code="invalid_logit_bias")
    out = torch.zeros(vocab_size)
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
            raise APIError(
                400,
                f"logit_bias: {key[:32]!r} is not a token id in [0, {vocab_size})",
                param="logit_bias",
                code="invalid_logit_bias",
            )
        if not -100 <= value <= 100:
            raise APIError(
                400,
                f"logit_bias: {value} for token {key} is outside [-100, 100]",
                param="logit_bias",
                code="invalid_logit_bias",
            )
        out[int(key)] = value
    return out


def merge_completions(results: list, n: int):
    """One body from the answers to several prompts (choices numbered prompt by prompt), or the first error."""
    import json

    from fastapi.responses import JSONResponse

    bodies = []
    for r in results:
        if r.status_code != 200:
            return r
        bodies.append(json.loads(r.body))
    merged = {**bodies[0], "choices": []}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for p, body in enumerate(bodies):
        for choice in body["choices"]:
            merged["choices"].append({**choice, "index": p * n + choice["index"]})
        for k in usage:
            usage[k] += body["usage"][k]
    merged["usage"] = usage
    return JSONResponse(merged, headers={k: v for k, v in results[0].headers.items() if k.startswith("x-model")})
