"""The real-setting recipes in configs/ parse into their stages' configs, and run end to end on random-weight
models of the same architectures (same depth and layer indices, tiny widths)."""
import json
from pathlib import Path

import pytest
from transformers import OPTConfig, OPTForCausalLM

from pipeline.config import parse_config
from helpers import ROOT, stage_ok
from pipeline.data.tokenizer import load_tokenizer

RECIPES = sorted(p for p in (ROOT / "configs").iterdir() if p.is_dir())


def stage_config(name: str):
    from eval.config import EvalConfig
    from pipeline.train.config import TrainConfig
    from pipeline.data.config import PrepareConfig
    from pipeline.features.config import CacheConfig

    if name.startswith("prepare"):
        return PrepareConfig
    if name.startswith("cache"):
        return CacheConfig
    if name.startswith("eval"):
        return EvalConfig
    return TrainConfig


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_file_parses(recipe):
    names = sorted(p.stem for p in recipe.glob("*.yaml"))
    assert names == ["cache", "cache_valid", "eval", "prepare", "teacher_sft", "train"]
    for path in recipe.glob("*.yaml"):
        cfg = parse_config(stage_config(path.stem), ["--config", str(path)])
        if path.stem == "train":
            assert cfg.mode == "distill" and cfg.features and Path(ROOT, cfg.ds_config).is_file()
        if path.stem == "teacher_sft":
            assert Path(ROOT, cfg.ds_config).is_file()


def tiny_like(num_layers: int, hidden: int, tok, path: Path) -> str:
    """An OPT with the real model's depth (so the recipe's layer indices hold) at a tiny width."""
    config = OPTConfig(vocab_size=len(tok), hidden_size=hidden, word_embed_proj_dim=hidden,
                       num_hidden_layers=num_layers,
                       num_attention_heads=2, ffn_dim=2 * hidden, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    OPTForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run(args: list[str]) -> None:
    stage_ok(args[0].removeprefix("stages."), *args[1:])


def test_opt1_3b_to_125m_recipe_runs_on_same_depth_tiny_models(tmp_path):
    recipe = ROOT / "configs" / "opt1.3b-to-125m"
    tok = load_tokenizer("builtin-tiny")  # a small vocabulary keeps the LM head cheap; the recipe reads it from the dir
    teacher0 = tiny_like(24, 16, tok, tmp_path / "opt1.3b-shape")
    student0 = tiny_like(12, 16, tok, tmp_path / "opt125m-shape")
    records = tmp_path / "dolly.jsonl"
    with open(records, "w") as f:
        for i in range(24):
            f.write(json.dumps({"instruction": f"Say the number {i}.", "context": "", "response": f"It is {i}.",
                                "category": "open_qa"}) + "\n")
    r = tmp_path / "run"
    # Only locations, step counts and (on this CPU) precision differ from the recipe.
    cpu = ["--precision", "fp32", "--ds_config", "ds_configs/cpu.json", "--max_steps", "1", "--micro_batch_size", "4",
           "--num_workers", "0", "--progress", "false", "--eval_every", "0"]
    run(["stages.prepare", "--config", str(recipe / "prepare.yaml"), "--data", str(records), "--out", str(r / "data"),
         "--tokenizer", teacher0, "--valid_size", "4"])
    run(["stages.train", "--config", str(recipe / "teacher_sft.yaml"), "--data", str(r / "data"),
         "--student", teacher0, "--out", str(r / "teacher"), *cpu])
    for name, split in (("cache", "train"), ("cache_valid", "valid")):
        run(["stages.cache", "--config", str(recipe / f"{name}.yaml"), "--data", str(r / "data"),
             "--teacher", str(r / "teacher" / "model"), "--out", str(r / "features" / split), "--progress", "false"])
    run(["stages.train", "--config", str(recipe / "train.yaml"), "--data", str(r / "data"), "--student", student0,
         "--teacher", str(r / "teacher" / "model"), "--features", str(r / "features" / "train"),
         "--valid_features", str(r / "features" / "valid"), "--out", str(r / "student"), *cpu])
    metrics = [json.loads(line) for line in open(r / "student" / "metrics.jsonl")]
    valid = [m for m in metrics if m["split"] == "valid"][-1]
    assert {"D_P/s6_t12", "D_P/s12_t24"} <= set(valid)  # the recipe's layer map, measured on validation
    run(["stages.eval", "--config", str(recipe / "eval.yaml"), "--models", str(r / "student" / "model"),
         "--benchmarks", str(r / "data" / "valid" / "records.jsonl"), "--field_map", "output=references",
         "--max_samples", "3", "--greedy", "--max_new_tokens", "4",
         "--dtype", "float32", "--out", str(r / "eval")])
    assert json.loads((r / "eval" / "scores.json").read_text())
