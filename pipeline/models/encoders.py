"""BERT-family encoders as sequence classifiers: the paper's second experiment (GLUE).

Hidden states follow the decoders' naming (docs/contracts.md): 0 = the embeddings (after their layer norm), i = the
output of encoder layer i (1-based). A classifier's "logits" are its class logits, one row per example, which the
feature store keeps beside the token rows so KD on classes is exact. Any model whose base model keeps its layers in
`encoder.layer` (BERT, RoBERTa, ELECTRA, MiniLM, DeBERTa) is an encoder here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from pipeline.errors import ConfigError
from pipeline.io import read_json


def is_causal_config(config: dict) -> bool:
    architectures = config.get("architectures") or []
    return any("CausalLM" in a or a.endswith("LMHeadModel") for a in architectures) or bool(config.get("is_decoder"))


def check_classifier_dir(path: str | Path, option: str = "model") -> dict:
    """The config of an encoder model dir usable as a sequence classifier; a causal LM or another kind of model is
    refused in one line (geokd's decoder stages refuse an encoder the same way)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"--{option} {path}: not a Hugging Face model directory (no config.json)")
    config = read_json(path / "config.json")
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if is_causal_config(config) or config.get("is_encoder_decoder") \
            or config.get("model_type") not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        listed = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise ConfigError(f"--{option} {path}: a {config.get('model_type')!r} model ({listed}), not an encoder: "
                          f"prepared data of a classification task trains and scores BERT-family encoders")
    return config


def is_encoder(model: nn.Module) -> bool:
    base = getattr(model, "base_model", None)
    return isinstance(getattr(getattr(base, "encoder", None), "layer", None), nn.ModuleList)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    if not is_encoder(model):
        raise ConfigError(f"{type(model).__name__}: no encoder layers (expected a BERT-family model)")
    return model.base_model.encoder.layer


def load_classifier(spec: str, labels: Sequence[str], *, dtype: torch.dtype = torch.float32, seed: int = 0,
                    option: str = "model") -> PreTrainedModel:
    """A sequence classifier over `labels` from an encoder dir: a fine-tuned classifier of the same label count as
    it is, or a base encoder (BertModel) with a fresh classification head drawn from `seed`."""
    from transformers import AutoModelForSequenceClassification

    config = check_classifier_dir(spec, option)
    trained = any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])
    if trained and int(config.get("num_labels", len(config.get("id2label") or {}) or 2)) != len(labels):
        raise ConfigError(f"--{option} {spec}: a classifier of {len(config.get('id2label') or {})} labels, the "
                          f"task has {len(labels)} ({', '.join(labels)})")
    with torch.random.fork_rng(devices=[]):  # a fresh head is the same for the same seed, the caller's RNG untouched
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            spec, local_files_only=True, dtype=dtype, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    return model


def load_frozen_classifier(spec: str, labels: Sequence[str], *, dtype: torch.dtype, device: torch.device,
                           option: str = "teacher") -> PreTrainedModel:
    """A teacher: a classifier fine-tuned on the task (a base encoder's fresh head would make its class logits
    noise), frozen, in eval mode, on `device`."""
    config = check_classifier_dir(spec, option)
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise ConfigError(f"--{option} {spec}: a base encoder, not a classifier fine-tuned on the task; fine-tune "
                          f"it first (./run.sh train --mode sft --student {spec} ...) and use that run's model/")
    model = load_classifier(spec, labels, dtype=dtype, option=option)
    return model.to(device).eval().requires_grad_(False)


def encoder_forward(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor,
                    token_type_ids: Tensor | None, layers: Sequence[int]) -> tuple[dict[int, Tensor], Tensor]:
    """({layer: [B, T, d]} for the requested hidden states, class logits [B, C]) of one forward."""
    n = len(encoder_layers(model))
    bad = [x for x in layers if not (isinstance(x, int) and 0 <= x <= n)]
    if bad:
        raise ConfigError(f"hidden states {bad} do not exist in a {n}-layer encoder: choose 0..{n}")
    out = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                output_hidden_states=bool(layers))
    hidden = {x: out.hidden_states[x] for x in layers} if layers else {}
    return hidden, out.logits


def cls_rows(hidden: Tensor) -> tuple[Tensor, Tensor]:
    """The first ([CLS]) token of each example as a `[B, 1, d]` batch and its all-ones mask: one row per example,
    the unit PKD compares."""
    return hidden[:, :1], torch.ones(hidden.shape[0], 1, dtype=torch.long, device=hidden.device)
