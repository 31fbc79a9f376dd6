"""Setting up a training run (`./run.sh train`): inputs checked (`plan_run`), then a DeepSpeed engine (`setup`).

Runs unchanged as one process, under `torchrun`, or under the `deepspeed` launcher (pipeline/runtime.py fills the
rendezvous variables of a plain process). The run folder:

    OUT/config.yaml         the options of the run            OUT/ds_config.json   the resolved DeepSpeed config
    OUT/checkpoints/        DeepSpeed checkpoints + data position + RNG (pipeline/train/checkpointing.py)
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
from typing import Any, Callable

import torch

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.data.prepared import PreparedData, TokenDataset
from pipeline.errors import ConfigError
from pipeline.features.store import FeatureStore
from pipeline.io import check_folder_is_ours, hold_folder_lock
from pipeline.models import FINAL, load_model, model_fingerprint, model_shape
from pipeline.models.encoders import load_classifier, load_frozen_classifier
from pipeline.models.teacher import LMHead, load_frozen_teacher
from pipeline.runtime import (DistInfo, dist_info, ensure_dist_env, pick_device, seed_everything,
                              skip_unused_deepspeed_ops, torch_dtype)
from pipeline.train.config import TrainConfig, teacher_mode
from pipeline.train.data import make_collate, make_dataset
from pipeline.train.memory import activation_bytes, count_parameters, model_config
from pipeline.train.ds_config import EngineSettings, load_ds_config, precision_of, resolve_ds_config, zero_stage
from pipeline.train.elastic import ElasticResume, check_stage, pin_zero_stage, plan_elastic, universal_copy
from pipeline.train.objective import Objective, StudentWithHeads, build_objective


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
    engine: Any  # deepspeed.DeepSpeedEngine wrapping a StudentWithHeads
    stage: int
    objective: Objective
    tokenizer: PreTrainedTokenizerBase
    train_set: torch.utils.data.Dataset
    valid_set: torch.utils.data.Dataset | None
    valid_store: FeatureStore | None
    teacher: PreTrainedModel | None  # the online teacher; None with stored features
    head: LMHead | None  # the stored teacher's LM head, for exact KD
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    valid_collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    steps_per_epoch: int
    total_steps: int
    inputs: dict[str, Any]
    ds_config: dict[str, Any]
    elastic: ElasticResume | None = None  # a --resume on another number of ranks
    lock: Any = None  # OUT/.lock, held by rank 0 while the run lives


RUN_FILES = {"checkpoints", "tb", "metrics.jsonl", "config.yaml", "ds_config.json", "model", "manifest.json",
             ".lock"}


def check_output_folder(out: Path, resume: bool) -> None:
    check_folder_is_ours(out, "train", RUN_FILES | {p.name for p in out.glob(".model.*")}, "geokd.train")
    if (out / "model" / "config.json").is_file():
        raise FileExistsError(f"{out}: this run is finished (model/ exists); choose another --out")
    if not resume and ((out / "checkpoints").exists() or (out / "metrics.jsonl").exists()):
        raise FileExistsError(f"{out} holds a previous run; pass --resume to continue it or choose another --out")


@dataclass
class Plan:
    """The checked inputs of a run, before any process group, engine or model weights exist."""

    cfg: TrainConfig  # the options as run (grad_accum adjusted on an elastic resume)
    data: PreparedData
    tokenizer: PreTrainedTokenizerBase
    train_tokens: TokenDataset
    valid_tokens: TokenDataset | None
    teacher_mode: str
    store: FeatureStore | None
    valid_store: FeatureStore | None
    objective: Objective
    teacher_dims: dict[int, int]
    ds_config: dict[str, Any]
    zero_stage: int  # read once from the resolved ds_config
    dtype: torch.dtype  # the engine's precision as a torch dtype, likewise
    activation_checkpointing: bool
    inputs: dict[str, Any]
    elastic: ElasticResume | None


def plan_run(cfg: TrainConfig) -> Plan:
    """Check everything that can be checked cheaply, so a bad option fails in seconds with its name."""
    cfg.check()
    dist = dist_info()
    check_output_folder(Path(cfg.out), cfg.resume)
    cfg, elastic = plan_elastic(cfg, dist.world_size)
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
    task = data.task  # a classification task: encoders, class logits (pipeline/train/classifier.py)
    classifier = task is not None
    d_student, n_student = model_shape(cfg.student, "student", classifier=classifier)

    # The teacher: a feature store (the model is never loaded), or a frozen model run every step.
    store = valid_store = None
    teacher_dims: dict[int, int] = {}
    if tmode == "stored":
        store = FeatureStore(cfg.features)
        if store.split != cfg.train_split:
            raise ConfigError(f"--features {cfg.features} caches split {store.split!r}, "
                              f"training reads {cfg.train_split!r}")
        n_teacher = store.teacher_depth
        teacher_dims = {t: store.feature_dim(t) for t in store.layers if t != FINAL}
        inputs["features"] = {"path": str(Path(cfg.features).resolve()),
                              "teacher_fingerprint": store.teacher_fingerprint}
    elif tmode == "online":
        d_teacher, n_teacher = model_shape(cfg.teacher, "teacher", classifier=classifier)
        teacher_dims = {t: d_teacher for t in range(n_teacher + 1)}
    else:
        n_teacher = 0
    objective = build_objective(cfg, n_student, n_teacher, store, classifier=classifier)
    if objective.loss == "pkd" and objective.uses_features and d_student != teacher_dims.get(objective.pairs[0][1]):
        raise ConfigError(f"--loss pkd compares [CLS] rows of the same width: the student's are {d_student} wide, "
                          f"the teacher's {teacher_dims.get(objective.pairs[0][1])} (a layer-cut student has the "
                          f"teacher's width; across widths use procrustes, fg, cka or proj_mse)")

    if store is not None:
        # A --teacher directory given with stored features must be the one that made them (a preset's weights
        # depend on the cache stage's seed, so presets are not checked).
        teacher_dir = cfg.teacher if cfg.teacher and not cfg.teacher.startswith("preset:") else None
        store.check_compatible(data_fingerprint=data.fingerprint, tokenizer_fingerprint=data.tokenizer_fingerprint,
                               layers=objective.store_layers,
                               teacher_fingerprint=model_fingerprint(teacher_dir) if teacher_dir else None)
        if cfg.valid_features and valid_tokens is not None:
            valid_store = FeatureStore(cfg.valid_features)
            if valid_store.split != cfg.valid_split:
                raise ConfigError(f"--valid_features {cfg.valid_features} caches split "
                                  f"{valid_store.split!r}, validation reads {cfg.valid_split!r}")
            valid_store.check_compatible(data_fingerprint=data.fingerprint,
                                         tokenizer_fingerprint=data.tokenizer_fingerprint,
                                         teacher_fingerprint=store.teacher_fingerprint,
                                         layers=objective.valid_layers)

    # The engine: ZeRO stage and activation checkpointing follow the run's size where the options say "auto".
    n_params = count_parameters(cfg.student, tok)
    device_bytes = (torch.cuda.get_device_properties(max(dist.local_rank, 0)).total_memory
                    if torch.cuda.is_available() else None)
    settings = EngineSettings(
        micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum, world_size=dist.world_size,
        grad_clip=cfg.grad_clip, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay, precision=cfg.precision, hidden_size=d_student, n_params=n_params,
        device_bytes=device_bytes)
    raw = load_ds_config(cfg.ds_config)
    notes = pin_zero_stage(raw, elastic)
    ds_cfg = resolve_ds_config(raw, settings, origin=cfg.ds_config, notes=notes)
    stage, precision = zero_stage(ds_cfg), precision_of(ds_cfg)
    if elastic is not None:
        check_stage(elastic, stage, precision)
        notes.append(f"resuming {elastic.tag} of {elastic.from_ranks} rank(s) on {elastic.to_ranks}: grad_accum "
                     f"{elastic.grad_accum[0]} -> {elastic.grad_accum[1]}, global batch "
                     f"{cfg.global_batch(dist.world_size)} kept"
                     + (" (through DeepSpeed's universal checkpoint)" if elastic.universal else ""))
        if elastic.universal:
            ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
    checkpointing, why = activation_checkpointing_choice(cfg, tok, n_params, stage, dist.world_size,
                                                         int(train_tokens.lengths.max()), device_bytes,
                                                         torch_dtype(precision))
    if cfg.activation_checkpointing == "auto":
        notes.append(f"activation checkpointing auto -> {'on' if checkpointing else 'off'}: {why}")
    if dist.is_main:
        for note in notes:
            print(f"[train] {note}")
    batch = cfg.global_batch(dist.world_size)
    if len(train_tokens) < batch:
        raise ConfigError(f"split {cfg.train_split!r} has {len(train_tokens)} samples, fewer than one global batch "
                          f"of {batch} (micro_batch_size x grad_accum x ranks)")
    return Plan(cfg=cfg, data=data, tokenizer=tok, train_tokens=train_tokens, valid_tokens=valid_tokens,
                teacher_mode=tmode, store=store, valid_store=valid_store, objective=objective,
                teacher_dims=teacher_dims, ds_config=ds_cfg, zero_stage=stage, dtype=torch_dtype(precision),
                activation_checkpointing=checkpointing, inputs=inputs,
                elastic=elastic)


def activation_checkpointing_choice(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase, n_params: int, stage: int,
                                    world_size: int, seq_len: int, device_bytes: int | None,
                                    dtype: torch.dtype) -> tuple[bool, str]:
    """On or off, and why. `auto` turns it on only when a micro-batch's activations would not fit 80% of the device
    beside the model states: recomputing costs about a forward (23% of a CPU step for a student whose peak memory
    it did not change)."""
    if cfg.activation_checkpointing != "auto":
        return cfg.activation_checkpointing == "true", "set by --activation_checkpointing"
    if device_bytes is None:
        return False, "no accelerator: host memory is the limit, and recomputing only costs time"
    states = 16 * n_params if stage < 2 else 4 * n_params + 12 * n_params / world_size
    acts = activation_bytes(model_config(cfg.student, tokenizer), cfg.micro_batch_size, seq_len,
                            torch.finfo(dtype).bits // 8)
    need = f"model states {states / 2**30:.1f} GiB + activations {acts / 2**30:.1f} GiB"
    if states + acts <= 0.8 * device_bytes:
        return False, f"{need} fit 80% of the device's {device_bytes / 2**30:.0f} GiB"
    return True, f"{need} exceed 80% of the device's {device_bytes / 2**30:.0f} GiB"


def load_student(cfg: TrainConfig, plan: Plan, stage: int) -> Any:
    hf_ds = None
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(plan.ds_config)  # noqa: F841  (Hugging Face partitions while loading)
    task = plan.data.task
    if task is not None:
        student = load_classifier(cfg.student, task["labels"], seed=cfg.seed, option="student")
    else:
        student = load_model(cfg.student, tokenizer=plan.tokenizer, seed=cfg.seed)
    del hf_ds  # later from_pretrained calls (e.g. reloading the saved model) load whole again
    if len(plan.tokenizer) > student.config.vocab_size:
        raise ConfigError(f"--student {cfg.student}: vocabulary {student.config.vocab_size} < the prepared data's "
                          f"tokenizer ({len(plan.tokenizer)})")
    student.config.use_cache = False
    if plan.activation_checkpointing:
        enable = getattr(student, "activation_checkpointing_enable", None)  # transformers >= 5.2x; older: gradient_
        kwargs = {"use_reentrant": False}  # reentrant checkpointing would cut the feature loss's gradient
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return student


def setup(cfg: TrainConfig, plan: Plan | None = None) -> Run:
    """The process group, models and the DeepSpeed engine of checked inputs (`plan_run(cfg)` unless given)."""
    plan = plan or plan_run(cfg)
    cfg = plan.cfg
    dist = ensure_dist_env()
    lock = None
    if dist.is_main:  # before any engine: a second run into a folder a live run holds stops here
        Path(cfg.out).mkdir(parents=True, exist_ok=True)  # the run's files are written once --resume is accepted
        lock = hold_folder_lock(cfg.out, "train")
    import deepspeed

    skip_unused_deepspeed_ops()
    deepspeed.init_distributed(verbose=False)
    device = pick_device(dist.local_rank)  # before any collective: NCCL's barrier runs on the current device
    if plan.elastic is not None and plan.elastic.universal:
        universal_copy(Path(cfg.out) / "checkpoints", plan.elastic, dist.is_main)
    seed_everything(cfg.seed)
    stage, dtype = plan.zero_stage, plan.dtype
    objective, store = plan.objective, plan.store

    teacher = head = None
    if plan.teacher_mode == "online":
        # Loaded before any ZeRO-3 context so it stays whole on every rank (it is not trained).
        if plan.data.task is not None:
            teacher = load_frozen_classifier(cfg.teacher, plan.data.task["labels"], dtype=dtype, device=device)
        else:
            teacher, _ = load_frozen_teacher(cfg.teacher, tokenizer=plan.tokenizer, dtype=dtype, device=device,
                                             world_size=dist.world_size, seed=cfg.seed)
        plan.inputs["teacher"] = {"spec": cfg.teacher, "fingerprint": model_fingerprint(
            teacher if cfg.teacher.startswith("preset:") else cfg.teacher)}
    elif store is not None and objective.kd == "final":
        head = store.lm_head().to(device, dtype)
    model = StudentWithHeads(load_student(cfg, plan, stage), objective, plan.teacher_dims)

    train_set = make_dataset(plan.train_tokens, store, objective.store_layers, topk=objective.kd == "topk")
    steps_per_epoch = len(train_set) // cfg.global_batch(dist.world_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(round(cfg.warmup_ratio * total_steps))
    schedule = functools.partial(warmup_cosine, warmup=warmup, total=total_steps, min_ratio=cfg.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=plan.ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    if stage == 0 and dist.world_size == 1:
        # One rank has nothing to all-reduce, but DeepSpeed would still copy every gradient into flat buffers,
        # "reduce" them and copy them back each step.
        engine.enable_backward_allreduce = False

    valid_set = None
    if plan.valid_tokens is not None:
        valid_set = make_dataset(plan.valid_tokens, plan.valid_store, objective.valid_layers,
                                 topk=objective.kd == "topk")
    out = Path(cfg.out)
    pad = plan.tokenizer.pad_token_id
    return Run(cfg=cfg, dist=dist, device=device, out=out, engine=engine, stage=stage, objective=objective,
               tokenizer=plan.tokenizer, train_set=train_set, valid_set=valid_set, valid_store=plan.valid_store,
               teacher=teacher, head=head, collate=make_collate(pad, store is not None),
               valid_collate=make_collate(pad, plan.valid_store is not None),
               steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, inputs=plan.inputs, ds_config=plan.ds_config, elastic=plan.elastic,
               lock=lock)
