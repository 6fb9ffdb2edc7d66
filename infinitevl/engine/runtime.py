"""The engine in one object: a model, its processor, and the ways to use them (one-shot generation, sessions).

engine = InfiniteVL.load("path/to/InfiniteVL")
print(engine.generate([{"role": "user", "content": "Hello"}]).text)
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import InfiniteVLForConditionalGeneration
from ..processing.processor import Processor
from .answers import FixedAnswer, fixed_answer, prompt_text
from .generation import DEFAULT_CHUNK, SamplingParams, TokenGenerator, prefill
from .session import DEFAULT_SYSTEM, StreamSession
from .speed import Speed, timed
from .text import stream_text


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str


class InfiniteVL:
    def __init__(
        self,
        model: InfiniteVLForConditionalGeneration,
        processor: Processor,
        chunk_size: int = DEFAULT_CHUNK,
        dtype_choice: str = "given",
        int8_products: str = "off",
    ):
        self.model = model
        self.processor = processor
        self.chunk_size = chunk_size
        self.dtype_choice = dtype_choice
        self.int8_products = int8_products  # what `load` decided and why (ops/int8_products.py `decide`)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str = "cpu",
        chunk_size: int = DEFAULT_CHUNK,
        quantize: str | None = None,
        group_size: int | None = None,
        int8_products: str = "off",
    ) -> InfiniteVL:
        """A model folder (or hub id); None: the default model that ships with the package. `dtype="auto"` picks
        bf16 where the device computes it fast (see `ops/precision.py`); `quantize` ("int8" / "int4") quantizes
        the decoder's weights while loading (see `InfiniteVLForConditionalGeneration.quantize`); `int8_products`
        ("off", "on", "auto": where a probe finds them faster on this CPU) computes the tower and prefill with int8
        x int8 products (see `ops/int8_products.py`; decode is unchanged)."""
        from ..checkpoint import resolve
        from ..defaults import default_model_folder
        from ..ops.int8_products import check_mode, decide
        from ..ops.precision import resolve_dtype

        folder = default_model_folder() if path is None else resolve(path)
        dtype, choice = resolve_dtype(dtype, device)
        check_mode(int8_products)  # before the model loads
        model = InfiniteVLForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, device=device, quantize=quantize, group_size=group_size
        )
        use, why = decide(int8_products, model.dtype, model.device)
        if use:
            model.use_int8_products()
        return cls(model, Processor.from_pretrained(folder, model.config), chunk_size, choice, why)

    @property
    def precision(self) -> dict:
        """How the model computes: dtype (and how it was chosen), quantization and its kernels, weight bytes."""
        from ..ops.int8_products import packed_bytes
        from ..ops.quant import kernel_name, quantized_bytes

        q = self.model.quantization
        return {
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "dtype_choice": self.dtype_choice,
            "quantization": q.method if q is not None else None,
            "group_size": q.group_size if q is not None else None,
            "embeddings": (q.embeddings if q is not None else "none"),
            "kernel": kernel_name(q.method) if q is not None else "torch matmul",
            "decode_kernels": self.decode_kernels,
            "weight_bytes": quantized_bytes(self.model),
            "int8_products": self.int8_products,
            "int8_products_bytes": packed_bytes(self.model),
        }

    @functools.cached_property
    def decode_kernels(self) -> str:
        """What runs between a decode step's matrix products (ops/fused.py); builds the fused kernels if they apply,
        so that the first request does not wait for the compiler."""
        from ..ops import fused

        return fused.status(self.model.dtype)

    def describe_precision(self) -> str:
        p = self.precision
        text = f"{p['dtype']} ({p['dtype_choice']})"
        if self.model.quantization is not None:
            text += f"; {self.model.quantization.describe()}"
        text += f"; weights {p['weight_bytes'] / 2**20:.1f} MiB; decode: {p['decode_kernels']}"
        if p["int8_products_bytes"]:
            text += f"; int8 products for the tower and prefill ({p['int8_products_bytes'] / 2**20:.1f} MiB more)"
        return text + f"; int8 products: {p['int8_products']}"

    @property
    def untrained(self) -> bool:
        """Whether the model folder says its weights are random (the demo's stand-in)."""
        return bool(self.model.config.extra.get("infinitevl_untrained"))

    @property
    def note(self) -> str | None:
        """What this model can and cannot do, when its folder says it is not a general model (the bundled
        task model, the untrained stand-in), with what to ask a task model; None otherwise."""
        from ..defaults import model_note
        from ..tasks.off_task import task_hint

        parts = [model_note(self.model.config.extra), task_hint(self.model.config.extra)]
        return " ".join(p for p in parts if p) or None

    def session(self, system_prompt: str | None = DEFAULT_SYSTEM, **kwargs) -> StreamSession:
        return StreamSession(self.model, self.processor, system_prompt, chunk_size=self.chunk_size, **kwargs)

    def start(self, messages: list[dict], sampling: SamplingParams) -> tuple[TokenGenerator | FixedAnswer, int]:
        """Prefill a chat and return a token generator over its answer, with the prompt length. A task model's
        answer to a prompt outside its tasks is its fixed reply (`answers.py`), whatever the sampling."""
        sampling.validate()
        prompt = self.processor.prompt(messages)
        fixed = fixed_answer(self.model, self.processor, prompt_text(messages), sampling.max_new_tokens)
        if fixed is not None:
            return fixed, prompt.input_ids.shape[1]
        state = self.model.new_state()
        logits = prefill(self.model, state, prompt.input_ids, chunk_size=self.chunk_size, **_vision(prompt))
        params = sampling.with_stops(self.model.config.eos_token_ids)
        gen = TokenGenerator(
            self.model,
            state,
            logits,
            params,
            decode_text=self.processor.decode,
            prompt_ids=prompt.input_ids[0].tolist(),
        )
        return gen, prompt.input_ids.shape[1]

    def generate_stream(
        self, messages: list[dict], sampling: SamplingParams | None = None, speed: Speed | None = None
    ) -> Iterator[str]:
        """The answer as text pieces, each printable as it comes; `speed`, when given, is filled in as it goes."""
        speed = speed if speed is not None else Speed()
        t0 = time.perf_counter()
        gen, speed.prompt_tokens = self.start(messages, sampling or SamplingParams())
        speed.prefill_seconds = time.perf_counter() - t0
        yield from stream_text(timed(gen, speed), self.processor)

    def generate(self, messages: list[dict], sampling: SamplingParams | None = None) -> Completion:
        gen, n_prompt = self.start(messages, sampling or SamplingParams())
        ids = list(gen)
        return Completion(self.processor.decode(ids), ids, n_prompt, gen.finish_reason or "length")


def _vision(prompt) -> dict:
    inputs = prompt.model_inputs()
    inputs.pop("input_ids")
    return inputs
