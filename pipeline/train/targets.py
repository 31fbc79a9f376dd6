"""Teacher targets: what the teacher gives the objective for one micro-batch, whatever their origin.

Two producers, one type: `stored_targets` joins a collated batch's stored features with the LM head saved beside
the store; `online_targets` runs a frozen teacher on the micro-batch. Both hand the objective the same
`TeacherTargets`, and both compute exact teacher logits through the same `LMHead.logits`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from pipeline.models import FINAL, capture_hidden_states
from pipeline.models.encoders import encoder_forward, is_encoder
from pipeline.models.teacher import LMHead, lm_head_of


@dataclass
class TeacherTargets:
    """Per micro-batch, aligned with its input_ids `[B, T]` (padding rows are zeros, masked by attention_mask)."""

    layers: dict[int, Tensor] = field(default_factory=dict)  # hidden-state index -> [B, T, d_t]
    final: Tensor | None = None  # [B, T, d_t]: the LM head's input, for exact KD with `head`
    head: LMHead | None = None
    topk_values: Tensor | None = None  # [B, T, k] top-k log-probabilities
    topk_indices: Tensor | None = None  # [B, T, k] their token ids
    class_logits: Tensor | None = None  # [B, C] an encoder classifier's class logits


def stored_targets(batch: dict[str, Any], head: LMHead | None, layers: Sequence[int]) -> TeacherTargets:
    """Targets from a collated batch with stored features (already on the device) and the store's LM head."""
    feats = batch.get("features", {})
    return TeacherTargets(layers={t: feats[t] for t in layers}, final=feats.get(FINAL), head=head,
                          topk_values=batch.get("topk_values"), topk_indices=batch.get("topk_indices"),
                          class_logits=batch.get("class_logits"))


@torch.no_grad()
def online_targets(teacher: nn.Module, input_ids: Tensor, attention_mask: Tensor, layers: Sequence[int],
                   final: bool, token_type_ids: Tensor | None = None) -> TeacherTargets:
    """The targets a feature store would hold, from a frozen teacher's forward on this micro-batch (an encoder
    classifier's: its hidden states and class logits)."""
    layers = list(layers)
    if is_encoder(teacher):
        hidden, logits = encoder_forward(teacher, input_ids, attention_mask, token_type_ids, layers)
        return TeacherTargets(layers=dict(hidden), class_logits=logits)
    if not layers and not final:
        return TeacherTargets()
    hidden = capture_hidden_states(teacher, input_ids, attention_mask, layers, final=final)
    return TeacherTargets(layers={t: hidden[t] for t in layers}, final=hidden.get(FINAL),
                          head=lm_head_of(teacher) if final else None)
