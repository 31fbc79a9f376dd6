"""The training run behind `./run.sh train`: inputs checked, a DeepSpeed engine built, the loop, the outputs.

Runs unchanged as one process, under `torchrun`, or under the `deepspeed` launcher (pipeline/runtime.py fills the
rendezvous variables of a plain process). The run folder:

    OUT/config.yaml         the options of the run            OUT/ds_config.json   the resolved DeepSpeed config
    OUT/checkpoints/        DeepSpeed checkpoints + data position + RNG (pipeline/checkpointing.py)
    OUT/tb/                 TensorBoard: every loss term, lr, grad norm, tokens/s; validation loss, D_P/D_FG/D_CKA
    OUT/metrics.jsonl       the same numbers, one JSON line per logged step or validation
    OUT/model/              the consolidated student (Hugging Face dir, tokenizer included)
    OUT/manifest.json       kind "geokd.train": inputs and their fingerprints, steps, final validation
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpointing as ckpt
from pipeline.config import ConfigError, config_to_dict, save_config
from pipeline.ds_config import EngineSettings, load_ds_config, precision_of, resolve_ds_config, torch_dtype
from pipeline.ds_config import zero_stage
from pipeline.feature_store import FeatureStore
from pipeline.io import read_json, write_json_atomic
from pipeline.models import FINAL, PRESETS, layer_map, load_model, model_fingerprint, num_decoder_layers
from pipeline.objective import Objective, StudentWithHeads, feature_distances, online_teacher_targets
from pipeline.runtime import DistInfo, ensure_dist_env, pick_device, seed_everything
from pipeline.train_config import RESUME_FREE_FIELDS, TrainConfig, check_config, parse_layer_map, teacher_mode
from pipeline.train_data import StepBatchSampler, eval_batches, make_collate, make_dataset, make_loader
from pipeline.train_data import stored_targets, to_device


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup to 1, then cosine down to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: TrainConfig
    dist: DistInfo
    device: torch.device
    out: Path
    engine: Any
    stage: int
    objective: Objective
    tokenizer: Any
    train_set: Any
    valid_set: Any | None
    valid_store: FeatureStore | None
    teacher: Any | None
    head: tuple[torch.Tensor, torch.Tensor | None] | None
    collate: Any
    valid_collate: Any
    steps_per_epoch: int
    total_steps: int
    inputs: dict[str, Any]


def check_output_folder(out: Path, resume: bool) -> None:
    if (out / "model" / "config.json").is_file():
        raise FileExistsError(f"{out}: this run is finished (model/ exists); choose another --out")
    if not resume and ((out / "checkpoints").exists() or (out / "metrics.jsonl").exists()):
        raise FileExistsError(f"{out} holds a previous run; pass --resume to continue it or choose another --out")


def student_width(spec: str) -> int:
    if spec.startswith("preset:"):
        name = spec.split(":", 1)[1]
        if name not in PRESETS:
            raise ConfigError(f"--student {spec}: unknown preset; choose one of {', '.join(PRESETS)}")
        return int(PRESETS[name]["hidden_size"])
    cfg_path = Path(spec) / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"--student {spec}: not a model directory with config.json, and not preset:NAME")
    return int(read_json(cfg_path)["hidden_size"])


def setup(cfg: TrainConfig) -> Run:
    check_config(cfg)
    dist = ensure_dist_env()
    import deepspeed
    from pipeline.data import PreparedData

    deepspeed.init_distributed(verbose=False)
    device = pick_device(dist.local_rank)
    out = Path(cfg.out)
    check_output_folder(out, cfg.resume)
    seed_everything(cfg.seed)

    data = PreparedData(cfg.data)
    tok = data.tokenizer()
    train_tokens = data.split(cfg.train_split)
    valid_tokens = None
    if cfg.valid_split and cfg.valid_split in data.splits:
        valid_tokens = data.split(cfg.valid_split)
    elif cfg.valid_split and cfg.valid_split != TrainConfig.valid_split:
        raise ConfigError(f"--valid_split {cfg.valid_split!r}: {cfg.data} has splits {', '.join(data.splits)}")
    elif cfg.valid_split and dist.is_main:
        print(f"[train] {cfg.data} has no {cfg.valid_split!r} split (prepare with --valid_size N): no validation")
    tmode = teacher_mode(cfg)
    inputs: dict[str, Any] = {"data": {"path": str(Path(cfg.data).resolve()), "fingerprint": data.fingerprint},
                              "student": cfg.student, "teacher_mode": tmode}

    # DeepSpeed config first: under ZeRO-3, Hugging Face partitions the student while loading it.
    ds_cfg = resolve_ds_config(load_ds_config(cfg.ds_config), EngineSettings(
        micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum, world_size=dist.world_size,
        grad_clip=cfg.grad_clip, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay, precision=cfg.precision, hidden_size=student_width(cfg.student)),
        origin=cfg.ds_config)
    stage, dtype = zero_stage(ds_cfg), torch_dtype(precision_of(ds_cfg))

    # The teacher: a feature store (never the model), or a frozen model run every step.
    store = teacher = head = None
    n_teacher_layers = 0
    if tmode == "stored":
        store = FeatureStore(cfg.features)
        n_teacher_layers = int(store.manifest["teacher"]["n_layers"])
        inputs["features"] = {"path": str(Path(cfg.features).resolve()),
                              "teacher_fingerprint": store.manifest["teacher"]["fingerprint"]}
        if store.manifest["data"]["split"] != cfg.train_split:
            raise ConfigError(f"--features {cfg.features} caches split {store.manifest['data']['split']!r}, "
                              f"training reads {cfg.train_split!r}")
    elif tmode == "online":
        # Loaded before any ZeRO-3 context so it stays whole on every rank (it is not trained).
        teacher = load_model(cfg.teacher, tokenizer=tok, dtype=dtype, seed=cfg.seed).to(device).eval()
        teacher.requires_grad_(False)
        n_teacher_layers = num_decoder_layers(teacher)
        inputs["teacher"] = {"spec": cfg.teacher, "fingerprint": model_fingerprint(
            teacher if cfg.teacher.startswith("preset:") else cfg.teacher)}

    hf_ds = None
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_cfg)  # noqa: F841  (must stay alive while the student loads)
    student = load_model(cfg.student, tokenizer=tok, seed=cfg.seed)
    del hf_ds
    if len(tok) > student.config.vocab_size:
        raise ConfigError(f"--student {cfg.student}: vocabulary {student.config.vocab_size} < the prepared data's "
                          f"tokenizer ({len(tok)})")
    student.config.use_cache = False
    if cfg.activation_checkpointing:
        enable = getattr(student, "activation_checkpointing_enable", None)
        kwargs = {"use_reentrant": False}  # reentrant checkpointing would cut the feature loss's gradient
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    objective, teacher_dims = build_objective(cfg, num_decoder_layers(student), n_teacher_layers, store, teacher)
    if store is not None:
        need = list(objective.teacher_layers) + ([FINAL] if objective.kd == "final" else [])
        # A --teacher directory given with stored features must be the one that made them (a preset's weights
        # depend on the cache stage's seed, so presets are not checked).
        teacher_dir = cfg.teacher if cfg.teacher and not cfg.teacher.startswith("preset:") else None
        store.check_compatible(data_fingerprint=data.fingerprint, tokenizer_fingerprint=data.tokenizer_fingerprint,
                               layers=need, teacher_fingerprint=model_fingerprint(teacher_dir) if teacher_dir else None)
        if objective.kd == "final":
            weight, bias = stored_head(store)
            head = (weight.to(device, dtype), None if bias is None else bias.to(device, dtype))
    valid_store = None
    if cfg.valid_features and tmode == "stored" and valid_tokens is not None:
        valid_store = FeatureStore(cfg.valid_features)
        valid_store.check_compatible(data_fingerprint=data.fingerprint,
                                     tokenizer_fingerprint=data.tokenizer_fingerprint,
                                     teacher_fingerprint=store.manifest["teacher"]["fingerprint"],
                                     layers=_valid_layers(objective))

    model = StudentWithHeads(student, objective, teacher_dims)
    train_set = make_dataset(train_tokens, store, _store_layers(objective), topk=objective.kd == "topk")
    steps_per_epoch = len(train_set) // (cfg.micro_batch_size * cfg.grad_accum * dist.world_size)
    if steps_per_epoch == 0:
        raise ConfigError(f"split {cfg.train_split!r} has {len(train_set)} samples, fewer than one global batch of "
                          f"{cfg.micro_batch_size * cfg.grad_accum * dist.world_size}")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(round(cfg.warmup_ratio * total_steps))
    schedule = functools.partial(warmup_cosine, warmup=warmup, total=total_steps, min_ratio=cfg.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))

    valid_set = None
    if valid_tokens is not None:
        valid_set = make_dataset(valid_tokens, valid_store, _valid_layers(objective), topk=objective.kd == "topk")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        write_json_atomic(out / "ds_config.json", ds_cfg)
    return Run(cfg=cfg, dist=dist, device=device, out=out, engine=engine, stage=stage, objective=objective,
               tokenizer=tok, train_set=train_set, valid_set=valid_set, valid_store=valid_store, teacher=teacher,
               head=head, collate=make_collate(tok.pad_token_id, store is not None),
               valid_collate=make_collate(tok.pad_token_id, valid_store is not None),
               steps_per_epoch=steps_per_epoch, total_steps=total_steps, inputs=inputs)


def stored_head(store: FeatureStore) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's LM head stored beside the features (weight, and bias when the head has one)."""
    from safetensors import safe_open

    weight = store.lm_head_weight()
    with safe_open(str(store.path / store.manifest["lm_head"]["file"]), framework="pt") as f:
        bias = f.get_tensor("bias") if "bias" in f.keys() else None
    return weight, bias


