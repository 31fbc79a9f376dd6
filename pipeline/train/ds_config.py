"""DeepSpeed configs: read a `ds_configs/*.json`, fill its "auto" values from the training config, check the rest.

The shipped JSONs say what differs between setups (ZeRO stage, offload, precision) and leave every value the
training config owns as "auto": batch sizes, clipping, optimizer hyper-parameters, precision when not pinned,
bucket sizes that scale with the model width. `ds_configs/auto.json` (the default) also leaves the ZeRO stage to
the run: 0 on one rank (ZeRO saves memory only by partitioning across ranks, and its bookkeeping cost a third of
a single-process step: BENCHMARKS.md), 2 on several, 3 when ZeRO-2's share of the model states does not fit. A
user's own JSON may set those explicitly; an explicit value that contradicts the training config is an error
naming the file and the key, never a silent winner.
The learning-rate schedule is the training config's (warmup + cosine, built in pipeline/train/setup.py); a JSON
"scheduler" block is refused rather than half-honoured.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import read_config_text
from pipeline.errors import ConfigError

AUTO = "auto"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class EngineSettings:
    """What the training config decides about the engine; the JSON's "auto" values are filled from these."""

    micro_batch_size: int
    grad_accum: int
    world_size: int
    grad_clip: float
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    precision: str  # auto | fp32 | bf16 | fp16
    hidden_size: int  # the student's width, for ZeRO bucket sizes
    n_params: int = 0  # the trained parameters, for the ZeRO stage "auto" (0: unknown)
    device_bytes: int | None = None  # one accelerator's memory; None on a CPU


def global_batch(micro_batch_size: int, grad_accum: int, ranks: int) -> int:
    """Samples per optimizer step over all ranks: the one formula (DeepSpeed's train_batch_size)."""
    return micro_batch_size * grad_accum * ranks


def auto_zero_stage(s: EngineSettings, offload: bool) -> tuple[int, str]:
    """The ZeRO stage for `"stage": "auto"`, and why. Model states (weights, gradients, fp32 master weights and
    Adam moments) take about 16 bytes a parameter whole; ZeRO-2 keeps 4 of them whole and partitions the rest."""
    whole = 16 * s.n_params
    if s.world_size == 1:
        if offload:
            return 2, "one rank with optimizer offload (ZeRO-Offload needs stage >= 1)"
        return 0, "one rank: ZeRO partitions across ranks, so it would only add bookkeeping"
    if s.device_bytes is None or 4 * s.n_params + 12 * s.n_params / s.world_size <= 0.6 * s.device_bytes:
        return 2, f"{s.world_size} ranks: gradients and optimizer states partitioned"
    return 3, (f"{s.world_size} ranks, and ZeRO-2's share of the model states ({whole / s.world_size / 2**30:.1f}"
               f"+ GiB) does not fit 60% of a device: parameters partitioned too")


