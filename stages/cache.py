"""Stage `cache`: run the teacher once over prepared data and store its hidden states as verified shards.

    ./run.sh cache --data PREPARED_DIR --teacher MODEL_DIR_OR_PRESET --out DIR --layers 2 4 --final
    ./run.sh cache --verify --out DIR          hash every file of a finished store against its manifest
    ./run.sh cache --finalize --out DIR        write the manifest of a store whose units are all cached

Runs as one process or under torchrun/deepspeed (rank r caches units r, r+W, ...; the shards are the same for any
number of ranks). Rerunning the same command after a crash or a kill resumes: finished units are verified and
kept, the rest recomputed. Options: pipeline/features/config.py; the format: pipeline/features/format.py; the
plan and manifest: pipeline/features/plan.py; the work: pipeline/features/cache.py.
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

from tqdm import tqdm

from pipeline.config import config_to_dict, stage_main
from pipeline.data.prepared import PreparedData
from pipeline.data.tokenizer import check_same_tokenizer, load_tokenizer
from pipeline.errors import ConfigError, StoreError
from pipeline.features import cache, plan as store_plan
from pipeline.features.config import CacheConfig
from pipeline.features.format import DTYPES, LOWRANK_FILE, MANIFEST, PLAN, QUANT_FILE, read_quant_params, verify_files
from pipeline.features.lowrank import load_lowrank
from pipeline.features.quant import QuantSpec, check_spec, default_group
from pipeline.features.store import FeatureStore
from pipeline.io import read_json, sha256_file
from pipeline.models import model_fingerprint
from pipeline.models.encoders import load_frozen_classifier
from pipeline.models.teacher import load_frozen_teacher
from pipeline.runtime import (
    barrier, destroy_process_group, ensure_dist_env, init_process_group, pick_device, torch_dtype,
)


def run(cfg: CacheConfig) -> int:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    dist = ensure_dist_env()
    # Only for barriers: ranks share no tensors. A rank may wait for the slowest one for a long time.
    init_process_group(dist.world_size, "gloo", timeout=timedelta(hours=12))
    say = print if dist.is_main else (lambda *a, **k: None)

    # 1. Inputs: the prepared split and the teacher, which must share the data's tokenizer.
    data = PreparedData(cfg.data)
    dataset = data.split(cfg.split)
    tok = data.tokenizer()
    teacher_dir = Path(cfg.teacher) if not cfg.teacher.startswith("preset:") else None
    if teacher_dir is not None and (teacher_dir / "tokenizer_config.json").is_file():  # before the weights load
        check_same_tokenizer(load_tokenizer(str(teacher_dir), need_eos=data.task is None), tok,
                             ("teacher", "prepared data"), where=f"{teacher_dir} and {cfg.data}: ")
    device = pick_device(dist.local_rank)
    compute_dtype = torch_dtype(cfg.teacher_dtype, device)
    task = data.task  # a classification task's teacher is an encoder classifier; its class logits are stored
    if task is not None:
        if cfg.final or cfg.topk_logits:
            raise ConfigError("--final and --topk_logits are a causal LM's; an encoder's store always keeps its "
                              "class logits (the data is a classification task)")
        model = load_frozen_classifier(cfg.teacher, task["labels"], dtype=compute_dtype, device=device)
        input_device = device
    else:
        model, input_device = load_frozen_teacher(cfg.teacher, tokenizer=tok, dtype=compute_dtype, device=device,
                                                  world_size=dist.world_size, seed=cfg.seed)
    if teacher_dir is not None and not (teacher_dir / "tokenizer_config.json").is_file():
        # No tokenizer to compare: at least its special token ids must be the data's (the vocabulary size was
        # checked when it loaded).
        ids = {name: (getattr(model.config, f"{name}_token_id", None), getattr(tok, f"{name}_token_id"))
               for name in ("bos", "eos")}
        differ = [f"{name} {mine} vs the data's {theirs}" for name, (mine, theirs) in ids.items()
                  if mine is not None and theirs is not None and mine != theirs]
        if differ:
            raise StoreError(f"teacher {teacher_dir} has no tokenizer files, and its config's special tokens differ "
                             f"from the prepared data's tokenizer ({'; '.join(differ)}): not its tokenizer")
        say(f"[cache] note: {teacher_dir} has no tokenizer files; only its vocabulary size and special token ids "
            f"were checked against the prepared data's tokenizer")
    dims = cache.probe_dims(model, cfg.layers, cfg.final, input_device)
    quant = None
    if cfg.quant != "none":
        group = cfg.quant_group if cfg.quant_group >= 0 else default_group(cfg.quant, [d["d"] for d in dims.values()])
        quant = QuantSpec(cfg.quant, group, cfg.rotate, cfg.quant_fit_tokens > 0)
    for layer, d in dims.items() if quant else ():
        if (why := check_spec(quant.kind, quant.group, d["d"], f"layer {layer}")) is not None:
            raise ConfigError(f"--quant {quant.kind} --quant_group {quant.group}: {why}")

    # 2. The plan: what the shards hold and how the work is cut. A rerun must agree with the one on disk.
    content = {
        "teacher_fingerprint": model_fingerprint(teacher_dir or model),
        "tokenizer_fingerprint": data.tokenizer_fingerprint, "data_fingerprint": data.fingerprint,
        "split": cfg.split, "layers": list(cfg.layers) + (["final"] if cfg.final else []), "dtype": cfg.dtype,
        "compute_dtype": str(compute_dtype).removeprefix("torch."), "topk_logits": cfg.topk_logits,
        "lowrank": ({"k": cfg.lowrank_k, "energy": cfg.lowrank_energy, "fit_tokens": cfg.lowrank_fit_tokens,
                     "seed": cfg.seed} if cfg.lowrank_k or cfg.lowrank_energy else None),
        "shard_tokens": cfg.shard_tokens, "batch_tokens": cfg.batch_tokens, "max_batch_size": cfg.max_batch_size,
    }
    if task is not None:
        content["class_logits"] = list(task["labels"])
    if quant:  # only then: an unquantized plan, and so its shards, stay byte for byte what they were
        content["quant"] = {**quant.to_json(), "seed": cfg.seed, "fit_tokens": cfg.quant_fit_tokens}
    info = {"teacher": {"spec": cfg.teacher, "n_layers": model.config.num_hidden_layers,
                        "vocab_size": model.config.vocab_size},
            "data_path": str(Path(cfg.data).resolve()), "dims": dims, "config": config_to_dict(cfg)}
    plan = store_plan.make_plan(content, store_plan.plan_units(dataset.lengths, cfg.shard_tokens), info)

    # 3. The output folder: rank 0 alone judges and prepares it (another rank looking meanwhile could see it half
    #    made), writes the plan first, then the LM head and the low-rank bases.
    n_units = len(plan["units"])
    if dist.is_main:
        state = store_plan.check_output_folder(out, plan)
        pending_at_start = store_plan.pending_units(out, plan) if state == "resume" else list(range(n_units))
        if state != "complete":
            estimate = store_plan.storage_estimate(int(dataset.lengths.sum()), dims, DTYPES[cfg.dtype],
                                                   cfg.topk_logits, quant)
            store_plan.prepare_output_folder(out, plan, int(estimate * len(pending_at_start) / n_units))
            cache.write_side_files(out, plan, model, dataset, final=cfg.final, layers=cfg.layers,
                                   lowrank_k=cfg.lowrank_k, lowrank_energy=cfg.lowrank_energy,
                                   fit_tokens=cfg.lowrank_fit_tokens, seed=cfg.seed, pad_id=tok.pad_token_id,
                                   batch_tokens=cfg.batch_tokens, max_batch_size=cfg.max_batch_size,
                                   device=input_device)
    barrier(dist.world_size)
    if not dist.is_main:
        state = store_plan.check_output_folder(out, plan)
    if state == "complete":
        say(f"[cache] {out} already holds this store, complete; `--verify` checks it")
        destroy_process_group()
        return 0
    lowrank = load_lowrank(out / LOWRANK_FILE, input_device) if content["lowrank"] else {}
    # Shards depend on the side file they were computed with: a rerun recomputes any unit made with another one.
    side = LOWRANK_FILE if content["lowrank"] else QUANT_FILE if quant else None
    side_sha = sha256_file(out / side) if side else None
    params = None
    if quant:
        params = tuple({k: v.to(input_device) for k, v in part.items()} for part in read_quant_params(out / QUANT_FILE))

    # 4. This rank's units; finished ones are verified and kept.
    units = plan["units"]
    mine = list(range(dist.rank, n_units, dist.world_size))
    todo = [u for u in mine if not cache.unit_done(out, u, plan["fingerprint"], side_sha)]
    tokens = lambda us: int(sum(dataset.lengths[units[u][0]:units[u][1]].sum() for u in us))  # noqa: E731
    say(f"[cache] {n_units} units, {len(mine) - len(todo)} of this rank's {len(mine)} already done"
        + (f"; rank 0 of {dist.world_size} shown" if dist.world_size > 1 else ""))
    bar = tqdm(total=tokens(mine), initial=tokens(mine) - tokens(todo), unit="tok", unit_scale=True,
               desc="cache", disable=not (dist.is_main and cfg.progress), dynamic_ncols=True, mininterval=1.0)
    cache.cache_units(model, dataset, out, units, todo, plan_fp=plan["fingerprint"], side_sha=side_sha,
                      writers=cfg.writer_threads or cache.default_writer_threads(), layers=cfg.layers,
                      final=cfg.final, topk=cfg.topk_logits, store_dtype=DTYPES[cfg.dtype], lowrank=lowrank,
                      pad_id=tok.pad_token_id, batch_tokens=cfg.batch_tokens, max_batch_size=cfg.max_batch_size,
                      device=input_device, on_tokens=bar.update, quant=quant, params=params)
    bar.close()

    # 5. The manifest, last: its presence means the store is complete.
    barrier(dist.world_size)
    if dist.is_main:
        wall = time.perf_counter() - t0
        manifest = store_plan.finalize_store(out, plan, config=config_to_dict(cfg), wall_s=wall)
        say("[cache] " + store_plan.summary(manifest, wall, tokens(pending_at_start)))
    destroy_process_group()
    return 0


def verify(out: Path) -> int:
    if not (out / MANIFEST).is_file():
        if (out / PLAN).is_file():
            plan = read_json(out / PLAN)
            left = len(store_plan.pending_units(out, plan))
            raise StoreError(f"{out}: not finished, {left} of {len(plan['units'])} units still to cache; rerun the "
                             f"cache command to resume")
        raise StoreError(f"{out}: no feature store here ({MANIFEST} missing)")
    manifest = read_json(out / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("kind") != "geokd.features" or "shards" not in manifest:
        raise StoreError(f"{out / MANIFEST}: not a feature-store manifest (kind "
                         f"{manifest.get('kind') if isinstance(manifest, dict) else None!r}); it was overwritten: "
                         f"delete it and rerun the cache command to rebuild it from the shards' sidecars")
    problems = verify_files(out, manifest)
    if problems:
        print(f"[cache] {out}: {len(problems)} problem(s):\n  " + "\n  ".join(problems)
              + f"\n[cache] to repair: delete {out / MANIFEST} and rerun the cache command; damaged units are "
              f"recomputed, sound ones kept", file=sys.stderr)
        return 1
    info = FeatureStore(out).verify()  # the index: sample ids unique, shards consistent with the manifest
    print(f"[cache] {out}: OK, {info['shards']} shards, {info['samples']} samples, {info['tokens']} tokens, "
          f"{info['bytes'] / 1e6:.1f} MB verified")
    return 0


def finalize(out: Path) -> int:
    if not (out / PLAN).is_file():
        raise StoreError(f"{out}: no {PLAN}, nothing to finalize")
    plan = read_json(out / PLAN)
    manifest = store_plan.finalize_store(out, plan, config=plan["info"]["config"], wall_s=0.0)
    print("[cache] " + store_plan.summary(manifest, 0.0))
    return 0


def dispatch(cfg: CacheConfig) -> int:
    if cfg.verify:
        return verify(Path(cfg.out))
    if cfg.finalize:
        return finalize(Path(cfg.out))
    return run(cfg)


def main(argv: list[str] | None = None) -> int:
    return stage_main("cache", CacheConfig, dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