def _store_layers(objective: Objective) -> list[Any]:
    return list(objective.teacher_layers) + ([FINAL] if objective.kd == "final" else [])


def _valid_layers(objective: Objective) -> list[Any]:
    """Validation reads every mapped teacher layer (for the D_P / D_FG / D_CKA report) and what KD needs."""
    return sorted({t for _, t in objective.pairs}) + ([FINAL] if objective.kd == "final" else [])


def build_objective(cfg: TrainConfig, n_student: int, n_teacher: int, store: FeatureStore | None, teacher: Any
                    ) -> tuple[Objective, dict[int, int]]:
    if cfg.mode == "sft":
        return Objective("sft", 0.0, 0.0, "none", (), (), "none", cfg.kd_temperature), {}
    try:
        pairs = layer_map(n_student, n_teacher, parse_layer_map(cfg.layer_map), cfg.n_layer_pairs)
    except ValueError as e:
        raise ConfigError(f"--layer_map / --n_layer_pairs: {e}") from e
    weights = list(cfg.layer_weights) or [1.0 / len(pairs)] * len(pairs)
    kd = cfg.kd
    if cfg.alpha == 0:
        kd = "none"
    elif kd == "auto":
        if store is None:
            kd = "final"
        elif FINAL in store.layers:
            kd = "final"
        elif store.manifest.get("topk_logits"):
            kd = "topk"
        else:
            raise ConfigError(f"--alpha {cfg.alpha} needs teacher logits, but {cfg.features} stores neither 'final' "
                              f"nor top-k logits (cache with --final or --topk_logits K, or pass --alpha 0)")
    if kd == "topk" and store is None:
        raise ConfigError("--kd topk reads stored top-k logits; the online teacher gives exact logits (--kd final)")
    dims = {}
    for _, t in pairs:
        dims[t] = store.feature_dim(t) if store is not None and t in store.layers else (
            teacher.config.hidden_size if teacher is not None else 0)
    obj = Objective("distill", cfg.alpha, cfg.beta, cfg.loss, tuple(pairs), tuple(weights), kd, cfg.kd_temperature)
    return obj, dims
