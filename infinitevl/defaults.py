"""Where the default model comes from: the small checkpoint bundled with the package, else an untrained stand-in.

The stand-in is a tiny model with random weights, built from a config on first use and cached; everything that
prints its answers says that they are untrained.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

BUNDLED = Path(__file__).parent / "assets" / "default-model"
BUNDLED_SWA_ONLY = Path(__file__).parent / "assets" / "swa-only-model"  # the demo's contrast: the window alone
# Real photographs, videos, a conversation dataset and Wikipedia text (LLaMA-Factory's demo data, Apache-2.0; see
# its README): the demo, the miniature, the examples, the benchmarks and the tests use these files.
MEDIA = Path(__file__).parent / "assets" / "media"
PHOTOS = MEDIA / "mllm_demo" / "mllm_demo_data"


def media_file(path: Path) -> Path:
    """A file the package ships, or an error naming it (a partial install or a damaged clone), never a fallback."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: it ships with the package (reinstall it, or clone the repository again)"
        )
    return path


UNTRAINED_NOTE = "infinitevl_untrained"
NOTE_KEY = "infinitevl_note"  # config.json: what a model was trained for, said once to whoever uses it
BUNDLED_NOTE = (
    "the bundled model (4.6 MB) was trained by `infinitevl miniature` for two tasks only, on streams of small frames "
    "of handwritten digits with tag letters: which digit was last shown with a tag, and reading back every digit of "
    "the last 1-4 frames. It answers any other prompt with one fixed reply and has no general knowledge. Run a real "
    "checkpoint with --model PATH (e.g. a download of hustvl/InfiniteVL)."
)
SWA_ONLY_NOTE = (
    "the SWA-only model of `infinitevl miniature` (every layer sliding-window attention, 32 tokens), shipped as the "
    "demo's contrast: it was trained on the same two digit tasks as the bundled model and sees only its window."
)
UNTRAINED_TEXT = (
    "this model has random, untrained weights (a stand-in until a trained model is given with --model); its answers "
    "are meaningless."
)


def model_note(extra: dict) -> str | None:
    """What a user must know about a model before reading its answers, from its config's extra keys; None for a
    general model."""
    if extra.get(UNTRAINED_NOTE):
        return UNTRAINED_TEXT
    note = extra.get(NOTE_KEY)
    return str(note) if note else None


def cache_dir() -> Path:
    return Path(os.environ.get("INFINITEVL_CACHE", Path.home() / ".cache" / "infinitevl"))


def default_model_folder() -> Path:
    if (BUNDLED / "config.json").exists():
        return BUNDLED
    folder = cache_dir() / "untrained-tiny"
    if not (folder / "config.json").exists():
        make_untrained_model(folder)
    return folder


def make_untrained_model(folder: str | Path, seed: int = 0, **text_overrides) -> Path:
    """A tiny InfiniteVL with random weights, a byte-level tokenizer and a processor config, in the official
    folder layout. Its config carries a note that it is untrained."""
    from .config import tiny_config
    from .model import InfiniteVLForConditionalGeneration
    from .processing.processor import Processor

    folder = Path(folder)
    config = tiny_config(**text_overrides)
    config.extra[UNTRAINED_NOTE] = True
    model = InfiniteVLForConditionalGeneration.from_config(config, dtype=torch.float32, seed=seed)
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer = tiny_tokenizer(config)
    Processor(tokenizer, config, min_pixels=56 * 56, max_pixels=448 * 448).save_pretrained(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def tiny_tokenizer(config):
    """The byte-level tokenizer matching `config.tiny_config()`'s special-token ids (<|im_start|> at 375)."""
    from .processing.tokenizer import tokenizer_for

    return tokenizer_for(config)
