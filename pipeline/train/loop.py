"""The pieces of a training run after `setup`: resume, the optimizer-step loop, validation, logs, the outputs.

stages/train.py strings them together: `resume` -> `train_steps` -> `validate` -> `finish`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.config import config_to_dict, save_config
from pipeline.errors import ConfigError, TrainingDiverged
from pipeline.io import atomic_path, write_json_atomic
from pipeline.models import model_fingerprint
from pipeline.train import checkpointing as ckpt
from pipeline.train.config import RESUME_FREE_FIELDS
from pipeline.train.ds_config import global_batch
from pipeline.train.data import StepBatchSampler, eval_batches, make_loader, to_device
from pipeline.train.objective import feature_distances
from pipeline.train.setup import Run
from pipeline.train.targets import TeacherTargets, online_targets, stored_targets

_KIND = "geokd.train"


@dataclass
class DataPosition:
    """Where a run is: saved in every checkpoint (as a plain dict) so a resumed run reads the same samples next."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0


class Logger:
    """TensorBoard + metrics.jsonl on rank 0; a no-op elsewhere."""

    def __init__(self, run: Run, start_step: int) -> None:
        self.on = run.dist.is_main
        self.path = run.out / "metrics.jsonl"
        self.tb = None
        if not self.on:
            return
        from torch.utils.tensorboard import SummaryWriter

        # Drop what a killed run logged after its last checkpoint (all of it when none was written: a --resume
        # that starts from step 0 must not log its steps twice).
        if self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in keep))
        self.tb = SummaryWriter(str(run.out / "tb"), purge_step=start_step + 1)

    def log(self, split: str, step: int, values: dict[str, float]) -> None:
        if not self.on:
            return
        for k, v in values.items():
            self.tb.add_scalar(f"{split}/{k}", v, step)
        # Strict JSON: a non-finite value is written as null and named under "nonfinite".
        bad = sorted(k for k, v in values.items() if not math.isfinite(v))
        record = {"split": split, "step": step, **{k: (v if k not in bad else None) for k, v in values.items()}}
        if bad:
            record["nonfinite"] = bad
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _reduce_mean(values: dict[str, float], count: float, world: int, device: torch.device) -> dict[str, float]:
    """Sum `values` and `count` over ranks; return the sums divided by the total count."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys] + [count], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(t)
    n = max(float(t[-1]), 1.0)
    return {k: float(t[i]) / n for i, k in enumerate(keys)}


def _all_sum(x: float, world: int, device: torch.device) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t[0])


def _targets(run: Run, batch: dict[str, Any], layers: list[int], valid: bool = False) -> TeacherTargets | None:
    obj = run.objective
    if obj.mode == "sft":
        return None
    if run.teacher is not None:
        return online_targets(run.teacher, batch["input_ids"], batch["attention_mask"], layers,
                              final=obj.uses_kd and not obj.classifier, token_type_ids=batch.get("token_type_ids"))
    if valid and run.valid_store is None:
        return None
    return stored_targets(batch, run.head, layers)


def _any_nonfinite(loss: torch.Tensor, run: Run) -> bool:
    """True on every rank when the loss is NaN/inf on any (ranks must agree, or a collective would hang)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()) else 1.0], device=run.device)
    if run.dist.world_size > 1:
        torch.distributed.all_reduce(bad)
    return bool(bad.item())


def _diverged(run: Run, step: int, terms: dict[str, Any]) -> TrainingDiverged:
    parts = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in terms.items() if k != "hidden")
    newest = ckpt.latest_tag(run.out / "checkpoints")
    return TrainingDiverged(
        f"step {step}: the loss is not finite ({parts}); stopped before updating the weights, no model saved. "
        + (f"The newest checkpoint is {run.out / 'checkpoints' / newest} (it may already hold diverging weights). "
           if newest else "")
        + "Lower --lr, raise --warmup_steps or --grad_clip, and rerun (or --nonfinite skip to skip such batches)")


def _grad_norm(run: Run) -> float | None:
    norm = run.engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    if run.stage == 0:  # DeepSpeed does not keep the norm it clips with at stage 0: the grads are whole here
        grads = [p.grad for p in run.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads))
    return None


def resume(run: Run) -> DataPosition:
    """With --resume, load the newest checkpoint and return its data position; else the start of the run."""
    cfg, dist = run.cfg, run.dist
    state = DataPosition()
    root = run.out / "checkpoints"
    if cfg.resume and ckpt.complete_tags(root):
        # Checked from the JSON state before DeepSpeed reads anything: a refused resume loads nothing.
        newest = ckpt.resume_order(root)[0][0]
        saved = ckpt.saved_state(root / newest)
        if saved is not None:
            _check_resumable(run, saved, root / newest)
        if run.elastic is not None:
            tag, client = load_elastic(run, root)
        else:
            tag, client = ckpt.load_checkpoint(run.engine, root, dist)
        _check_resumable(run, client, root / tag)
        state = DataPosition(**client["data_position"])
        if dist.is_main:
            print(f"[train] resumed from {root / tag} at step {state.global_step} (epoch {state.epoch}, "
                  f"step {state.step_in_epoch} of {run.steps_per_epoch})")
    elif cfg.resume and dist.is_main:
        print(f"[train] --resume: no checkpoint in {root}, starting from the beginning")
    return state


