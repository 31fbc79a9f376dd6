"""The training objective and the module DeepSpeed trains.

    L = (1 - a) CE + a KD + b * sum_l w_l D(l)          (SFT: L = CE)

`StudentWithHeads` holds the student and, for the projection-MSE baseline, one `ProjectionMSE` per layer pair, so
the engine shards, clips and optimizes the projections with the student under any ZeRO stage. Its forward returns
every loss term, so the training loop logs what it optimizes.

Teacher targets arrive as one dict whatever their origin (a feature store streamed by the DataLoader, or an
online teacher run by `online_teacher_targets`): `{"layers": {t: [B, T, d_t]}, "final": [B, T, d_t] | None,
"topk_values" / "topk_indices": [B, T, k] | None, "head_weight": [V, d_t] | None, "head_bias": [V] | None}`.
Token sets: CE and KD use the response tokens that predict a label (labels != -100, shifted as in causal LM
training); the feature distances use every non-pad token (prompt and response) of the micro-batch, as rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.geometry import FEATURE_LOSSES, ProjectionMSE, cka_distance, feature_gram_distance, logit_kd
from pipeline.geometry import procrustes_distance
from pipeline.models import FINAL, capture_hidden_states, record_hidden_states


@dataclass(frozen=True)
class Objective:
    mode: str  # sft | distill
    alpha: float
    beta: float
    loss: str  # procrustes | fg | cka | proj_mse | none
    pairs: tuple[tuple[int, int], ...]
    weights: tuple[float, ...]
    kd: str  # final | topk | none
    temperature: float = 1.0

    @property
    def uses_features(self) -> bool:
        return self.mode == "distill" and self.loss != "none" and self.beta > 0

    @property
    def uses_kd(self) -> bool:
        return self.mode == "distill" and self.kd != "none" and self.alpha > 0

    @property
    def teacher_layers(self) -> list[int]:
        return sorted({t for _, t in self.pairs}) if self.uses_features else []


def pair_name(loss: str, s: int, t: int) -> str:
    return f"{loss}/s{s}_t{t}"


class StudentWithHeads(nn.Module):
    """The student plus the objective's trainable heads; `forward` returns {"loss": total, term: value, ...}."""

    def __init__(self, student: nn.Module, objective: Objective, teacher_dims: dict[int, int] | None = None):
        super().__init__()
        self.student = student
        self.objective = objective
        self.projections = nn.ModuleDict()
        if objective.uses_features and objective.loss == "proj_mse":
            d_s = student.config.hidden_size
            for s, t in objective.pairs:
                if teacher_dims is None or t not in teacher_dims:
                    raise ValueError(f"proj_mse needs the width of teacher layer {t}")
                self.projections[f"s{s}_t{t}"] = ProjectionMSE(d_s, teacher_dims[t])

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                teacher: dict[str, Any] | None = None, return_hidden: bool = False, ce_only: bool = False
                ) -> dict[str, Any]:
        """Loss terms; with `return_hidden`, also "hidden": the mapped student layers (for validation reports);
        `ce_only` skips the teacher terms (validation when no teacher targets exist for that split)."""
        obj = self.objective
        keep = obj.uses_features or (return_hidden and obj.mode == "distill")
        student_layers = sorted({s for s, _ in obj.pairs}) if keep else []
        # Hooks on the decoder layers' outputs; they are removed when the block ends, so the recomputation of a
        # checkpointed layer in backward does not fire them (and the tensors kept are the forward's own outputs).
        # The LM head runs only where a label is predicted (prompt and padding positions carry no loss), so the
        # vocabulary-sized logits are [N, V] for N response tokens instead of [B, T, V].
        decoder, head = self.student.get_decoder(), self.student.get_output_embeddings()
        with record_hidden_states(self.student, student_layers) as hidden:
            final = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        predict = targets != -100
        logits = head(final[:, :-1][predict])
        terms: dict[str, Any] = {"hidden": dict(hidden)} if return_hidden else {}
        if logits.shape[0] == 0:  # no response token in this micro-batch: no signal, but a graph for backward
            ce = final.sum() * 0.0
        else:
            ce = F.cross_entropy(logits.float(), targets[predict])
        terms["ce"] = ce
        if obj.mode == "sft" or ce_only:
            terms["loss"] = ce
            return terms
        if teacher is None:
            raise ValueError("distill mode needs teacher targets")
        total = (1.0 - obj.alpha) * ce
        if obj.uses_kd:
            kd = kd_loss(logits, predict, teacher, obj.kd, obj.temperature)
            terms["kd"] = kd
            total = total + obj.alpha * kd
        if obj.uses_features:
            feat = torch.zeros((), device=final.device, dtype=torch.float32)
            fn = FEATURE_LOSSES.get(obj.loss)
            for (s, t), w in zip(obj.pairs, obj.weights):
                t_feat = teacher["layers"][t]
                if obj.loss == "proj_mse":
                    d = self.projections[f"s{s}_t{t}"](hidden[s], t_feat, attention_mask)
                else:
                    d = fn(hidden[s], t_feat, attention_mask)
                terms[pair_name(obj.loss, s, t)] = d
                feat = feat + w * d
            total = total + obj.beta * feat
        terms["loss"] = total
        return terms


