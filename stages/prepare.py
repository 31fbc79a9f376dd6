"""prepare: instruction records -> tokenized shards + manifest (the first stage of geokd).

Usage:
    ./run.sh prepare --data builtin --out runs/builtin --tokenizer builtin-tiny --valid_size 200
    ./run.sh prepare --data builtin:test --split test --out runs/builtin_test --tokenizer builtin-tiny
    D=../shared/data/instruct
    ./run.sh prepare --data $D/dolly_train_part1.jsonl $D/dolly_train_part2.jsonl --out runs/dolly \\
        --tokenizer builtin-gpt2 --valid_fraction 0.02
    ./run.sh prepare --data my.jsonl --fields instruction=question output=answer --out runs/mine
    ./run.sh prepare --config prepare.yaml
    ./run.sh prepare --verify --out runs/dolly         check every file against its manifest's sha256
    ./run.sh prepare --task cola --data ../shared/data/glue/cola --tokenizer BERT_DIR --max_len 128 --out runs/cola
    ./run.sh prepare --task classification --data my.jsonl --labels neg,pos --valid_size 500 --out runs/mine

`--data` takes local JSONL/JSON files (Alpaca/MiniLLM, raw Dolly, Self-Instruct, multi-reference outputs, or any
fields through `--fields OURS=THEIRS`), `builtin` / `builtin:test`, or a hub dataset name (online machines only).
The Alpaca prompt is tokenized with the tokenizer given, truncated to `--max_prompt_len` / `--max_len`, and the
response tokens carry the loss. The output folder gets token shards, records, a copy of the tokenizer and a
manifest (written last). Rerunning with the same inputs does nothing; other inputs into the same folder are an
error. A run that was killed is redone from scratch on the next run.

`--task cola|rte|mrpc|classification` prepares classification data for BERT-family encoders instead
(pipeline/data/classification.py): GLUE TSVs or `{"text", "text_pair", "label"}` JSONL; a folder's dev file
becomes split `valid`.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from pipeline.config import config_to_dict, stage_main
from pipeline.data.classification import plan_classification
from pipeline.data.config import CLASSIFICATION_FIELDS, LOCATION_FIELDS, PrepareConfig
from pipeline.data.prepared import (
    MANIFEST_KIND, PreparedData, claim_output_dir, count_duplicates, finish_output_dir, length_stats, split_samples,
    tokenize_examples, write_split,
)
from pipeline.data.sources import parse_field_map, read_source
from pipeline.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from pipeline.errors import DataError, GeokdError
from pipeline.io import sha256_json


def run(config: PrepareConfig) -> Path:
    start = time.time()
    out = Path(config.out)
    if config.verify:
        info = PreparedData(out).verify()
        print(f"[prepare] {out}: OK, {info['files']} files of {info['splits']} split(s) match their sha256")
        return out

    # 1. Read every source and the tokenizer: enough to know what this run would produce.
    cfg = config_to_dict(config)
    if not config.task:  # instruction data's manifest (and fingerprint) are as before classification existed
        cfg = {k: v for k, v in cfg.items() if k not in CLASSIFICATION_FIELDS}
    settings = {k: v for k, v in cfg.items() if k not in LOCATION_FIELDS}
    planned, write = (plan_classification(config, settings, start) if config.task
                      else plan_instructions(config, cfg, settings, start))
    fresh = not out.exists()
    if not claim_output_dir(out, planned):
        print(f"[prepare] {out} is up to date (fingerprint {planned['fingerprint'][:12]}); nothing to do")
        return out
    try:
        manifest = write(out)
    except BaseException:
        # The folder was empty or our own unfinished run (claim_output_dir checked): leave nothing behind.
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for p in out.iterdir():
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink()
        raise
    (print_classification_summary if config.task else print_summary)(out, manifest)
    return out


def plan_instructions(config: PrepareConfig, cfg: dict, settings: dict, start: float
                      ) -> tuple[dict, Callable[[Path], dict]]:
    """Instruction data: the manifest-to-be, and the function that fills the claimed folder."""
    field_map = parse_field_map(config.fields)
    sources = [read_source(spec, field_map, config.hub_split) for spec in config.data]
    examples = [ex for src in sources for ex in src.examples]
    if config.limit:
        examples = examples[: config.limit]
    tok = load_tokenizer(config.tokenizer)
    tok_fp = tokenizer_fingerprint(tok)
    planned = {
        "kind": MANIFEST_KIND,
        "fingerprint": sha256_json({"sources": [s.sha256 for s in sources], "tokenizer": tok_fp,
                                    "settings": settings}),
        "sources": [s.manifest_entry() for s in sources],
        "tokenizer": {"spec": config.tokenizer, "fingerprint": tok_fp, "size": len(tok),
                      "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id},
        "config": cfg,
    }
    return planned, lambda out: write_prepared(config, out, planned, examples, sum(s.records for s in sources), tok,
                                               start)


def write_prepared(config: PrepareConfig, out: Path, planned: dict, examples: list, n_records: int, tok,
                   start: float) -> dict:
    """2. Tokenize, split, write; the manifest goes last."""
    samples, report = tokenize_examples(examples, tok, config.max_prompt_len, config.max_len,
                                        config.prompt_overflow, config.template)
    if not samples:
        raise DataError(f"no samples left out of {len(examples)} examples (dropped: {report['dropped']})")
    report["duplicates"] = count_duplicates(samples)
    if report["duplicates"]:
        print(f"[prepare] warning: {report['duplicates']:,} samples repeat an earlier one (same prompt and "
              f"references); they are kept, and all copies of one land in the same split")
    splits = split_samples(samples, config.valid_fraction, config.valid_size, config.seed, config.split)
    try:
        tok.save_pretrained(out / "tokenizer")
    except Exception as e:  # the tokenizers library reports a full disk as a plain Exception ("... (os error 28)")
        raise GeokdError(f"cannot write {out / 'tokenizer'}: {e}; nothing was left behind") from e
    manifest = dict(planned)
    manifest["splits"] = {name: write_split(out, name, part, config.shard_size) for name, part in splits.items()}
    manifest["counts"] = {"records": n_records, **report,
                          "splits": {name: len(part) for name, part in splits.items()}}
    manifest["stats"] = {name: length_stats(part) for name, part in splits.items()}
    manifest["wall_s"] = round(time.time() - start, 2)
    finish_output_dir(out, manifest)
    return manifest


def print_summary(out: Path, m: dict) -> None:
    c = m["counts"]
    cfg = m["config"]
    print(f"[prepare] {out}: {c['records']:,} records from {len(m['sources'])} source(s) -> {c['examples']:,} "
          f"examples, {c['kept']:,} samples (tokenizer {m['tokenizer']['spec']}, {m['tokenizer']['size']:,} tokens, "
          f"fingerprint {m['tokenizer']['fingerprint'][:12]})")
    for s in m["sources"]:
        print(f"  source {s['spec']}: {s['format']}, {s['records']:,} records, sha256 {s['sha256'][:12]}")
    print(f"  truncated: {c['truncated']['prompt']:,} prompts (to {cfg['max_prompt_len']} tokens, "
          f"{cfg['prompt_overflow']}), {c['truncated']['response']:,} responses (to {cfg['max_len']} in total)")
    print("  dropped: " + (", ".join(f"{n:,} {why}" for why, n in c["dropped"].items() if n) or "none")
          + (f"; {c['duplicates']:,} duplicates kept, each group in one split" if c.get("duplicates") else ""))
    for name, entry in m["splits"].items():
        print(f"  {name}: {entry['samples']:,} samples, {entry['tokens']:,} tokens, {len(entry['shards'])} shard(s)")
        for part, st in m["stats"][name].items():
            print(f"    {part:<8} tokens  min {st['min']:>4}  mean {st['mean']:>6.1f}  median {st['median']:>6.1f}  "
                  f"p95 {st['p95']:>6.1f}  max {st['max']:>4}")
    print(f"  done in {m['wall_s']} s; manifest {out / 'manifest.json'}")


def print_classification_summary(out: Path, m: dict) -> None:
    c, t = m["counts"], m["task"]
    print(f"[prepare] {out}: {c['records']:,} records from {len(m['sources'])} source(s) -> {c['kept']:,} samples; "
          f"task {t['name']} ({'sentence pairs' if t['pair'] else 'single sentences'}, labels "
          f"{', '.join(t['labels'])}; metric {t['metric']}); tokenizer {m['tokenizer']['spec']} "
          f"({m['tokenizer']['size']:,} tokens, fingerprint {m['tokenizer']['fingerprint'][:12]})")
    for s in m["sources"]:
        print(f"  source {s['spec']}: {s['format']}, {s['records']:,} records, sha256 {s['sha256'][:12]}")
    print(f"  truncated: {c['truncated']:,} samples (to {m['config']['max_len']} tokens, longest first)"
          + (f"; {c['duplicates']:,} repeat an earlier text (kept)" if c["duplicates"] else ""))
    for name, entry in m["splits"].items():
        labels = ", ".join(f"{k} {v:,}" for k, v in c["labels"][name].items())
        st = m["stats"][name]["total"]
        print(f"  {name}: {entry['samples']:,} samples ({labels}), {entry['tokens']:,} tokens, "
              f"{len(entry['shards'])} shard(s)")
        print(f"    tokens  min {st['min']:>4}  mean {st['mean']:>6.1f}  median {st['median']:>6.1f}  "
              f"p95 {st['p95']:>6.1f}  max {st['max']:>4}")
    print(f"  done in {m['wall_s']} s; manifest {out / 'manifest.json'}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("prepare", PrepareConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
