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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError, save_config
from pipeline.ds_config import EngineSettings, load_ds_config, precision_of, resolve_ds_config, torch_dtype
from pipeline.ds_config import zero_stage
from pipeline.feature_store import FeatureStore
from pipeline.io import read_json, write_json_atomic
from pipeline.models import FINAL, PRESETS, layer_map, load_model, model_fingerprint
from pipeline.objective import Objective, StudentWithHeads
from pipeline.runtime import DistInfo, dist_info, ensure_dist_env, pick_device, seed_everything
from pipeline.train_config import TrainConfig, check_config, parse_layer_map, teacher_mode
from pipeline.train_data import make_collate, make_dataset


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


def model_shape(spec: str, option: str) -> tuple[int, int]:
    """(hidden size, decoder layers) of a model dir or preset, from its config alone (no weights loaded)."""
    if spec.startswith("preset:"):
        name = spec.split(":", 1)[1]
        if name not in PRESETS:
            raise ConfigError(f"--{option} {spec}: unknown preset; choose one of {', '.join(PRESETS)}")
        return int(PRESETS[name]["hidden_size"]), int(PRESETS[name]["num_hidden_layers"])
    cfg_path = Path(spec) / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"--{option} {spec}: not a model directory with config.json, and not preset:NAME")
    c = read_json(cfg_path)
    return int(c["hidden_size"]), int(c["num_hidden_layers"])


@dataclass
class Plan:
    """The checked inputs of a run, before any process group, engine or model weights exist."""

    data: Any
    tokenizer: Any
    train_tokens: Any
    valid_tokens: Any | None
    teacher_mode: str
    store: FeatureStore | None
    valid_store: FeatureStore | None
    objective: Objective
    teacher_dims: dict[int, int]
    ds_config: dict[str, Any]
    inputs: dict[str, Any]


def plan_run(cfg: TrainConfig) -> Plan:
    """Check everything that can be checked cheaply, so a bad option fails in seconds with its name."""
    from pipeline.data import PreparedData

    check_config(cfg)
    dist = dist_info()
    check_output_folder(Path(cfg.out), cfg.resume)
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
    d_student, n_student = model_shape(cfg.student, "student")

    # The teacher: a feature store (the model is never loaded), or a frozen model run every step.
    store = valid_store = None
    teacher_dims: dict[int, int] = {}
    if tmode == "stored":
        store = FeatureStore(cfg.features)
        if store.manifest["data"]["split"] != cfg.train_split:
            raise ConfigError(f"--features {cfg.features} caches split {store.manifest['data']['split']!r}, "
                              f"training reads {cfg.train_split!r}")
        n_teacher = int(store.manifest["teacher"]["n_layers"])
        teacher_dims = {t: store.feature_dim(t) for t in store.layers if t != FINAL}
        inputs["features"] = {"path": str(Path(cfg.features).resolve()),
                              "teacher_fingerprint": store.manifest["teacher"]["fingerprint"]}
    elif tmode == "online":
        d_teacher, n_teacher = model_shape(cfg.teacher, "teacher")
        teacher_dims = {t: d_teacher for t in range(n_teacher + 1)}
    else:
        n_teacher = 0
    objective = build_objective(cfg, n_student, n_teacher, store)

    if store is not None:
        # A --teacher directory given with stored features must be the one that made them (a preset's weights
        # depend on the cache stage's seed, so presets are not checked).
        teacher_dir = cfg.teacher if cfg.teacher and not cfg.teacher.startswith("preset:") else None
        store.check_compatible(data_fingerprint=data.fingerprint, tokenizer_fingerprint=data.tokenizer_fingerprint,
                               layers=_store_layers(objective),
                               teacher_fingerprint=model_fingerprint(teacher_dir) if teacher_dir else None)
        if cfg.valid_features and valid_tokens is not None:
            valid_store = FeatureStore(cfg.valid_features)
            if valid_store.manifest["data"]["split"] != cfg.valid_split:
                raise ConfigError(f"--valid_features {cfg.valid_features} caches split "
                                  f"{valid_store.manifest['data']['split']!r}, validation reads {cfg.valid_split!r}")
            valid_store.check_compatible(data_fingerprint=data.fingerprint,
                                         tokenizer_fingerprint=data.tokenizer_fingerprint,
                                         teacher_fingerprint=store.manifest["teacher"]["fingerprint"],
                                         layers=_valid_layers(objective))

    ds_cfg = resolve_ds_config(load_ds_config(cfg.ds_config), EngineSettings(
        micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum, world_size=dist.world_size,
        grad_clip=cfg.grad_clip, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay, precision=cfg.precision, hidden_size=d_student), origin=cfg.ds_config)
    global_batch = cfg.micro_batch_size * cfg.grad_accum * dist.world_size
    if len(train_tokens) < global_batch:
        raise ConfigError(f"split {cfg.train_split!r} has {len(train_tokens)} samples, fewer than one global batch "
                          f"of {global_batch} (micro_batch_size x grad_accum x ranks)")
    return Plan(data=data, tokenizer=tok, train_tokens=train_tokens, valid_tokens=valid_tokens, teacher_mode=tmode,
                store=store, valid_store=valid_store, objective=objective, teacher_dims=teacher_dims,
                ds_config=ds_cfg, inputs=inputs)


