"""Stage `cache`: run the teacher once over prepared data and store its hidden states as verified shards.

    ./run.sh cache --data PREPARED_DIR --teacher MODEL_DIR_OR_PRESET --out DIR --layers 2 4 --final --dtype bf16
    ./run.sh cache --verify --out DIR          hash every file of a finished store against its manifest
    ./run.sh cache --finalize --out DIR        write the manifest of a store whose units are all cached

Runs as one process or under torchrun/deepspeed (rank r caches units r, r+W, ...; the shards are the same for any
number of ranks). Rerunning the same command after a crash or a kill resumes: finished units are verified and
kept, the rest recomputed. Store format and reader: pipeline/feature_store.py; the work itself:
pipeline/feature_cache.py.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import feature_cache as fc
from pipeline.config import ConfigError, config_to_dict, parse_config
from pipeline.data import PreparedData
from pipeline.feature_store import (
    DTYPES, LM_HEAD_FILE, LOWRANK_FILE, MANIFEST, PLAN, FeatureStore, StoreError, layer_key, save_tensors,
    verify_files,
)
from pipeline.io import read_json, sha256_file
from pipeline.models import PRESETS, capture_hidden_states, load_model, model_fingerprint, preset_config
from pipeline.runtime import ensure_dist_env, pick_device
from pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint


@dataclass
class CacheConfig:
    data: str = field(default="", metadata={"help": "prepared data folder (./run.sh prepare)"})
    teacher: str = field(default="", metadata={"help": "teacher model directory or preset:NAME"})
    out: str = field(default="", metadata={"help": "output folder of the feature store"})
    split: str = field(default="train", metadata={"help": "which prepared split to cache"})
    layers: list[int] = field(default_factory=list, metadata={"help": "hidden-state indices (0 = embeddings)"})
    final: bool = field(default=False, metadata={"help": "also store the LM head's input (exact logits via the "
                                                          "LM-head weight saved beside the store)"})
    topk_logits: int = field(default=0, metadata={"help": "also store the top-k teacher log-probabilities"})
    dtype: str = field(default="bf16", metadata={"help": "stored dtype: bf16, fp16 or fp32"})
    teacher_dtype: str = field(default="auto", metadata={"help": "compute dtype; auto = bf16 on GPU, fp32 on CPU"})
    lowrank_k: int = field(default=0, metadata={"help": "store k PCA coefficients per token for each layer"})
    lowrank_energy: float = field(default=0.0, metadata={"help": "or the least k keeping this variance fraction"})
    lowrank_fit_tokens: int = field(default=200_000, metadata={"help": "tokens sampled to fit the PCA bases"})
    seed: int = field(default=0, metadata={"help": "seed of preset teacher weights and of the PCA sample"})
    shard_tokens: int = field(default=65_536, metadata={"help": "tokens per shard (unit of work and of resume)"})
    batch_tokens: int = field(default=8192, metadata={"help": "padded tokens per teacher batch"})
    max_batch_size: int = field(default=64, metadata={"help": "samples per teacher batch at most"})
    writer_threads: int = field(default=0, metadata={"help": "threads writing and hashing shards; 0 = by core count"})
    verify: bool = field(default=False, metadata={"help": "only verify the store in --out"})
    finalize: bool = field(default=False, metadata={"help": "only write the manifest of --out"})
    progress: bool = field(default=True, metadata={"help": "progress bar on rank 0"})


def check_config(cfg: CacheConfig) -> None:
    if not cfg.out:
        raise ConfigError("--out is required")
    if cfg.verify or cfg.finalize:
        return
    for name in ("data", "teacher"):
        if not getattr(cfg, name):
            raise ConfigError(f"--{name} is required")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype {cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    if cfg.teacher_dtype not in ("auto", *DTYPES):
        raise ConfigError(f"--teacher_dtype {cfg.teacher_dtype!r}: choose auto or one of {', '.join(DTYPES)}")
    if not cfg.layers and not cfg.final and not cfg.topk_logits:
        raise ConfigError("nothing to cache: give --layers, --final and/or --topk_logits")
    if len(set(cfg.layers)) != len(cfg.layers) or any(x < 0 for x in cfg.layers):
        raise ConfigError(f"--layers {cfg.layers}: distinct hidden-state indices >= 0 expected")
    if cfg.lowrank_k and cfg.lowrank_energy:
        raise ConfigError("give --lowrank_k or --lowrank_energy, not both")
    if not 0.0 <= cfg.lowrank_energy <= 1.0 or cfg.lowrank_k < 0:
        raise ConfigError("--lowrank_energy must be in (0, 1] and --lowrank_k >= 0")
    if (cfg.lowrank_k or cfg.lowrank_energy) and not cfg.layers:
        raise ConfigError("low-rank storage applies to --layers (the final state stays full for exact logits)")


def barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def verify(out: Path) -> int:
    if not (out / MANIFEST).is_file():
        if (out / PLAN).is_file():
            plan = read_json(out / PLAN)
            left = len(fc.pending_units(out, plan))
            raise StoreError(f"{out}: not finished, {left} of {len(plan['units'])} units still to cache; rerun the "
                             f"cache command to resume")
        raise StoreError(f"{out}: no feature store here ({MANIFEST} missing)")
    problems = verify_files(out, read_json(out / MANIFEST))
    if problems:
        print(f"[cache] {out}: {len(problems)} problem(s):\n  " + "\n  ".join(problems)
              + f"\n[cache] to repair: delete {out / MANIFEST} and rerun the cache command; damaged units are "
              f"recomputed, sound ones kept", file=sys.stderr)
        return 1
    info = FeatureStore(out).verify()  # the index: sample ids unique, shards consistent with the manifest
    print(f"[cache] {out}: OK, {info['shards']} shards, {info['samples']} samples, {info['tokens']} tokens, "
          f"{info['bytes'] / 1e6:.1f} MB verified")
    return 0


def run(cfg: CacheConfig) -> int:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    dist = ensure_dist_env()
    if dist.world_size > 1:
        # Only for barriers: ranks share no tensors. A rank may wait for the slowest one for a long time.
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=12))
    say = print if dist.is_main else (lambda *a, **k: None)

    # Inputs: the prepared split and the teacher.
    data = PreparedData(cfg.data)
    dataset = data.split(cfg.split)
    tok = data.tokenizer()
    device = pick_device(dist.local_rank)
    compute_dtype = DTYPES["bf16" if device.type == "cuda" else "fp32"] if cfg.teacher_dtype == "auto" \
        else DTYPES[cfg.teacher_dtype]
    model, input_device = load_teacher(cfg, tok, compute_dtype, device, dist.world_size)
    teacher_dir = Path(cfg.teacher) if not cfg.teacher.startswith("preset:") else None
    if teacher_dir is not None and (teacher_dir / "tokenizer_config.json").is_file():
        if tokenizer_fingerprint(load_tokenizer(str(teacher_dir))) != data.tokenizer_fingerprint:
            raise StoreError(f"teacher {teacher_dir} has another tokenizer than the prepared data {cfg.data}")
    dims = probe_dims(model, cfg, input_device)

    # The plan: what the shards hold and how the work is cut. A rerun must agree with the one on disk.
    content = {
        "teacher_fingerprint": model_fingerprint(teacher_dir or model),
        "tokenizer_fingerprint": data.tokenizer_fingerprint, "data_fingerprint": data.fingerprint,
        "split": cfg.split, "layers": list(cfg.layers) + (["final"] if cfg.final else []), "dtype": cfg.dtype,
        "compute_dtype": str(compute_dtype).removeprefix("torch."), "topk_logits": cfg.topk_logits,
        "lowrank": ({"k": cfg.lowrank_k, "energy": cfg.lowrank_energy, "fit_tokens": cfg.lowrank_fit_tokens,
                     "seed": cfg.seed} if cfg.lowrank_k or cfg.lowrank_energy else None),
        "shard_tokens": cfg.shard_tokens, "batch_tokens": cfg.batch_tokens, "max_batch_size": cfg.max_batch_size,
    }
    info = {"teacher": {"spec": cfg.teacher, "n_layers": model.config.num_hidden_layers,
                        "vocab_size": model.config.vocab_size},
            "data_path": str(Path(cfg.data).resolve()), "dims": dims, "config": config_to_dict(cfg)}
    plan = fc.make_plan(content, fc.plan_units(dataset.lengths, cfg.shard_tokens), info)
    # Rank 0 alone judges and prepares the folder (another rank looking meanwhile could see it half made).
    if dist.is_main:
        state = fc.check_output_folder(out, plan)
        pending_at_start = fc.pending_units(out, plan) if state == "resume" else list(range(len(plan["units"])))
        if state != "complete":
            estimate = fc.storage_estimate(int(dataset.lengths.sum()), dims, DTYPES[cfg.dtype], cfg.topk_logits)
            fc.prepare_output_folder(out, plan, int(estimate * len(pending_at_start) / len(plan["units"])))
            write_side_files(out, cfg, plan, model, dataset, tok, input_device)
    barrier(dist.world_size)
    if not dist.is_main:
        state = fc.check_output_folder(out, plan)
    if state == "complete":
        say(f"[cache] {out} already holds this store, complete; `--verify` checks it")
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()
        return 0
    lowrank = fc.load_lowrank(out / LOWRANK_FILE, input_device) if content["lowrank"] else {}
    lowrank_sha = sha256_file(out / LOWRANK_FILE) if content["lowrank"] else None

    # This rank's units; finished ones are verified and kept.
    units = plan["units"]
    mine = list(range(dist.rank, len(units), dist.world_size))
    todo = [u for u in mine if not fc.unit_done(out, u, plan["fingerprint"], lowrank_sha)]
    tokens = lambda us: int(sum(dataset.lengths[units[u][0]:units[u][1]].sum() for u in us))  # noqa: E731
    say(f"[cache] {len(units)} units, {len(mine) - len(todo)} of this rank's {len(mine)} already done"
        + (f"; rank 0 of {dist.world_size} shown" if dist.world_size > 1 else ""))
    bar = tqdm(total=tokens(mine), initial=tokens(mine) - tokens(todo), unit="tok", unit_scale=True,
               desc="cache", disable=not (dist.is_main and cfg.progress), dynamic_ncols=True, mininterval=1.0)
    fc.cache_units(model, dataset, out, units, todo, plan_fp=plan["fingerprint"], lowrank_sha=lowrank_sha,
                   writers=cfg.writer_threads or fc.default_writer_threads(), layers=cfg.layers, final=cfg.final,
                   topk=cfg.topk_logits, store_dtype=DTYPES[cfg.dtype], lowrank=lowrank, pad_id=tok.pad_token_id,
                   batch_tokens=cfg.batch_tokens, max_batch_size=cfg.max_batch_size, device=input_device,
                   on_tokens=bar.update)
    bar.close()

    barrier(dist.world_size)
    if dist.is_main:
        wall = time.perf_counter() - t0
        manifest = fc.finalize_store(out, plan, config=config_to_dict(cfg), wall_s=wall)
        say("[cache] " + fc.summary(manifest, wall, tokens(pending_at_start)))
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()
    return 0


def write_side_files(out: Path, cfg: CacheConfig, plan: dict, model, dataset, tok, device: torch.device) -> None:
    """The LM-head weight (with --final) and the low-rank bases (fitted once, by rank 0, before any unit)."""
    if cfg.final and not (out / LM_HEAD_FILE).is_file():
        head = model.get_output_embeddings()
        side = {"weight": head.weight.detach().cpu()}
        if getattr(head, "bias", None) is not None:
            side["bias"] = head.bias.detach().cpu()
        save_tensors(out / LM_HEAD_FILE, side, {"plan": plan["fingerprint"]})
    if plan["content"]["lowrank"] and not (out / LOWRANK_FILE).is_file():
        print(f"[cache] fitting low-rank bases on ~{cfg.lowrank_fit_tokens} tokens")
        tensors, report = fc.fit_lowrank(
            model, dataset, cfg.layers, k=cfg.lowrank_k, energy=cfg.lowrank_energy, fit_tokens=cfg.lowrank_fit_tokens,
            seed=cfg.seed, pad_id=tok.pad_token_id, batch_tokens=cfg.batch_tokens, max_batch_size=cfg.max_batch_size,
            device=device)
        save_tensors(out / LOWRANK_FILE, tensors, {"plan": plan["fingerprint"], "report": report})


def load_teacher(cfg: CacheConfig, tok, dtype: torch.dtype, device: torch.device, world_size: int):
    """The teacher in eval mode and the device its inputs go to; sharded over GPUs only when it must be."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    placement = "cpu"
    if gpus:
        if cfg.teacher.startswith("preset:"):
            name = cfg.teacher.split(":", 1)[1]
            if name not in PRESETS:
                raise ConfigError(f"unknown teacher preset {name!r}; choose one of {', '.join(PRESETS)}")
            with torch.device("meta"):
                from transformers import OPTForCausalLM
                n = sum(p.numel() for p in OPTForCausalLM(preset_config(name, len(tok))).parameters())
            param_bytes = n * torch.finfo(dtype).bits // 8
        else:
            param_bytes = fc.checkpoint_param_bytes(Path(cfg.teacher), dtype) or 0
        have_accelerate = importlib.util.find_spec("accelerate") is not None
        placement = fc.teacher_placement(param_bytes, torch.cuda.mem_get_info(device)[1], gpus, world_size,
                                         have_accelerate)
    if placement == "device_map":
        if cfg.teacher.startswith("preset:"):
            raise StoreError(f"{cfg.teacher} does not fit one GPU; save it as a model directory to load it sharded")
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(cfg.teacher, local_files_only=True, dtype=dtype,
                                                     device_map="auto")
        return model.eval(), model.get_input_embeddings().weight.device
    model = load_model(cfg.teacher, tokenizer=tok, dtype=dtype, seed=cfg.seed)
    return model.to(device).eval(), device


def probe_dims(model, cfg: CacheConfig, device: torch.device) -> dict[str, dict[str, int]]:
    """Width of every stored hidden state, from a two-token forward (OPT-350M's layers differ from its final)."""
    ids = torch.full((1, 2), 2, dtype=torch.long, device=device)
    with torch.no_grad():
        hs = capture_hidden_states(model, ids, torch.ones_like(ids), list(cfg.layers), final=cfg.final)
    return {layer_key(k): {"d": int(v.shape[-1])} for k, v in hs.items()}


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(CacheConfig, argv)
        check_config(cfg)
        if cfg.verify:
            return verify(Path(cfg.out))
        if cfg.finalize:
            out = Path(cfg.out)
            if not (out / PLAN).is_file():
                raise StoreError(f"{out}: no {PLAN}, nothing to finalize")
            plan = read_json(out / PLAN)
            manifest = fc.finalize_store(out, plan, config=plan["info"]["config"], wall_s=0.0)
            print("[cache] " + fc.summary(manifest, 0.0))
            return 0
        return run(cfg)
    except (StoreError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"[cache] error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
