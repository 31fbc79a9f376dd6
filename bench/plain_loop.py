"""The plain-PyTorch reference for bench/train_step.py: geokd's step without DeepSpeed.

Same options as `./run.sh train` (parsed into the same TrainConfig), same model and weights, same batches in
the same order (StepBatchSampler, the same DataLoader), the same objective module (response-only LM head, the
same KD and feature terms), the same warmup-cosine schedule and clipping. What differs is only what a hand-written
loop would do: torch.optim.AdamW(fused=True), clip_grad_norm_, no activation checkpointing, no engine.
Prints `RESULT {json}` like train_step.py's child.
"""
from __future__ import annotations

import functools
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.config import parse_config  # noqa: E402
from pipeline.runtime import pick_device, seed_everything  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.data import StepBatchSampler, make_loader, to_device  # noqa: E402
from pipeline.train.setup import plan_run, warmup_cosine  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.models.teacher import load_frozen_teacher
from pipeline.train.objective import StudentWithHeads  # noqa: E402
from pipeline.train.data import make_collate, make_dataset  # noqa: E402
from pipeline.train.targets import online_targets, stored_targets  # noqa: E402


def main(argv: list[str]) -> None:
    cfg = parse_config(TrainConfig, argv)
    plan = plan_run(cfg)
    device = pick_device(0)
    seed_everything(cfg.seed)
    obj = plan.objective
    teacher = head = None
    if plan.teacher_mode == "online":
        teacher, _ = load_frozen_teacher(cfg.teacher, tokenizer=plan.tokenizer, dtype=torch.float32, device=device,
                                         seed=cfg.seed)
    elif plan.store is not None and obj.kd == "final":
        head = plan.store.lm_head().to(device, torch.float32)
    student = load_model(cfg.student, tokenizer=plan.tokenizer, seed=cfg.seed)
    student.config.use_cache = False
    model = StudentWithHeads(student, obj, plan.teacher_dims).to(device).train()
    train_set = make_dataset(plan.train_tokens, plan.store, obj.store_layers, topk=obj.kd == "topk")
    total = cfg.max_steps
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(round(cfg.warmup_ratio * total))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(warmup_cosine, warmup=warmup, total=total,
                                                                     min_ratio=cfg.min_lr_ratio))
    sampler = StepBatchSampler(len(train_set), micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
                               world_size=1, rank=0, seed=cfg.seed)
    loader = make_loader(train_set, sampler, make_collate(plan.tokenizer.pad_token_id, plan.store is not None),
                         num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor, pin_memory=False,
                         seed=cfg.seed * 1_000_003)
    batches = iter(loader)
    step_s, tokens_per_s = [], []
    for _ in range(total):
        t0 = time.perf_counter()
        tokens = 0
        for _ in range(cfg.grad_accum):
            batch = to_device(next(batches), device)
            targets = None
            if teacher is not None:
                targets = online_targets(teacher, batch["input_ids"], batch["attention_mask"], obj.teacher_layers,
                                         final=obj.uses_kd)
            elif obj.mode == "distill":
                targets = stored_targets(batch, head, obj.teacher_layers)
            loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"], targets)["loss"]
            (loss / cfg.grad_accum).backward()
            tokens += int(batch["attention_mask"].sum())
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step_s.append(time.perf_counter() - t0)
        tokens_per_s.append(tokens / step_s[-1])
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print("RESULT " + json.dumps({"step_s": step_s, "tokens_per_s": tokens_per_s, "peak_bytes": peak,
                                  "device": device.type}))


if __name__ == "__main__":
    main(sys.argv[1:])
