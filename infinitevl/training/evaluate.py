"""Held-out numbers that show what a stage did: the student's KL to the teacher, both perplexities, next-token
agreement, and the layer-wise MSE of the GDN layers fed the teacher's inputs."""

from __future__ import annotations

import math

import torch

from ..config import LINEAR
from .collate import collate, model_inputs, valid_mask
from .losses import cross_entropy, kl_divergence, target_count
from .stages import _layer_mse


@torch.no_grad()
def evaluate(
    student,
    dataset,
    teacher=None,
    batch_size: int = 1,
    max_batches: int | None = None,
    pad_id: int = 0,
    device="cpu",
    temperature: float = 1.0,
) -> dict:
    """Means over the first `max_batches` batches of `dataset` (in order)."""
    n = len(dataset)
    starts = list(range(0, n, batch_size))[: max_batches or None]
    sums = {"ce": 0.0, "teacher_ce": 0.0, "kl": 0.0, "agree": 0.0, "layer_mse": 0.0}
    counts = {"targets": 0, "tokens": 0, "mse": 0}
    has_gdn = LINEAR in student.config.text.layer_types
    for s in starts:
        batch = collate([dataset[i] for i in range(s, min(s + batch_size, n))], pad_id)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logits = student(**model_inputs(batch)).logits
        sums["ce"] += float(cross_entropy(logits, batch["labels"]))
        counts["targets"] += target_count(batch["labels"])
        targets = batch["labels"][:, 1:]
        sums["hits"] = sums.get("hits", 0.0) + float(((logits[:, :-1].argmax(-1) == targets) & (targets != -100)).sum())
        if teacher is None:
            continue
        t_logits = teacher(batch).logits
        mask = valid_mask(batch)
        sums["teacher_ce"] += float(cross_entropy(t_logits, batch["labels"]))
        sums["kl"] += float(kl_divergence(logits, t_logits, mask, temperature=temperature, scale_by_t2=False))
        sums["agree"] += float(((logits.argmax(-1) == t_logits.argmax(-1)) & mask).sum())
        counts["tokens"] += int(mask.sum())
        if has_gdn:
            sums["layer_mse"] += float(_layer_mse(student, batch, teacher))
            gdn_layers = student.config.text.layer_types.count(LINEAR)
            counts["mse"] += int(mask.sum()) * student.config.text.hidden_size * gdn_layers
    out = {
        "student_ppl": math.exp(sums["ce"] / max(counts["targets"], 1)),
        "targets": counts["targets"],
        "target_accuracy": sums.get("hits", 0.0) / max(counts["targets"], 1),
    }
    if teacher is not None:
        out.update(
            teacher_ppl=math.exp(sums["teacher_ce"] / max(counts["targets"], 1)),
            kl=sums["kl"] / max(counts["tokens"], 1),
            agreement=sums["agree"] / max(counts["tokens"], 1),
            tokens=counts["tokens"],
        )
        if has_gdn:
            out["layer_mse"] = sums["layer_mse"] / max(counts["mse"], 1)
    return out