def kd_loss(logits: Tensor, predict: Tensor, teacher: dict[str, Any], source: str, temperature: float) -> Tensor:
    """KL(teacher || student) at the predicting positions (`logits`: the student's there, [N, V]), from exact
    teacher logits (stored final hidden state @ LM-head weight) or the stored top-k log-probabilities."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if source == "final":
        final = teacher.get("final")
        weight = teacher.get("head_weight")
        if final is None or weight is None:
            raise ValueError("KD from the final hidden state needs the stored 'final' layer and the LM-head weight")
        h = final[:, :-1][predict].to(weight.dtype)
        t_logits = h @ weight.T
        if teacher.get("head_bias") is not None:
            t_logits = t_logits + teacher["head_bias"]
        return logit_kd(logits, t_logits, None, temperature)
    if source == "topk":
        values, indices = teacher.get("topk_values"), teacher.get("topk_indices")
        if values is None or indices is None:
            raise ValueError("top-k KD needs a store cached with --topk_logits")
        v = values[:, :-1][predict].float()
        idx = indices[:, :-1][predict].long()
        return topk_kd(logits, v, idx, temperature)
    raise ValueError(f"unknown KD source {source!r}")


def topk_kd(student_logits: Tensor, teacher_logprobs: Tensor, teacher_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_t || p_s) with the teacher restricted to its top-k tokens and renormalized there (the mass outside the
    top-k is unknown); the student's log-probabilities are over the full vocabulary. Mean over tokens, x T^2."""
    log_pt = torch.log_softmax(teacher_logprobs / temperature, dim=-1)
    log_ps = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_ids)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * temperature**2


@torch.no_grad()
def online_teacher_targets(teacher: nn.Module, input_ids: Tensor, attention_mask: Tensor, objective: Objective,
                           layers: Sequence[int] | None = None) -> dict[str, Any]:
    """The targets a feature store would hold, from a frozen teacher's forward on this micro-batch (`layers`:
    the hidden states to return, by default those the objective's feature loss reads)."""
    layers = list(objective.teacher_layers if layers is None else layers)
    want_final = objective.uses_kd
    if not layers and not want_final:
        return {"layers": {}}
    hidden = capture_hidden_states(teacher, input_ids, attention_mask, layers, final=want_final)
    head = teacher.get_output_embeddings()
    return {
        "layers": {t: hidden[t] for t in layers},
        "final": hidden.get(FINAL),
        "head_weight": head.weight if want_final else None,
        "head_bias": getattr(head, "bias", None) if want_final else None,
    }


@torch.no_grad()
def feature_distances(student_hidden: dict[int, Tensor], teacher_layers: dict[int, Tensor], mask: Tensor,
                      pairs: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
    """D_P, D_FG and D_CKA (distances, not squared) for each mapped pair: the validation geometry report."""
    out = {}
    for s, t in pairs:
        hs, ht = student_hidden[s], teacher_layers[t]
        out[f"D_P/s{s}_t{t}"] = procrustes_distance(hs, ht, mask, squared=False)
        out[f"D_FG/s{s}_t{t}"] = feature_gram_distance(hs, ht, mask, squared=False)
        out[f"D_CKA/s{s}_t{t}"] = cka_distance(hs, ht, mask, squared=False)
    return out
