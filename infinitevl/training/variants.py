"""The paper's v2 variants made from InfiniteVL-Base (docs/variants.md): a configuration change, no new parameters.

Base has full-attention softmax layers; Online turns them into `sink_sliding_attention` (256 sinks + a 2048-token
window in the paper) and Offline into `block_sparse_attention` (top-64 of 32-token chunks plus the initial chunk and
the local 2048 tokens; dense below 8192). The Gated DeltaNet layers and every weight stay as they are: the new
folder is the old one with another config.json. Long-sequence fine-tuning (`infinitevl sft-long --student <folder>`)
then trains the variant under its own mask, since the mask is the model's.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from ..config import LINEAR, SINK, SPARSE, ConfigError, InfiniteVLConfig, TextConfig

VARIANTS = {"online": SINK, "offline": SPARSE}
# The paper's sizes (v2, section on the variants); InfLLM-V2's reference for the initial / local / dense sizes.
PAPER_OPTIONS = {
    "online": {"num_sink_tokens": 256, "sliding_window": 2048},
    "offline": {
        "sparse_chunk_size": 32,
        "sparse_top_k": 64,
        "sparse_init_chunks": 1,
        "sparse_local_tokens": 2048,
        "sparse_dense_threshold": 8192,
    },
}


def variant_config(config: InfiniteVLConfig, variant: str, **options) -> InfiniteVLConfig:
    """`config` with every softmax layer of the variant's type and its options (the paper's unless given)."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant {variant!r} unknown; known: {sorted(VARIANTS)}")
    known = {f.name for f in dataclasses.fields(TextConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise ConfigError(f"unknown option(s) {bad} for the {variant} variant; e.g. {sorted(PAPER_OPTIONS[variant])}")
    kind = VARIANTS[variant]
    types = [t if t == LINEAR else kind for t in config.text.layer_types]
    if kind not in types:
        raise ConfigError("the model has no softmax-attention layer to turn into a variant")
    changes = {**PAPER_OPTIONS[variant], **options, "layer_types": types}
    if kind == SINK:
        changes["use_sliding_window"] = True
    new = config.replace(**changes)
    new.validate()
    return new


def make_variant(base: str | Path, out: str | Path, variant: str, **options) -> Path:
    """Copy the checkpoint folder `base` to `out` with the variant's config.json (weights unchanged)."""
    base, out = Path(base), Path(out)
    config = variant_config(InfiniteVLConfig.from_file(base), variant, **options)
    if out.resolve() == base.resolve():
        raise ValueError("the variant needs its own folder (--out differs from the base model's)")
    out.mkdir(parents=True, exist_ok=True)
    for path in base.iterdir():
        if path.is_file() and path.name != "config.json":
            shutil.copy2(path, out / path.name)
    config.save(out)
    return out
