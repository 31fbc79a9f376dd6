"""TRL's GKDTrainer as a contender for bench/train_step.py (when `trl` is installed; it is not a geokd dependency).

The run a user would pick instead of geokd's online-teacher KD: the same student and teacher, the same prepared
samples and micro-batch size, the same prompt-masked labels (geokd's own collate), forward KL (beta = 0) on the
teacher's full logits, no on-policy generation (lmbda = 0), no sequence KD, AdamW at the same learning rate.
Its Trainer shuffles the samples itself. Step time: wall time between Trainer's step callbacks (data, forward of
both models, backward, optimizer). Prints `RESULT {json}` like the other children.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.config import parse_config  # noqa: E402
from pipeline.data.prepared import PreparedData, collate_batch  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402


def main(argv: list[str]) -> None:
    import datasets
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    cfg = parse_config(TrainConfig, argv)
    data = PreparedData(cfg.data)
    tok = data.tokenizer()
    split = data.split(cfg.train_split)
    rows = [split[i] for i in range(len(split))]
    dataset = datasets.Dataset.from_list([{"input_ids": r["input_ids"].tolist(), "prompt_len": r["prompt_len"],
                                           "sample_id": r["sample_id"]} for r in rows])

    def collate(items: list[dict]) -> dict:
        batch = collate_batch([{**x, "input_ids": torch.tensor(x["input_ids"])} for x in items], tok.pad_token_id)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t0)

    student = load_model(cfg.student, tokenizer=tok, seed=cfg.seed)
    teacher = load_model(cfg.teacher, tokenizer=tok, seed=cfg.seed)
    args = GKDConfig(output_dir=cfg.out, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.micro_batch_size,
                     gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lmbda=0.0, beta=0.0,
                     seq_kd=False, temperature=cfg.kd_temperature, max_grad_norm=cfg.grad_clip, report_to=[],
                     save_strategy="no", logging_steps=10**9, dataloader_num_workers=cfg.num_workers,
                     use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), seed=cfg.seed,
                     disable_tqdm=True, max_length=None)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, data_collator=collate,
                         train_dataset=dataset, processing_class=tok, callbacks=[StepTimes()])
    trainer.train()
    tokens = [0.0] * len(times)  # tokens/s is not comparable (Trainer shuffles its own batches)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print("RESULT " + json.dumps({"step_s": times, "tokens_per_s": tokens, "peak_bytes": peak,
                                  "device": "cuda" if torch.cuda.is_available() else "cpu"}))


if __name__ == "__main__":
    main(sys.argv[1:])