def load_elastic(run: Run, root: Path) -> tuple[str, dict[str, Any]]:
    """Load the checkpoint of another number of ranks: its universal conversion when ZeRO partitioned it.
    Each rank's dropout RNG belongs to a rank of the old run, so none is restored."""
    el = run.elastic
    folder = root / ckpt.UNIVERSAL if el.universal else root
    ckpt.check_written_by_us(folder / el.tag)  # what DeepSpeed unpickles (the conversion checked its source)
    client = ckpt.load_tag(run.engine, folder, el.tag)
    if run.dist.is_main:
        print(f"[train] {el.from_ranks} -> {el.to_ranks} ranks: the RNG states are per rank, so dropout draws will "
              f"differ from an uninterrupted run")
    return el.tag, client


def write_run_files(run: Run) -> None:
    """OUT/config.yaml and OUT/ds_config.json: written after --resume is accepted, so a refused resume leaves
    the run's own record of its options untouched."""
    if run.dist.is_main:
        save_config(run.cfg, run.out / "config.yaml")
        write_json_atomic(run.out / "ds_config.json", run.ds_config)


def _check_resumable(run: Run, client: dict[str, Any], where: Path) -> None:
    ckpt.check_resume_config(client["config"], config_to_dict(run.cfg), RESUME_FREE_FIELDS, where)
    old = client["config"]
    saved_batch = global_batch(old["micro_batch_size"], old["grad_accum"], client["world_size"])
    if saved_batch != run.cfg.global_batch(run.dist.world_size):
        raise ConfigError(f"--resume from {where}: the run's global batch is {saved_batch} samples "
                          f"({client['world_size']} ranks x micro-batch {old['micro_batch_size']} x grad_accum "
                          f"{old['grad_accum']}), this one's {run.cfg.global_batch(run.dist.world_size)}; keep "
                          f"grad_accum x ranks as it was")
    if client["world_size"] != run.dist.world_size and run.elastic is None:
        raise ConfigError(f"{where} was written by {client['world_size']} ranks, this run has {run.dist.world_size} "
                          f"(the newest checkpoint could not be read and an older one is of another size); rerun "
                          f"--resume, which plans for the number of ranks of the checkpoint it starts from")


def stop_step(run: Run, state: DataPosition) -> int:
    """The step this invocation ends at: the run's end, or --stop_after steps from here."""
    if not run.cfg.stop_after:
        return run.total_steps
    return min(run.total_steps, state.global_step + run.cfg.stop_after)


def train_steps(run: Run, logger: Logger, state: DataPosition, stop_at: int) -> None:
    """Optimizer steps until `stop_at`, with checkpoints and validation on schedule."""
    cfg, eng, obj = run.cfg, run.engine, run.objective
    layers = obj.teacher_layers
    bar = tqdm(total=run.total_steps, initial=state.global_step, desc=f"train[{cfg.mode}]", dynamic_ncols=True,
               disable=not (run.dist.is_main and cfg.progress), mininterval=1.0)
    eng.train()
    while state.global_step < stop_at:
        if state.step_in_epoch >= run.steps_per_epoch:
            state.epoch += 1
            state.step_in_epoch = 0
        sampler = StepBatchSampler(len(run.train_set), micro_batch_size=cfg.micro_batch_size,
                                   grad_accum=cfg.grad_accum, world_size=run.dist.world_size, rank=run.dist.rank,
                                   seed=cfg.seed, epoch=state.epoch, start_step=state.step_in_epoch)
        loader = make_loader(run.train_set, sampler, run.collate, num_workers=cfg.num_workers,
                             prefetch_factor=cfg.prefetch_factor, pin_memory=run.device.type == "cuda",
                             seed=cfg.seed * 1_000_003 + state.epoch)
        batches = iter(loader)
        while state.global_step < stop_at and state.step_in_epoch < run.steps_per_epoch:
            t0 = time.perf_counter()
            lr = eng.get_lr()[0]
            sums: dict[str, float] = {}
            tokens = 0
            grad_norm = None
            logged = (state.global_step + 1) % cfg.log_every == 0 or state.global_step + 1 == stop_at
            skipped = 0
            for micro in range(cfg.grad_accum):
                batch = to_device(next(batches), run.device)
                terms = eng(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"], teacher=_targets(run, batch, layers),
                            token_type_ids=batch.get("token_type_ids"))
                if _any_nonfinite(terms["loss"], run):
                    if cfg.nonfinite == "stop":
                        raise _diverged(run, state.global_step + 1, terms)
                    skipped += 1  # no backward: this micro-batch adds no gradient
                    eng.step()
                    continue
                eng.backward(terms["loss"])
                if micro == cfg.grad_accum - 1 and run.stage == 0 and logged:
                    grad_norm = _grad_norm(run)  # before the step zeroes the gradients
                eng.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                tokens += int(batch["attention_mask"].sum())
            if skipped:
                state_skipped = _all_sum(float(skipped), run.dist.world_size, run.device)
                if run.dist.is_main:
                    print(f"[train] step {state.global_step + 1}: {skipped} micro-batch(es) with a non-finite loss "
                          f"skipped (--nonfinite skip)")
            if grad_norm is None and logged:
                grad_norm = _grad_norm(run)
            all_tokens = _all_sum(float(tokens), run.dist.world_size, run.device)
            state.global_step += 1
            state.step_in_epoch += 1
            state.tokens += int(all_tokens)  # over all ranks, so the count does not depend on how many there are
            step = state.global_step
            values = _reduce_mean(sums, max(cfg.grad_accum - skipped, 1), run.dist.world_size, run.device)
            if skipped:
                values["skipped_nonfinite"] = state_skipped
                values.setdefault("loss", math.nan)  # every micro-batch skipped: logged as null
            if step % cfg.log_every == 0 or step == stop_at:
                values["lr"] = lr
                if grad_norm is not None:
                    values["grad_norm"] = grad_norm
                step_s = time.perf_counter() - t0
                values["step_s"] = step_s
                values["tokens_per_s"] = all_tokens / max(step_s, 1e-9)
                logger.log("train", step, values)
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < run.total_steps:
                logger.log("valid", step, validate(run))
                eng.train()
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == stop_at:
                save(run, state)
        del batches, loader
    bar.close()


