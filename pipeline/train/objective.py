"""The training objective and the module DeepSpeed trains.

    L = (1 - a) CE + a KD + b * sum_l w_l D(l)          (SFT: L = CE)

`StudentWithHeads` holds the student and, for a learned feature loss (the projection-MSE baseline), its parameters
per layer pair, so the engine shards, clips and optimizes them with the student under any ZeRO stage. Its forward
returns every loss term, so the training loop logs what it optimizes.

Teacher targets arrive as one `TeacherTargets` whatever their origin (pipeline/train/targets.py). Token sets: CE
and KD use the response tokens that predict a label (labels != -100, shifted as in causal LM training); the
feature distances use every non-pad token (prompt and response) of the micro-batch, as rows, less those the
token rule leaves out (massive-activation rows of a real teacher; `rows_left_out/PAIR` logs how many).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.features.store import FeatureStore
from pipeline.geometry import (
    ALL_TOKENS, DEFAULT_TOKEN_RULE, FeatureLoss, TokenRule, cka_distance, feature_gram_distance, feature_loss,
    logit_kd, procrustes_distance,
)
from pipeline.models import FINAL, layer_map, mapped_teacher_layers, record_hidden_states
from pipeline.models.encoders import cls_rows
from pipeline.train.config import TrainConfig, pair_key, pair_name, parse_layer_map
from pipeline.train.classifier import classifier_terms
from pipeline.train.targets import TeacherTargets

Mode = Literal["sft", "distill"]
KDSource = Literal["final", "topk", "class", "none"]
Layer = int | str  # a hidden-state index or FINAL


@dataclass(frozen=True)
class Objective:
    """What a run optimizes, resolved from its options; it alone says which layers each side must provide."""

    mode: Mode
    alpha: float
    beta: float
    loss: str  # a name in geometry.FEATURE_LOSSES, or "none"
    pairs: tuple[tuple[int, int], ...]  # (student, teacher) hidden-state indices
    weights: tuple[float, ...]
    kd: KDSource
    temperature: float = 1.0
    rule: TokenRule = DEFAULT_TOKEN_RULE
    classifier: bool = False  # an encoder on a classification task (pipeline/train/classifier.py)
    rows: str = "tokens"  # a classifier's feature rows: every token, or one [CLS] row per example

    @property
    def uses_features(self) -> bool:
        return self.mode == "distill" and self.loss != "none" and self.beta > 0

    @property
    def uses_kd(self) -> bool:
        return self.mode == "distill" and self.kd != "none" and self.alpha > 0

    @property
    def feature_loss(self) -> FeatureLoss | None:
        return feature_loss(self.loss) if self.uses_features else None

    @property
    def mapped_layers(self) -> list[int]:
        """Every teacher hidden state the layer map names (the validation report's D_P / D_FG / D_CKA)."""
        return mapped_teacher_layers(self.pairs)

    @property
    def teacher_layers(self) -> list[int]:
        """Teacher hidden states the training loss reads."""
        return self.mapped_layers if self.uses_features else []

    @property
    def store_layers(self) -> list[Layer]:
        """What a training feature store must hold: the loss's layers, and the final state for exact KD."""
        return list(self.teacher_layers) + ([FINAL] if self.kd == "final" else [])

    @property
    def valid_layers(self) -> list[Layer]:
        """What validation reads: every mapped teacher layer (the D_P / D_FG / D_CKA report) and what KD needs."""
        return self.mapped_layers + ([FINAL] if self.kd == "final" else [])

    def student_layers(self, with_report: bool = False) -> list[int]:
        """Student hidden states to record: the loss's, or with `with_report` every mapped one (validation)."""
        keep = self.uses_features or (with_report and self.mode == "distill")
        return sorted({s for s, _ in self.pairs}) if keep else []


# Exact KD computes the teacher's logits over the whole vocabulary at every response token, from the stored final
# state and the teacher's head (V x d, float32, beside the student); top-k KD reads k stored log-probabilities.
# Measured (bench/kd_vocab.py, BENCHMARKS.md "Exact or top-k KD"): exact KD makes the head + cross-entropy work at
# the response tokens 1.75-2.6x as costly, top-64 KD 1.04-1.08x; for 512 tokens on a CPU thread that is +0.85 s
# at V 49,152 (SmolLM2) and +8.4 s at V 262,144 (Gemma 3), whose head (640 MiB) and teacher logits (512 MiB)
# also sit in memory. Below the bound: OPT, GPT-2, Llama 2, SmolLM2; above it: Llama 3, Qwen, Gemma.
EXACT_KD_MAX_VOCAB = 100_000
DEFAULT_TOPK = 64


def default_kd_source(vocab_size: int) -> tuple[KDSource, str]:
    """Which teacher logits to distil from when the user has not said: exact ("final") for vocabularies up to
    EXACT_KD_MAX_VOCAB, top-k above; with the reason, to be printed."""
    if vocab_size > EXACT_KD_MAX_VOCAB:
        return "topk", (f"top-k KD: the vocabulary ({vocab_size:,}) is above {EXACT_KD_MAX_VOCAB:,}, where exact "
                        f"KD's teacher head and full-vocabulary logits would cost about as much as the student's own "
                        f"head (top-{DEFAULT_TOPK}: a few percent)")
    return "final", f"exact KD: the vocabulary ({vocab_size:,}) is at most {EXACT_KD_MAX_VOCAB:,}"


def build_objective(cfg: TrainConfig, n_student: int, n_teacher: int, store: FeatureStore | None,
                    classifier: bool = False) -> Objective:
    """The objective of a run's options; `store` (a FeatureStore, or None for an online teacher) decides `kd auto`;
    `classifier`: the data is a classification task (class-logit KD; pkd and --feature_rows apply)."""
    if cfg.mode == "sft":
        return Objective("sft", 0.0, 0.0, "none", (), (), "none", cfg.kd_temperature, classifier=classifier)
    if classifier or cfg.kd == "class" or cfg.loss == "pkd":
        return classifier_objective(cfg, n_student, n_teacher, store, classifier)
    try:
        pairs = layer_map(n_student, n_teacher, parse_layer_map(cfg.layer_map), cfg.n_layer_pairs)
    except ValueError as e:
        raise ConfigError(f"--layer_map / --n_layer_pairs: {e}") from e
    weights = list(cfg.layer_weights) or [1.0 / len(pairs)] * len(pairs)
    kd = cfg.kd
    if cfg.alpha == 0:
        kd = "none"
    elif kd == "auto":
        if store is not None and FINAL in store.layers and store.has_topk:
            kd, reason = default_kd_source(int(store.manifest["teacher"]["vocab_size"]))
            print(f"[train] --kd auto: {reason}; the store holds both, --kd final or --kd topk overrides")
        elif store is None or FINAL in store.layers:
            kd = "final"
        elif store.has_topk:
            kd = "topk"
        else:
            raise ConfigError(f"--alpha {cfg.alpha} needs teacher logits, but {cfg.features} stores neither 'final' "
                              f"nor top-k logits (cache with --final or --topk_logits K, or pass --alpha 0)")
    if kd == "topk" and store is None:
        raise ConfigError("--kd topk reads stored top-k logits; the online teacher gives exact logits (--kd final)")
    return Objective("distill", cfg.alpha, cfg.beta, cfg.loss, tuple(pairs), tuple(weights), kd, cfg.kd_temperature,
                     TokenRule.parse(cfg.token_rule))


def classifier_objective(cfg: TrainConfig, n_student: int, n_teacher: int, store: FeatureStore | None,
                         classifier: bool) -> Objective:
    if not classifier:
        what = "--kd class" if cfg.kd == "class" else "--loss pkd"
        raise ConfigError(f"{what} is for classification tasks (an encoder on data prepared with --task); "
                          f"{cfg.data} is instruction data")
    if cfg.kd in ("final", "topk"):
        raise ConfigError(f"--kd {cfg.kd} distils a causal LM's token logits; a classifier distils its class "
                          f"logits (--kd class or auto)")
    kd = "none" if cfg.alpha == 0 or cfg.kd == "none" else "class"
    if kd == "class" and store is not None and not store.has_class_logits:
        raise ConfigError(f"--features {cfg.features} holds no class logits (a causal LM's store); cache the "
                          f"fine-tuned classifier teacher on this data")
    try:
        pairs = layer_map(n_student, n_teacher, parse_layer_map(cfg.layer_map), cfg.n_layer_pairs)
    except ValueError as e:
        raise ConfigError(f"--layer_map / --n_layer_pairs: {e}") from e
    weights = list(cfg.layer_weights) or [1.0 / len(pairs)] * len(pairs)
    return Objective("distill", cfg.alpha, cfg.beta, cfg.loss, tuple(pairs), tuple(weights), kd,
                     cfg.kd_temperature, TokenRule.parse(cfg.token_rule), classifier=True,
                     rows="cls" if cfg.loss == "pkd" else cfg.feature_rows)


class StudentWithHeads(nn.Module):
    """The student plus the objective's trainable heads; `forward` returns {"loss": total, term: value, ...}."""

    def __init__(self, student: nn.Module, objective: Objective, teacher_dims: dict[int, int] | None = None):
        super().__init__()
        self.student = student
        self.objective = objective
        # A learned feature loss (projection MSE) gets its parameters per layer pair here, so the engine
        # shards, clips and optimizes them with the student.
        self.projections = nn.ModuleDict()
        loss = objective.feature_loss
        if loss is not None and loss.learned:
            d_s = student.config.hidden_size
            for s, t in objective.pairs:
                if teacher_dims is None or t not in teacher_dims:
                    raise ValueError(f"{loss.name} needs the width of teacher layer {t}")
                self.projections[pair_key(s, t)] = loss.make_params(d_s, teacher_dims[t])

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                teacher: TeacherTargets | None = None, return_hidden: bool = False, ce_only: bool = False,
                token_type_ids: Tensor | None = None) -> dict[str, Any]:
        """Loss terms; with `return_hidden`, also "hidden": the mapped student layers (for validation reports);
        `ce_only` skips the teacher terms (validation when no teacher targets exist for that split)."""
        obj = self.objective
        if obj.classifier:
            return classifier_terms(self, input_ids, attention_mask, token_type_ids, labels, teacher, return_hidden,
                                    ce_only)
        student_layers = obj.student_layers(with_report=return_hidden)
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
        # At temperature 1 CE and KD share one log-softmax over the vocabulary: computing it twice was 40% of the
        # KD step's cost on a CPU (a [response tokens, 50k] softmax forward and backward).
        share = obj.uses_kd and not ce_only and obj.temperature == 1.0 and logits.shape[0] > 0
        log_probs = torch.log_softmax(logits.float(), dim=-1) if share else None
        if logits.shape[0] == 0:  # no response token in this micro-batch: no signal, but a graph for backward
            ce = final.sum() * 0.0
        elif log_probs is not None:
            ce = F.nll_loss(log_probs, targets[predict])
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
            kd = kd_loss(logits, predict, teacher, obj.kd, obj.temperature, log_probs)
            terms["kd"] = kd
            total = total + obj.alpha * kd
        if obj.feature_loss is not None:
            total = total + obj.beta * self.feature_terms(hidden, teacher.layers, attention_mask, terms)
        terms["loss"] = total
        return terms

    def feature_terms(self, hidden: dict[int, Tensor], teacher_layers: dict[int, Tensor], attention_mask: Tensor,
                      terms: dict[str, Any]) -> Tensor:
        """sum_l w_l D(l) over the layer pairs, each D(l) and its rows left out by the token rule put in `terms`.
        A classifier's `rows == "cls"` compares one [CLS] row per example, and PKD always does (no token rule)."""
        obj, loss = self.objective, self.objective.feature_loss
        feat = torch.zeros((), device=attention_mask.device, dtype=torch.float32)
        for (s, t), w in zip(obj.pairs, obj.weights):
            hs, ht, mask = hidden[s], teacher_layers[t], attention_mask
            if obj.rows == "cls":
                (hs, mask), ht = cls_rows(hs), ht[:, :1]
            rows, left_out = obj.rule.select(ht, mask) if obj.loss != "pkd" else (mask, 0)
            d = loss(hs, ht, rows, self.projections[pair_key(s, t)] if loss.learned else None,
                     rule=TokenRule(0.0, obj.rule.row_normalize))
            terms[pair_name(obj.loss, s, t)] = d
            terms[f"rows_left_out/{pair_key(s, t)}"] = torch.tensor(float(left_out))
            feat = feat + w * d
        return feat


