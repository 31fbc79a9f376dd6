"""Eval speed: generation tokens/s batched against one prompt at a time, and ROUGE-L scoring samples/s.

    ./run.sh setup && PYTHONPATH=. .venv/bin/python bench/eval_speed.py [--model DIR] [--samples 32]
        [--new-tokens 64] [--batch-sizes 1 8 16] [--threads N]

Without --model it builds a random OPT (hidden 256, 4 layers, GPT-2 byte-level vocabulary via builtin-gpt2),
the smallest shape whose per-token cost is not pure Python overhead. Prompts are the first --samples records of
Dolly's test set (../shared/data/instruct). Every prompt gets exactly --new-tokens new tokens (EOS suppressed),
so tokens/s compares like with like. Prints a markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.benchmarks import load_benchmark  # noqa: E402
from eval.config import default_data_dir  # noqa: E402
from eval.generate import GenerationSettings, encode_prompts, generate_all, plan_batches  # noqa: E402
from eval.scoring import rouge_l  # noqa: E402


def small_opt():
    from transformers import OPTConfig, OPTForCausalLM

    from pipeline.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin-gpt2")
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=len(tok), hidden_size=256, ffn_dim=1024, num_hidden_layers=4,
                       num_attention_heads=4, word_embed_proj_dim=256, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return OPTForCausalLM(config).eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--data-dir", default=default_data_dir())
    ap.add_argument("--builtin", action="store_true",
                    help="prompts from the built-in test set, and no scoring section (needs no ../shared/data)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        name = args.model
    else:
        model, tok = small_opt()
        name = "random OPT h256 L4 (GPT-2 vocab)"
    if torch.cuda.is_available():  # the protocol's GPU dtype (eval's `auto`)
        model = model.to("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        name += f" on {torch.cuda.get_device_name(0)}, {next(model.parameters()).dtype}"
    n_params = sum(p.numel() for p in model.parameters())
    if args.builtin:
        from eval.benchmarks import Sample
        from pipeline.data.builtin import builtin_split
        from pipeline.data.prompts import render_prompt

        records = builtin_split("test")[: args.samples]
        samples = [Sample(i, render_prompt(r["instruction"], r.get("input", "")), (r["output"],))
                   for i, r in enumerate(records)]
    else:
        samples = list(load_benchmark("dolly", args.data_dir, max_samples=args.samples).samples)
    encoded = encode_prompts(tok, [(s.index, s.prompt) for s in samples], 256)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    prompt_tokens = sum(len(e.ids) for e in encoded)

    print(f"# eval_speed: {name}, {n_params / 1e6:.1f}M params, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"# {len(encoded)} {'built-in' if args.builtin else 'Dolly'} prompts "
          f"({prompt_tokens / len(encoded):.0f} tokens on average), {args.new_tokens} new tokens each "
          f"(EOS suppressed until then)\n")
    print("| mode | batch size | wall s | new tokens/s | vs batch 1 |")
    print("| --- | --- | --- | --- | --- |")
    generate_all(model, tok, plan_batches(encoded[:2], 2), GenerationSettings(max_new_tokens=4), 10)  # warm-up
    for mode, seed in (("sampling (seed 10)", 10), ("greedy", None)):
        base = None
        for bs in args.batch_sizes:
            t = time.perf_counter()
            records = generate_all(model, tok, plan_batches(encoded, bs), settings, seed)
            wall = time.perf_counter() - t
            tps = sum(r["new_tokens"] for r in records) / wall
            base = base or tps
            print(f"| {mode} | {bs} | {wall:.1f} | {tps:.0f} | x{tps / base:.1f} |", flush=True)

    if args.builtin:
        return
    # Scoring: real references against realistic text (the next sample's reference as the "generation").
    print("\n| scoring set | samples | references per sample | samples/s |")
    print("| --- | --- | --- | --- |")
    for set_name in ("dolly", "sinst"):
        samples = load_benchmark(set_name, args.data_dir).samples
        gens = [samples[(i + 1) % len(samples)].references[0] for i in range(len(samples))]
        rouge_l(gens[0], samples[0].references)  # builds the scorer once
        times = []
        for _ in range(3):
            t = time.perf_counter()
            for g, s in zip(gens, samples):
                rouge_l(g, s.references)
            times.append(time.perf_counter() - t)
        refs = statistics.fmean(len(s.references) for s in samples)
        print(f"| {set_name} | {len(samples)} | {refs:.1f} | {len(samples) / min(times):.0f} |", flush=True)


if __name__ == "__main__":
    main()
