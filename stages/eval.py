"""Stage `eval`: score causal LMs on instruction following with ROUGE-L (MiniLLM's protocol, DESIGN section 3).

Usage:
    ./run.sh eval --models DIR [DIR ...] [options]          (same as: python -m stages.eval ...)
    ./run.sh eval --config eval.yaml [--field value ...]    YAML supplies defaults, flags override

Common options:
    --names teacher student   display names of the models, in order (default: distinct path suffixes)
    --benchmarks dolly self_inst vicuna sinst uinst   registry names (default: all five), paths to .jsonl files,
                                                      or hub:NAME[:SPLIT] (needs the hub, or its local cache)
    --data-dir DIR          folder of the registry's files (default ../shared/data/instruct, or
                            $GEOKD_SHARED_DATA/data/instruct)
    --field-map output=answer instruction=question    field names of a JSONL/hub set, when not the standard
                            prompt / instruction / input / output
    --max-samples N         only the first N records of each set (0 = all)
    --seeds 10 20 30 40 50  one sampled generation pass per seed;  --greedy  one greedy pass instead
    --out DIR               outputs (default runs/eval); a rerun skips the passes already written there
    --batch-size 8  --dtype auto|fp32|bf16|fp16  --tokenizer DIR (when a model dir has none)
    --max-prompt-length 256 --max-length 512 --max-new-tokens 0 (0 = max_length - max_prompt_length)
    --prompt-truncation right|left   right (default) keeps the first tokens, as MiniLLM; left keeps the end

Classifiers (GLUE): ./run.sh eval --data PREPARED --models DIR [DIR ...] [--split valid] scores encoder
classifiers on a split of data prepared with --task, with the task's metric (eval/classify.py).

Several ranks: torchrun --nproc_per_node K -m stages.eval --models DIR ...  (each rank generates a slice; rank 0
gathers in order, scores and writes). Outputs in --out: scores.json, scores.md, scores.png (bar chart),
tensorboard/<model>/, generations/<model>/<set>/seed<N>.jsonl. Options: eval/config.py; the work: eval/runner.py.

From Python: `from eval import EvalConfig, evaluate; evaluate(EvalConfig(models=[...], max_samples=20))`.
"""
from __future__ import annotations

import sys
import time

from eval.config import EvalConfig
from eval.report import markdown_table
from eval.runner import evaluate
from pipeline.config import stage_main
from pipeline.errors import ConfigError
from pipeline.runtime import dist_info


def run(config: EvalConfig) -> None:
    start = time.time()
    if config.data:  # classifiers on a prepared classification task (GLUE): the task's metric, no generation
        from eval.classify import score_classifiers
        from eval.runner import model_names

        if not config.models:
            raise ConfigError("--models: give at least one classifier directory")
        scores = score_classifiers(config.models, config.names or model_names(config.models), config.data,
                                   config.split, config.out, config.batch_size)
        print(f"[eval] wrote {config.out}/scores.json, scores.md ({len(scores['results'])} model(s)) in "
              f"{time.time() - start:.1f}s")
        return
    scores = evaluate(config)
    if dist_info().is_main:
        print(markdown_table({m: scores["results"][m] for m in scores["results"]}), end="")
        print(f"[eval] wrote {config.out}/scores.json, scores.md in {time.time() - start:.1f}s")


def main(argv: list[str] | None = None) -> int:
    return stage_main("eval", EvalConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
