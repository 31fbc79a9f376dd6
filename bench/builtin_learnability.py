"""Does a tiny OPT learn the built-in dataset in minutes on a CPU, and does ROUGE-L tell it from a poor model?

Prepares `builtin` (train) and `builtin:test` with the builtin-tiny tokenizer, trains a preset with plain torch
AdamW for a fixed wall-clock budget (no DeepSpeed: this measures the data, not the trainer), and scores greedy
answers on the first N test prompts with rouge_score's ROUGE-L F (stemmed, x100), before and after training.

    .venv/bin/python bench/builtin_learnability.py --minutes 3 --n-test 100
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from rouge_score import rouge_scorer

from pipeline.data.config import PrepareConfig
from pipeline.data.prepared import PreparedData, collate_batch
from pipeline.models import load_model
from stages.prepare import run


@torch.no_grad()
def rouge_l(model, tok, records, max_new_tokens=48) -> float:
    model.eval()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = []
    for rec in records:
        enc = tok(rec["prompt"], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        scores.append(max(scorer.score(ref, answer)["rougeL"].fmeasure for ref in rec["references"]) * 100)
    model.train()
    return float(np.mean(scores))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny-teacher")
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        train = PreparedData(run(PrepareConfig(data=["builtin"], out=f"{tmp}/train", tokenizer="builtin-tiny")))
        test = PreparedData(run(PrepareConfig(data=["builtin:test"], out=f"{tmp}/test", tokenizer="builtin-tiny",
                                              split="test")))
        tok = train.tokenizer()
        records = test.records("test")[: args.n_test]
        model = load_model(f"preset:{args.preset}", tokenizer=tok)
        print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{torch.get_num_threads()} torch threads")
        print(f"ROUGE-L before training: {rouge_l(model, tok, records):.1f}")
        ds = train.split("train")
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        start, step, losses = time.time(), 0, []
        rng = np.random.default_rng(0)
        while time.time() - start < args.minutes * 60:
            batch = collate_batch([ds[int(i)] for i in rng.integers(0, len(ds), args.batch)], tok.pad_token_id)
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 200 == 0:
                print(f"  step {step}  loss {np.mean(losses[-50:]):.3f}  {time.time() - start:.0f} s")
        print(f"trained {step} steps ({step * args.batch / len(ds):.1f} epochs) in {time.time() - start:.0f} s, "
              f"final loss {np.mean(losses[-50:]):.3f}")
        print(f"ROUGE-L after training:  {rouge_l(model, tok, records):.1f}")


if __name__ == "__main__":
    main()