def fused_adamw_available() -> bool:
    """torch's fused AdamW (one kernel for all tensors: 4.4x the single-tensor step on a CPU) exists for CUDA, and
    for CPUs since torch 2.4."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return torch.cuda.is_available() or (major, minor) >= (2, 4)


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = read_config_text(path, "DeepSpeed config")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def _known_top_level() -> set[str]:
    import deepspeed.runtime.constants as constants

    names = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str) and v.isidentifier()}
    return names | {"zero_optimization", "optimizer", "scheduler", "activation_checkpointing", "flops_profiler",
                    "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "aio", "compression_training",
                    "data_efficiency", "elasticity", "autotuning", "amp", "sparse_attention", "pipeline",
                    "curriculum_learning", "nebula", "weight_quantization", "hybrid_engine", "compile", "timers",
                    "monitor_config", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer"}


def check_keys(cfg: dict[str, Any], origin: str) -> None:
    """Name what DeepSpeed would reject with a pydantic traceback (unknown ZeRO or AdamW keys) or silently ignore
    (a misspelt top-level key), with the nearest valid spelling."""
    import difflib
    import inspect

    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    def refuse(where: str, key: str, known: set[str]) -> None:
        near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        raise ConfigError(f"{origin}: unknown key {where}{key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))

    top = _known_top_level()
    for key in cfg:
        if key not in top and difflib.get_close_matches(key, sorted(top), n=1, cutoff=0.8):
            refuse("", key, top)
    zero_known = {n for n, f in DeepSpeedZeroConfig.model_fields.items()} | {
        f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias}
    for key in cfg.get("zero_optimization") or {}:
        if key not in zero_known:
            refuse("zero_optimization.", key, zero_known)
    adam_known = set(inspect.signature(torch.optim.AdamW).parameters) - {"params"} | {"torch_adam", "adam_w_mode"}
    for key in (cfg.get("optimizer") or {}).get("params") or {}:
        if key not in adam_known:
            refuse("optimizer.params.", key, adam_known)


def _default_precision() -> str:
    # bf16 where the hardware has it (no loss scaling to tune); fp32 on CPUs, where DeepSpeed's half paths are slow
    # and the tests compare trajectories.
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _fill(where: dict[str, Any], key: str, value: Any, origin: str, check: bool = True) -> None:
    """Set an "auto" (or absent) key; an explicit value must agree with the training config when `check`."""
    current = where.get(key, AUTO)
    if current == AUTO:
        where[key] = value
    elif check and current != value:
        raise ConfigError(
            f"{origin}: {key} = {current!r} contradicts the training config ({value!r}); set it to \"auto\" or "
            f"change the training option instead"
        )


def resolve_ds_config(raw: dict[str, Any], settings: EngineSettings, origin: str = "ds_config",
                      notes: list[str] | None = None) -> dict[str, Any]:
    """A complete DeepSpeed config: "auto" filled from `settings`, explicit values checked against them. Choices
    a user should hear about (the ZeRO stage of "auto") are appended to `notes`."""
    cfg = copy.deepcopy(raw)
    check_keys(cfg, origin)
    s = settings
    if "scheduler" in cfg:
        raise ConfigError(
            f"{origin}: remove the \"scheduler\" block; the schedule (warmup + cosine) comes from the training "
            f"config's lr / warmup_steps / warmup_ratio / min_lr_ratio"
        )
    _fill(cfg, "train_micro_batch_size_per_gpu", s.micro_batch_size, origin)
    _fill(cfg, "gradient_accumulation_steps", s.grad_accum, origin)
    _fill(cfg, "train_batch_size", global_batch(s.micro_batch_size, s.grad_accum, s.world_size), origin)
    _fill(cfg, "gradient_clipping", s.grad_clip, origin)
    _fill(cfg, "steps_per_print", 10**12, origin, check=False)  # progress is ours (tqdm, TensorBoard)

    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    if zero.get("stage", 0) == AUTO:
        zero["stage"], why = auto_zero_stage(s, offload_opt)
        if notes is not None:
            notes.append(f"ZeRO stage auto -> {zero['stage']}: {why}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{origin}: zero_optimization.stage must be 0, 1, 2, 3 or \"auto\", got {stage!r}")
    zorigin = f"{origin}: zero_optimization"
    h = s.hidden_size
    # Buckets of at least 5e7 elements: one h x h matrix (Hugging Face's default) is 65k elements for a 256-wide
    # student, ~50 all-reduce calls a step where one or two do.
    _fill(zero, "reduce_bucket_size", max(h * h, 5 * 10**7), zorigin, check=False)
    _fill(zero, "allgather_bucket_size", max(h * h, 5 * 10**7), zorigin, check=False)
    _fill(zero, "overlap_comm", torch.cuda.is_available(), zorigin, check=False)  # gloo gains nothing from it
    if stage == 3:
        _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * h * h), zorigin, check=False)
        _fill(zero, "stage3_param_persistence_threshold", 10 * h, zorigin, check=False)

    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise ConfigError(f"{origin}: optimizer.type {opt.get('type')!r}: this pipeline trains with AdamW")
    params = opt.setdefault("params", {})
    porigin = f"{origin}: optimizer.params"
    _fill(params, "lr", s.lr, porigin)
    _fill(params, "betas", list(s.betas), porigin)
    if isinstance(params.get("betas"), tuple):
        params["betas"] = list(params["betas"])
    _fill(params, "eps", s.eps, porigin)
    _fill(params, "weight_decay", s.weight_decay, porigin)
    # torch's AdamW needs no JIT build (DeepSpeed's CPU/fused Adam kernels compile for ~45 s); ZeRO-Offload wants
    # DeepSpeedCPUAdam, which DeepSpeed insists on for offloaded optimizer states.
    _fill(params, "torch_adam", not offload_opt, porigin, check=False)
    if params.get("torch_adam") is True:
        _fill(params, "fused", fused_adamw_available(), porigin, check=False)  # passed on to torch.optim.AdamW
    elif params.get("fused", AUTO) == AUTO:
        params.pop("fused", None)

    precision = s.precision if s.precision != AUTO else None
    pinned = [p for p in ("bf16", "fp16") if cfg.get(p, {}).get("enabled") is True]
    explicit_fp32 = all(cfg.get(p, {}).get("enabled") is False for p in ("bf16", "fp16"))
    if len(pinned) > 1:
        raise ConfigError(f"{origin}: bf16 and fp16 are both enabled; pick one")
    json_precision = pinned[0] if pinned else ("fp32" if explicit_fp32 else None)
    if precision and json_precision and precision != json_precision:
        raise ConfigError(f"{origin}: the JSON pins precision {json_precision}, the training config asks for "
                          f"{precision}; use a config with \"enabled\": \"auto\" or drop --precision")
    chosen = precision or json_precision or _default_precision()
    if chosen not in PRECISIONS[1:]:
        raise ConfigError(f"precision {chosen!r}: choose one of {', '.join(PRECISIONS)}")
    for p in ("bf16", "fp16"):
        block = cfg.setdefault(p, {})
        block["enabled"] = chosen == p
    if not cfg["fp16"]["enabled"]:
        cfg.pop("fp16")  # DeepSpeed validates the loss-scale fields even when disabled
    _reject_leftover_auto(cfg, origin)
    return cfg


def _reject_leftover_auto(cfg: Any, origin: str, prefix: str = "") -> None:
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            _reject_leftover_auto(v, origin, f"{prefix}{k}.")
    elif isinstance(cfg, list):
        for i, v in enumerate(cfg):
            _reject_leftover_auto(v, origin, f"{prefix}{i}.")
    elif cfg == AUTO:
        raise ConfigError(f"{origin}: {prefix[:-1]} is \"auto\" but this pipeline has no value for it; set it")


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def precision_of(cfg: dict[str, Any]) -> str:
    if cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"