def load_student(cfg: TrainConfig, plan: Plan, stage: int) -> Any:
    hf_ds = None
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(plan.ds_config)  # noqa: F841  (Hugging Face partitions while loading)
    student = load_model(cfg.student, tokenizer=plan.tokenizer, seed=cfg.seed)
    del hf_ds  # later from_pretrained calls (e.g. reloading the saved model) load whole again
    if len(plan.tokenizer) > student.config.vocab_size:
        raise ConfigError(f"--student {cfg.student}: vocabulary {student.config.vocab_size} < the prepared data's "
                          f"tokenizer ({len(plan.tokenizer)})")
    student.config.use_cache = False
    if cfg.activation_checkpointing:
        enable = getattr(student, "activation_checkpointing_enable", None)  # transformers >= 5.2x; older: gradient_
        kwargs = {"use_reentrant": False}  # reentrant checkpointing would cut the feature loss's gradient
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return student


def setup(cfg: TrainConfig) -> Run:
    """Checked inputs, then the process group, models and the DeepSpeed engine."""
    plan = plan_run(cfg)
    dist = ensure_dist_env()
    import deepspeed

    deepspeed.init_distributed(verbose=False)
    device = pick_device(dist.local_rank)
    seed_everything(cfg.seed)
    stage, dtype = zero_stage(plan.ds_config), torch_dtype(precision_of(plan.ds_config))
    objective, store = plan.objective, plan.store

    teacher = head = None
    if plan.teacher_mode == "online":
        # Loaded before any ZeRO-3 context so it stays whole on every rank (it is not trained).
        teacher = load_model(cfg.teacher, tokenizer=plan.tokenizer, dtype=dtype, seed=cfg.seed).to(device).eval()
        teacher.requires_grad_(False)
        plan.inputs["teacher"] = {"spec": cfg.teacher, "fingerprint": model_fingerprint(
            teacher if cfg.teacher.startswith("preset:") else cfg.teacher)}
    elif store is not None and objective.kd == "final":
        weight, bias = stored_head(store)
        head = (weight.to(device, dtype), None if bias is None else bias.to(device, dtype))
    model = StudentWithHeads(load_student(cfg, plan, stage), objective, plan.teacher_dims)

    train_set = make_dataset(plan.train_tokens, store, _store_layers(objective), topk=objective.kd == "topk")
    steps_per_epoch = len(train_set) // (cfg.micro_batch_size * cfg.grad_accum * dist.world_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(round(cfg.warmup_ratio * total_steps))
    schedule = functools.partial(warmup_cosine, warmup=warmup, total=total_steps, min_ratio=cfg.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=plan.ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))

    valid_set = None
    if plan.valid_tokens is not None:
        valid_set = make_dataset(plan.valid_tokens, plan.valid_store, _valid_layers(objective),
                                 topk=objective.kd == "topk")
    out = Path(cfg.out)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        write_json_atomic(out / "ds_config.json", plan.ds_config)
    pad = plan.tokenizer.pad_token_id
    return Run(cfg=cfg, dist=dist, device=device, out=out, engine=engine, stage=stage, objective=objective,
               tokenizer=plan.tokenizer, train_set=train_set, valid_set=valid_set, valid_store=plan.valid_store,
               teacher=teacher, head=head, collate=make_collate(pad, store is not None),
               valid_collate=make_collate(pad, plan.valid_store is not None), steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, inputs=plan.inputs)


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


def build_objective(cfg: TrainConfig, n_student: int, n_teacher: int, store: FeatureStore | None) -> Objective:
    if cfg.mode == "sft":
        return Objective("sft", 0.0, 0.0, "none", (), (), "none", cfg.kd_temperature)
    try:
        pairs = layer_map(n_student, n_teacher, parse_layer_map(cfg.layer_map), cfg.n_layer_pairs)
    except ValueError as e:
        raise ConfigError(f"--layer_map / --n_layer_pairs: {e}") from e
    weights = list(cfg.layer_weights) or [1.0 / len(pairs)] * len(pairs)
    kd = cfg.kd
    if cfg.alpha == 0:
        kd = "none"
    elif kd == "auto":
        if store is None or FINAL in store.layers:
            kd = "final"
        elif store.manifest.get("topk_logits"):
            kd = "topk"
        else:
            raise ConfigError(f"--alpha {cfg.alpha} needs teacher logits, but {cfg.features} stores neither 'final' "
                              f"nor top-k logits (cache with --final or --topk_logits K, or pass --alpha 0)")
    if kd == "topk" and store is None:
        raise ConfigError("--kd topk reads stored top-k logits; the online teacher gives exact logits (--kd final)")
    return Objective("distill", cfg.alpha, cfg.beta, cfg.loss, tuple(pairs), tuple(weights), kd, cfg.kd_temperature)