def save(run: Run, state: DataPosition) -> None:
    client = {"data_position": asdict(state), "world_size": run.dist.world_size, "zero_stage": run.stage,
              "config": config_to_dict(run.cfg)}
    ckpt.save_checkpoint(run.engine, run.out / "checkpoints", state.global_step, client, run.dist,
                         run.cfg.keep_checkpoints)


@torch.no_grad()
def validate(run: Run) -> dict[str, float]:
    """Mean loss terms over validation micro-batches, and D_P / D_FG / D_CKA of each mapped layer pair when the
    teacher's validation features are at hand (online teacher, or --valid_features)."""
    if run.valid_set is None:
        return {}
    cfg, eng, obj = run.cfg, run.engine, run.objective
    pairs, layers = list(obj.pairs), obj.mapped_layers
    eng.eval()
    sums: dict[str, float] = {}
    count = 0.0
    for positions, counts in eval_batches(len(run.valid_set), cfg.micro_batch_size, run.dist.world_size,
                                          run.dist.rank, cfg.eval_samples):
        batch = to_device(run.valid_collate([run.valid_set[p] for p in positions]), run.device)
        teacher = _targets(run, batch, layers, valid=True)
        out = eng(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                  teacher=teacher, return_hidden=True, ce_only=teacher is None,
                  token_type_ids=batch.get("token_type_ids"))
        values = {k: float(v) for k, v in out.items() if k != "hidden"}
        if teacher is not None and pairs:
            dists = feature_distances(out["hidden"], teacher.layers, batch["attention_mask"], pairs)
            values.update({k: float(v) for k, v in dists.items()})
        if counts:
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    return _reduce_mean(sums, count, run.dist.world_size, run.device)


def finish(run: Run, state: DataPosition, final_valid: dict[str, float], started: float) -> dict[str, Any]:
    """Consolidate the student into OUT/model and write the run's manifest; return the summary.
    `started`: time.perf_counter() when this invocation's training began."""
    cfg, dist = run.cfg, run.dist
    model_dir = run.out / "model"
    ckpt.save_consolidated(run.engine, run.stage, dist, run.tokenizer, model_dir)
    summary: dict[str, Any] = {"steps": state.global_step, "total_steps": run.total_steps, "finished": True,
                               "valid": final_valid, "wall_s": time.perf_counter() - started}
    if dist.is_main:
        manifest = {"kind": _KIND, "mode": cfg.mode, "inputs": run.inputs, "config": config_to_dict(cfg),
                    "world_size": dist.world_size, "zero_stage": run.stage, "tokens": state.tokens,
                    "objective": {"pairs": [list(p) for p in run.objective.pairs],
                                  "weights": list(run.objective.weights), "kd": run.objective.kd,
                                  "loss": run.objective.loss},
                    "final_valid": final_valid, "model": {"dir": "model", "fingerprint": model_fingerprint(model_dir)},
                    **summary}
        write_json_atomic(run.out / "manifest.json", manifest)
    return summary


def read_metrics(out: str | Path, split: str = "train") -> dict[int, dict[str, float]]:
    """metrics.jsonl of a run as {step: values} (the last record of a step wins)."""
    rows: dict[int, dict[str, float]] = {}
    for line in Path(out, "metrics.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.pop("split") == split:
                rows[int(rec.pop("step"))] = rec
    return rows
