"""The objective's terms for an encoder on a classification task (GLUE):

    L = (1 - a) CE(labels) + a KD(teacher class logits, T) + b * sum_l w_l D(l)

CE and KD are per example; KD is exact (the store keeps the teacher's class logits). The feature distances compare
every token of the micro-batch (`--feature_rows tokens`, as for decoders, less what the token rule leaves out) or
one [CLS] row per example (`cls`, n = batch size); PKD always compares [CLS] rows, L2-normalised.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.geometry import TokenRule, logit_kd
from pipeline.models.encoders import cls_rows, encoder_forward
from pipeline.train.config import pair_key, pair_name
from pipeline.train.targets import TeacherTargets


def classifier_terms(model: Any, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None,
                     labels: Tensor, teacher: TeacherTargets | None, return_hidden: bool, ce_only: bool
                     ) -> dict[str, Any]:
    """`StudentWithHeads.forward` for a classifier: {"loss", "ce", "accuracy", "kd", the distances, ...}."""
    obj = model.objective
    hidden, logits = encoder_forward(model.student, input_ids, attention_mask, token_type_ids,
                                     obj.student_layers(with_report=return_hidden))
    terms: dict[str, Any] = {"hidden": dict(hidden)} if return_hidden else {}
    ce = F.cross_entropy(logits.float(), labels)
    terms["ce"] = ce
    terms["accuracy"] = (logits.argmax(-1) == labels).float().mean().detach()
    if obj.mode == "sft" or ce_only:
        terms["loss"] = ce
        return terms
    if teacher is None:
        raise ValueError("distill mode needs teacher targets")
    total = (1.0 - obj.alpha) * ce
    if obj.uses_kd:
        if teacher.class_logits is None:
            raise ValueError("class-logit KD needs the teacher's class logits")
        kd = logit_kd(logits, teacher.class_logits, None, obj.temperature)
        terms["kd"] = kd
        total = total + obj.alpha * kd
    loss = obj.feature_loss
    if loss is not None:
        feat = torch.zeros((), device=logits.device, dtype=torch.float32)
        for (s, t), w in zip(obj.pairs, obj.weights):
            hs, ht, mask = hidden[s], teacher.layers[t], attention_mask
            if obj.rows == "cls":
                (hs, mask), ht = cls_rows(hs), ht[:, :1]
            rows, left_out = obj.rule.select(ht, mask) if obj.loss != "pkd" else (mask, 0)
            d = loss(hs, ht, rows, model.projections[pair_key(s, t)] if loss.learned else None,
                     rule=TokenRule(0.0, obj.rule.row_normalize))
            terms[pair_name(obj.loss, s, t)] = d
            terms[f"rows_left_out/{pair_key(s, t)}"] = torch.tensor(float(left_out))
            feat = feat + w * d
        total = total + obj.beta * feat
    terms["loss"] = total
    return terms
