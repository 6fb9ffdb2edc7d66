"""Quality of bf16, int8 and int4 against fp32: on trained weights (the bundled model) and on the official fixture.

  - demo accuracy: the held-out stream and questions of `infinitevl demo` for several seeds, played frame by frame
    into a streaming session and answered greedily in every mode, exactly as `make demo` does;
  - per-token KL(fp32 || mode) and top-1 agreement on other held-out streams of the same task, each given as one
    prompt with its question and answer (every position of every stream counts, mean and worst stream reported);
  - the official-tiny fixture: each mode's full-pass logits against the logits recorded from the official code
    (relative error ||d|| / ||logits|| and max |d|) and the greedy next-token agreement. Its weights are random with
    a large spread, which amplifies any rounding: a table, not a verdict.

Modes: fp32 (the reference), bf16, int8 (per row), int4 (groups of `group_size`; the fixture, 64 wide, needs 32);
int8 / int4 quantize the decoder while loading, with bf16 activations and an int8 embedding / LM head;
int8-products: fp32 weights, the tower and every product of 32 rows or more through int8 x int8 products
(`--int8-products`), int8-products-all: every product of the tower and the decoder layers through them. Rerun this
section alone after the bundled model changes: `infinitevl bench --only quality`.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

MODES = {  # name: (quantize, embeddings); every mode but fp32 runs in bf16
    "fp32": (None, None),
    "bf16": (None, None),
    "int8": ("int8", None),
    "int4": ("int4", None),
    "int4-bf16-head": ("int4", "none"),  # what the int8 embedding / LM head costs in quality
}
# fp32 weights with the int8 x int8 products of `--int8-products` (ops/int8_products.py) from this many rows on: as a
# user gets them (decode keeps fp32), and on every product (decode's too: a bound on what they can cost)
INT8_PRODUCTS = {"int8-products": None, "int8-products-all": 1}


def load(folder, mode: str, group_size: int):
    import torch

    from ..model import InfiniteVLForConditionalGeneration

    if mode == "fp32":
        return InfiniteVLForConditionalGeneration.from_pretrained(folder)
    if mode in INT8_PRODUCTS:
        model = InfiniteVLForConditionalGeneration.from_pretrained(folder)
        model.use_int8_products(INT8_PRODUCTS[mode])
        return model
    quantize, embeddings = MODES[mode]
    return InfiniteVLForConditionalGeneration.from_pretrained(
        folder,
        dtype=torch.bfloat16,
        quantize=quantize,
        group_size=group_size if quantize == "int4" else None,
        embeddings=embeddings,
    )


def demo_accuracy(folder: Path, mode: str, group_size: int, seeds: list[int], frames: int, media) -> dict:
    from ..engine.generation import SamplingParams
    from ..engine.session import StreamSession
    from ..processing.processor import Processor
    from ..tasks.digit_recall import FRAME, demo_stream

    model = load(folder, mode, group_size)
    processor = Processor.from_pretrained(folder, model.config)
    rows = []
    for seed in seeds:
        stream, truth = demo_stream(frames, seed, media)
        session = StreamSession(model, processor, frame_size=(FRAME, FRAME))
        for i, frame in enumerate(stream.frames):
            session.append_frame(frame.image, float(i))
        for tag, (digit, distance) in sorted(truth.items(), key=lambda kv: -kv[1][1]):
            question = f"Which digit was last shown with tag {tag}?"
            answer = session.ask(question, SamplingParams(max_new_tokens=3)).strip()
            rows.append({"seed": seed, "tag": tag, "distance": distance, "answer": answer, "truth": str(digit)})
    right = sum(r["answer"] == r["truth"] for r in rows)
    return {"correct": right, "questions": len(rows), "accuracy": right / len(rows), "answers": rows}


def held_out_prompts(folder: Path, n_streams: int, frames: int, media, seed: int) -> list[dict]:
    from ..processing.processor import Processor
    from ..tasks.digit_recall import FRAME, FrameMaker, probe_stream

    processor = Processor.from_pretrained(folder)
    maker = FrameMaker("eval", seed, media)
    rng = random.Random(f"quality-{seed}")
    prompts = []
    for _ in range(n_streams):
        distances = sorted({rng.randrange(frames // 2, frames), rng.randrange(4, frames // 2), rng.randrange(0, 4)})
        stream, _ = probe_stream(maker, frames, distances, rng)
        video = processor.encode_stream([f.image for f in stream.frames], size=(FRAME, FRAME))
        messages = [
            {"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": stream.question}]},
            {"role": "assistant", "content": stream.answer},
        ]
        prompts.append(processor.prompt(messages, add_generation_prompt=False).model_inputs())
    return prompts


def token_agreement(reference: list, logits: list, text_next: list | None = None) -> dict:
    """Per-token KL(reference || other) and top-1 agreement over all positions of all prompts, and top-1 agreement
    where the next token is text (`text_next`: a mask per prompt). At positions followed by a vision placeholder the
    model never learned a prediction (its choices there are near-ties), so agreement there says little."""
    import torch

    kls, agree, worst, text_agree, text_tokens = [], 0, 0.0, 0, 0
    for i, (ref, got) in enumerate(zip(reference, logits)):
        lp, lq = ref.float().log_softmax(-1), got.float().log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        kls.append(kl)
        same = ref.argmax(-1) == got.argmax(-1)
        agree += int(same.sum())
        if text_next is not None:
            text_agree += int(same[text_next[i]].sum())
            text_tokens += int(text_next[i].sum())
        worst = max(worst, float(kl.mean()))
    every = torch.cat(kls)
    out = {
        "tokens": every.numel(),
        "kl_mean": float(every.mean()),
        "kl_p99": float(every.quantile(0.99)),
        "kl_worst_stream": worst,
        "top1_agreement": agree / every.numel(),
    }
    if text_tokens:
        out |= {"top1_text_next": text_agree / text_tokens, "text_next_tokens": text_tokens}
    return out


def text_next_mask(input_ids, placeholder_ids: tuple[int, ...]):
    """True at the positions whose next token is not a vision placeholder (the last position included)."""
    import torch

    ids = input_ids[0]
    nxt = torch.ones_like(ids, dtype=torch.bool)
    nxt[:-1] = ~torch.isin(ids[1:], torch.tensor(placeholder_ids))
    return nxt


def fixture_errors(fixture: Path, mode: str, group_size: int) -> list[dict]:
    import torch
    from safetensors.torch import load_file

    inputs = load_file(str(fixture / "inputs.safetensors"))
    expected = load_file(str(fixture / "expected.safetensors"))
    model = load(fixture, mode, group_size)
    rows = []
    for case in ("text", "image", "video", "multi"):
        args = {k.split(".", 1)[1]: v for k, v in inputs.items() if k.startswith(case + ".") and "prefill_len" not in k}
        ref = expected[f"{case}.logits_full"]
        with torch.no_grad():
            got = model(**args).logits.float()
        rows.append(
            {
                "case": case,
                "relative_error": float((got - ref).norm() / ref.norm()),
                "max_abs_error": float((got - ref).abs().max()),
                "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
            }
        )
    return rows


def run(plan, progress) -> dict[str, Any]:
    import torch

    from ..defaults import default_model_folder

    q = plan.quality
    folder = Path(q.get("model") or default_model_folder())
    media = None  # the photographs the package ships
    shown = folder.resolve()
    shown = shown.relative_to(Path.cwd()) if shown.is_relative_to(Path.cwd()) else shown
    out: dict[str, Any] = {"model": str(shown), "modes": {}, "fixture": {}}
    prompts = held_out_prompts(folder, q["kl_streams"], q["kl_frames"], media, q["kl_seed"])
    reference = None
    for mode in q["modes"]:
        start = time.perf_counter()
        model = load(folder, mode, q["group_size"])
        with torch.no_grad():
            logits = [model(**p).logits[0] for p in prompts]
        if mode == "fp32":
            reference = logits
        placeholders = (model.config.image_token_id, model.config.video_token_id)
        masks = [text_next_mask(p["input_ids"], placeholders) for p in prompts]
        entry = {"agreement": token_agreement(reference, logits, masks)}
        entry["demo"] = demo_accuracy(folder, mode, q["group_size"], q["demo_seeds"], q["demo_frames"], media)
        entry["seconds"] = time.perf_counter() - start
        out["modes"][mode] = entry
        a, d = entry["agreement"], entry["demo"]
        progress(
            f"quality {mode}: demo {d['correct']}/{d['questions']}, KL {a['kl_mean']:.2e}, top-1 "
            f"{a['top1_agreement']:.3f} over {a['tokens']} tokens ({a.get('top1_text_next', float('nan')):.3f} where "
            f"text follows)"
        )
    fixture = Path(q["fixture"]) if q.get("fixture") else None
    if fixture is not None and fixture.exists():
        for mode in q["modes"]:
            out["fixture"][mode] = fixture_errors(fixture, mode, q["fixture_group_size"])
    else:
        progress(f"quality: no fixture at {fixture}; its table is skipped")
    return out
