"""The objective's terms for an encoder on a classification task (GLUE):

    L = (1 - a) CE(labels) + a KD(teacher class logits, T) + b * sum_l w_l D(l)

CE and KD are per example; KD is exact (the store keeps the teacher's class logits). The feature distances compare
every token of the micro-batch (`--feature_rows tokens`, as for decoders, less what the token rule leaves out) or
one [CLS] row per example (`cls`, n = batch size); PKD always compares [CLS] rows, L2-normalised.
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from pipeline.geometry import logit_kd
from pipeline.models.encoders import encoder_forward
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
    if obj.feature_loss is not None:
        total = total + obj.beta * model.feature_terms(hidden, teacher.layers, attention_mask, terms)
    terms["loss"] = total
    return terms