def kd_loss(logits: Tensor, predict: Tensor, teacher: TeacherTargets, source: str, temperature: float,
            log_probs: Tensor | None = None) -> Tensor:
    """KL(teacher || student) at the predicting positions (`logits`: the student's there, [N, V]), from exact
    teacher logits (final hidden state through the teacher's LM head) or the stored top-k log-probabilities.
    `log_probs`: the student's log-softmax of `logits` when already computed (temperature 1 only)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if source == "final":
        if teacher.final is None or teacher.head is None:
            raise ValueError("KD from the final hidden state needs the stored 'final' layer and the LM-head weight")
        t_logits = teacher.head.logits(teacher.final[:, :-1][predict])
        if log_probs is None:
            return logit_kd(logits, t_logits, None, temperature)
        log_pt = torch.log_softmax(t_logits.detach().float(), dim=-1)
        return (log_pt.exp() * (log_pt - log_probs)).sum(-1).mean()
    if source == "topk":
        values, indices = teacher.topk_values, teacher.topk_indices
        if values is None or indices is None:
            raise ValueError("top-k KD needs a store cached with --topk_logits")
        v = values[:, :-1][predict].float()
        idx = indices[:, :-1][predict].long()
        return topk_kd(logits, v, idx, temperature, log_probs)
    raise ValueError(f"unknown KD source {source!r}")


def topk_kd(student_logits: Tensor, teacher_logprobs: Tensor, teacher_ids: Tensor, temperature: float = 1.0,
            student_log_probs: Tensor | None = None) -> Tensor:
    """KL(p_t || p_s) with the teacher restricted to its top-k tokens and renormalized there (the mass outside the
    top-k is unknown); the student's log-probabilities are over the full vocabulary. Mean over tokens, x T^2.
    `student_log_probs`: log_softmax(student_logits) when already computed (temperature 1)."""
    log_pt = torch.log_softmax(teacher_logprobs / temperature, dim=-1)
    if student_log_probs is None:
        student_log_probs = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_ps = student_log_probs.gather(-1, teacher_ids)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * temperature**2


@torch.no_grad()
def feature_distances(student_hidden: dict[int, Tensor], teacher_layers: dict[int, Tensor], mask: Tensor,
                      pairs: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
    """D_P, D_FG and D_CKA (distances, not squared) for each mapped pair: the validation geometry report, under
    the default token rule whatever the run trained with (so runs compare), and over all tokens (`D_P_all/...`)."""
    out = {}
    for s, t in pairs:
        hs, ht = student_hidden[s], teacher_layers[t]
        for prefix, rule in (("", DEFAULT_TOKEN_RULE), ("_all", ALL_TOKENS)):
            out[f"D_P{prefix}/s{s}_t{t}"] = procrustes_distance(hs, ht, mask, squared=False, rule=rule)
            out[f"D_FG{prefix}/s{s}_t{t}"] = feature_gram_distance(hs, ht, mask, squared=False, rule=rule)
            out[f"D_CKA{prefix}/s{s}_t{t}"] = cka_distance(hs, ht, mask, squared=False, rule=rule)
    return out
