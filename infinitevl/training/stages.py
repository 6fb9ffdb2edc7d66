"""The four training stages: what trains, which loss terms, and how each term is normalised.

A stage returns loss *sums* per term and can count, from the batch alone, what each sum runs over; the loop divides
by the counts gathered over all micro-batches of a step and all processes, so that accumulation and data parallelism
give exactly the gradient of one large batch.

  distill-layer  every GDN layer is fed the teacher's input to that layer; MSE between its output and the teacher
                 layer's output over real tokens (fp32). Only GDN parameters train; the student never runs a full
                 forward.
  distill-e2e    per-token KL(teacher / T || student / T) over real (or answer) tokens; optionally plus the
                 layer-wise MSE term. GDN parameters train.
  sft            cross-entropy on answer tokens; trainable groups from the config (default: mixers and MLPs, vision
                 tower and LM head frozen).
  sft-long       the same loss through LoRA adapters (peft) only.

The KL and the cross-entropy take both models' final hidden states and LM heads and project them in chunks of
positions (see losses.py): neither model's [T, vocab] logits are built.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..config import LINEAR
from .collate import model_inputs, valid_mask
from .losses import head_cross_entropy, head_kl_divergence, masked_mse, target_count
from .teacher import final_hidden_hook

DEFAULT_TRAINABLE = {"distill-layer": ["gdn"], "distill-e2e": ["gdn"], "sft": ["gdn", "swa", "mlp"], "sft-long": []}


def group_of(name: str, layer_types: list[str]) -> str:
    """The parameter group of a parameter name (in-memory spelling)."""
    if name.startswith("model.visual.merger"):
        return "merger"
    if name.startswith("model.visual"):
        return "vision"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embed"
    if ".layers." in name:
        idx = int(name.split(".layers.")[1].split(".")[0])
        if ".self_attn." in name:
            return "gdn" if layer_types[idx] == LINEAR else "swa"
        if ".mlp." in name:
            return "mlp"
        return "norms"
    return "norms"  # the final norm


def select_trainable(model, groups: list[str]) -> list[str]:
    """Set requires_grad by group; returns the trainable names."""
    types = model.config.text.layer_types
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_("all" in groups or group_of(name, types) in groups)
        if p.requires_grad:
            names.append(name)
    return names


class Stage(ABC):
    name = ""
    needs_teacher = False

    def __init__(self, cfg):
        self.cfg = cfg

    @abstractmethod
    def weights(self) -> dict[str, float]:
        """Weight of each loss term in the total."""

    @abstractmethod
    def counts(self, batch: dict, model) -> dict[str, int]:
        """What each term's sum runs over, computed from the batch alone."""

    @abstractmethod
    def sums(self, model, batch: dict, teacher) -> dict[str, torch.Tensor]:
        """Each term's sum (with gradient)."""


def _gdn_layers(model) -> list[int]:
    return [i for i, t in enumerate(model.config.text.layer_types) if t == LINEAR]


def _final_hidden(model, batch: dict) -> torch.Tensor:
    """The student's final normed hidden states [B, T, D] (its logits are left to the loss: only the last
    position's are computed here)."""
    kept: dict = {}
    handle = final_hidden_hook(model, kept)
    try:
        model(**model_inputs(batch), logits_to_keep=1)
    finally:
        handle.remove()
    return kept["hidden"]


def _layer_mse(model, batch: dict, teacher) -> torch.Tensor:
    """Sum over GDN layers of the masked squared error of the layer fed the teacher's input to it."""
    from ..model.layout import TokenLayout

    layers = _gdn_layers(model)
    t_out = teacher(batch, capture=set(layers), logits=False)
    mask = valid_mask(batch).to(t_out.layer_inputs[layers[0]].device)
    B, T = mask.shape
    layout = TokenLayout.build(batch.get("attention_mask"), B, T, mask.device)
    total = torch.zeros((), device=mask.device)
    for i in layers:
        layer = model.language_model.layers[i]
        x = t_out.layer_inputs[i].to(next(layer.parameters()).dtype)
        total = total + masked_mse(layer(x, None, None, layout), t_out.layer_outputs[i], mask)
    return total


class LayerDistill(Stage):
    name = "distill-layer"
    needs_teacher = True

    def weights(self):
        return {"layer_mse": 1.0}

    def counts(self, batch, model):
        n = int(valid_mask(batch).sum())
        return {"layer_mse": n * model.config.text.hidden_size * len(_gdn_layers(model))}

    def sums(self, model, batch, teacher):
        return {"layer_mse": _layer_mse(model, batch, teacher)}


class EndToEndDistill(Stage):
    name = "distill-e2e"
    needs_teacher = True

    def weights(self):
        w = {"kl": 1.0}
        if self.cfg.layer_mse_weight:
            w["layer_mse"] = self.cfg.layer_mse_weight
        return w

    def _kl_mask(self, batch):
        if self.cfg.kl_answer_only:
            labels = batch["labels"]
            return torch.cat([labels[:, 1:] != -100, torch.zeros_like(labels[:, :1], dtype=torch.bool)], 1)
        return valid_mask(batch)

    def counts(self, batch, model):
        out = {"kl": int(self._kl_mask(batch).sum())}
        if "layer_mse" in self.weights():
            out["layer_mse"] = int(valid_mask(batch).sum()) * model.config.text.hidden_size * len(_gdn_layers(model))
        return out

    def sums(self, model, batch, teacher):
        t_hidden = teacher(batch, logits=False, hidden=True).hidden
        s_hidden = _final_hidden(model, batch)
        mask = self._kl_mask(batch)
        kl = head_kl_divergence(
            s_hidden, model.lm_head.weight, t_hidden, teacher.head_weight, mask, temperature=self.cfg.temperature
        )
        out = {"kl": kl}
        if "layer_mse" in self.weights():
            out["layer_mse"] = _layer_mse(model, batch, teacher)
        return out


class SupervisedFineTune(Stage):
    name = "sft"

    def weights(self):
        return {"ce": 1.0}

    def counts(self, batch, model):
        return {"ce": target_count(batch["labels"])}

    def sums(self, model, batch, teacher):
        return {"ce": head_cross_entropy(_final_hidden(model, batch), model.lm_head.weight, batch["labels"])}


class LongSupervisedFineTune(SupervisedFineTune):
    name = "sft-long"


STAGE_CLASSES = {c.name: c for c in (LayerDistill, EndToEndDistill, SupervisedFineTune, LongSupervisedFineTune)}


def make_stage(cfg) -> Stage:
    return STAGE_CLASSES[cfg.stage](cfg)
