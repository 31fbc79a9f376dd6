"""What geokd guarantees when things go wrong: nothing already written is lost or silently replaced, and every
mistake is a message. One test a guarantee, each the reproduction of a failure a user met, asserting the message
and that nothing was lost. (The first line of each docstring is the guarantee.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, clean_env, stage_in_process, stage_process, wait_until


def stage(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return stage_process(name, *args, timeout=timeout, OMP_NUM_THREADS="1")


# A call that stops on a checked input before any model, engine or process group exists: in this process.
refusal = stage_in_process


def sft_args(prepared: Path, out: Path, *extra: str) -> list[str]:
    return ["--mode", "sft", "--data", prepared, "--student", "preset:tiny-student", "--out", out,
            "--micro_batch_size", "4", "--num_workers", "0", "--progress", "false", "--eval_samples", "8", *extra]


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(token: str):
        raise AssertionError(f"{path}: {token} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


def test_a_refused_resume_leaves_the_runs_own_files_untouched(prepared_tiny, tmp_path):
    """A --resume with changed options is refused, and OUT/config.yaml and OUT/ds_config.json keep the run's."""
    out = tmp_path / "run"
    assert stage("train", *sft_args(prepared_tiny, out, "--max_steps", "2")).returncode == 0
    import shutil

    shutil.rmtree(out / "model")
    (out / "manifest.json").unlink()
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "ds_config.json")}
    proc = stage("train", *sft_args(prepared_tiny, out, "--max_steps", "2", "--resume", "--lr", "0.5"))
    assert proc.returncode == 2 and "the run was started with other options" in proc.stderr
    assert "lr: checkpoint 0.0001, now 0.5" in proc.stderr
    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_resume_without_checkpoint_logs_each_step_once(prepared_tiny, tmp_path):
    """--resume with no checkpoint starts over without logging the killed run's steps a second time."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 9.0}\n')  # a run killed at step 1
    proc = stage("train", *sft_args(prepared_tiny, out, "--max_steps", "3", "--resume", "--valid_split", ""))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no checkpoint" in proc.stdout
    steps = [r["step"] for r in strict_json_lines(out / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [1, 2, 3]


def test_a_diverging_run_stops_with_a_message_and_saves_no_model(prepared_tiny, tmp_path):
    """A NaN/inf loss stops training (exit 2, the step named, no model saved); metrics stay strict JSON."""
    out = tmp_path / "run"
    proc = stage("train", *sft_args(prepared_tiny, out, "--max_steps", "6", "--lr", "1e6", "--warmup_steps", "0",
                                    "--grad_clip", "0", "--valid_split", ""))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[train] error:")]
    assert len(lines) == 1 and "the loss is not finite" in lines[0] and "no model saved" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (out / "model").exists() and not (out / "manifest.json").exists()
    assert strict_json_lines(out / "metrics.jsonl")  # parses with NaN/Infinity refused


def test_skipping_nonfinite_batches_is_counted_and_logged_as_strict_json(prepared_tiny, tmp_path):
    """--nonfinite skip keeps going, counts what it skipped, and writes non-finite values as null."""
    out = tmp_path / "run"
    proc = stage("train", *sft_args(prepared_tiny, out, "--max_steps", "4", "--lr", "1e6", "--warmup_steps", "0",
                                    "--grad_clip", "0", "--valid_split", "", "--nonfinite", "skip"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = strict_json_lines(out / "metrics.jsonl")
    assert any(r.get("skipped_nonfinite") for r in rows) and "skipped (--nonfinite skip)" in proc.stdout


@pytest.mark.parametrize("name", ["../../x", "/tmp/anywhere", "a/b", ".hidden", "x..y"])
def test_eval_names_cannot_write_outside_out(name, tmp_path):
    """eval --names becomes a folder under --out: a name that would leave it is refused before anything runs."""
    from eval.config import EvalConfig
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="display name is also a folder name"):
        parse_config(EvalConfig, ["--models", "m", "--names", name, "--out", str(tmp_path / "e")]).check()
    assert not (tmp_path / "e").exists()


def test_the_consolidated_model_is_what_save_pretrained_writes(prepared_tiny, tmp_path):
    """OUT/model holds what save_pretrained of the same model holds (the tied head once, use_cache on), readable by
    others (the usual umask modes, not mkdtemp's 0700)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert stage("train", *sft_args(prepared_tiny, out, "--max_steps", "2", "--valid_split", "")).returncode == 0
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    model.save_pretrained(tmp_path / "resaved")
    keys = lambda d: sorted(safe_open(str(d / "model.safetensors"), "pt").keys())  # noqa: E731
    assert keys(out / "model") == keys(tmp_path / "resaved")
    assert json.loads((out / "model" / "config.json").read_text())["use_cache"] is True
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_prepared_shards_and_feature_shards_have_the_usual_modes(prepared_tiny, tiny_pair, tmp_path):
    """Every file a stage writes is readable by others as a plain open() would make it (0666 less the umask)."""
    store = tmp_path / "store"
    assert stage("cache", "--data", prepared_tiny, "--teacher", tiny_pair.teacher, "--out", store, "--layers", "1",
                 "--final", "--progress", "false").returncode == 0
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in [*prepared_tiny.rglob("*"), *store.rglob("*")] if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    wrong = {str(p): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != 0o666 & ~umask}
    assert not wrong


def test_no_stage_writes_into_a_folder_another_stage_made(prepared_tiny, tiny_pair, tmp_path):
    """train and eval refuse an --out that holds what they did not make (prepared data, a feature store, a user's
    files), and leave it byte for byte as it was."""
    import shutil

    prep = tmp_path / "prep"
    shutil.copytree(prepared_tiny, prep)
    store = tmp_path / "store"
    assert stage("cache", "--data", prep, "--teacher", tiny_pair.teacher, "--out", store, "--layers", "1",
                 "--progress", "false").returncode == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    snapshot = lambda d: {p: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}  # noqa: E731
    for folder in (prep, store, mine):
        before = snapshot(folder)
        proc = refusal("train", *sft_args(prep, folder, "--max_steps", "1"))
        assert proc.returncode == 2 and "holds what train did not make" in proc.stderr, proc.stderr[-1500:]
        proc = refusal("eval", "--models", tiny_pair.student, "--benchmarks", prep / "valid" / "records.jsonl",
                     "--field_map", "output=references", "--max_samples", "1", "--greedy", "--out", folder)
        assert proc.returncode == 2 and "holds what eval did not make" in proc.stderr, proc.stderr[-1500:]
        assert snapshot(folder) == before


def test_eval_follows_minillm_for_long_prompts_and_records_it(tiny_pair, tmp_path):
    """A prompt over 256 tokens keeps its first 256 (MiniLLM's evaluation) unless told otherwise, and
    protocol.json says so, with how prompts are encoded (the tokenizer's start token, as MiniLLM)."""
    from eval.config import EvalConfig
    from eval.runner import evaluate

    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"instruction": "word " * 400, "output": "ok"}) + "\n")
    cfg = EvalConfig(models=[str(tiny_pair.student)], benchmarks=[str(data)], greedy=True, max_new_tokens=2,
                     out=str(tmp_path / "eval"))
    assert cfg.prompt_truncation == "right"
    evaluate(cfg, progress=False)
    protocol = json.loads((tmp_path / "eval" / "protocol.json").read_text())
    assert protocol["prompt_truncation"] == "right" and "MiniLLM" in protocol["prompt_truncation_rule"]
    assert "start token" in protocol["prompt_encoding"]
    row = json.loads((tmp_path / "eval" / "generations" / "student" / "long" / "greedy.jsonl").read_text())
    assert row["prompt_truncated"] > 0 and row["prompt_tokens"] == 256


def test_a_rerun_on_a_truncated_store_names_the_damage_instead_of_saying_complete(prepared_tiny, tiny_pair,
                                                                                   tmp_path):
    """Rerunning cache on a finished store whose shard was truncated is an error naming the shard and the repair."""
    store = tmp_path / "store"
    args = ["--data", prepared_tiny, "--teacher", tiny_pair.teacher, "--out", store, "--layers", "1",
            "--progress", "false"]
    assert stage("cache", *args).returncode == 0
    shard = sorted((store / "shards").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    proc = stage("cache", *args)
    assert proc.returncode == 2 and "damaged files" in proc.stderr and shard.name in proc.stderr
    assert "delete" in proc.stderr and "already holds this store" not in proc.stdout


def test_a_teacher_without_tokenizer_files_is_still_checked_against_the_data(prepared_tiny, tiny_pair, tmp_path):
    """cache with a teacher dir that has no tokenizer: its special token ids must match the data's tokenizer."""
    import shutil

    bare = tmp_path / "bare_teacher"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_pair.teacher / f, bare / f)
    config = json.loads((bare / "config.json").read_text())
    config["eos_token_id"] = config["eos_token_id"] + 5
    (bare / "config.json").write_text(json.dumps(config))
    proc = stage("cache", "--data", prepared_tiny, "--teacher", bare, "--out", tmp_path / "store", "--layers", "1")
    assert proc.returncode == 2 and "no tokenizer files" in proc.stderr and "eos" in proc.stderr
    assert not (tmp_path / "store").exists()


def _ranks_of(out: Path) -> list[int]:
    """Live processes whose command line names `out` (the ranks of a run into it)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if str(out) in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_killing_the_launcher_takes_its_ranks_down_and_a_live_run_holds_its_folder(prepared_tiny, tmp_path):
    """SIGKILL of `train --nproc 2` leaves no rank running; while a run lives, another run into its --out is
    refused naming it; a mistake under --nproc 2 is said once, with exit 2 and no traceback."""
    import signal

    out = tmp_path / "run"
    env = clean_env()
    launcher = subprocess.Popen([sys.executable, "-m", "stages.train", "--nproc", "2",
                                 *map(str, sft_args(prepared_tiny, out, "--max_steps", "100000", "--valid_split", ""))],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_until((out / "metrics.jsonl").exists, 240, every=0.2), "the run did not start"
    second = stage("train", *sft_args(prepared_tiny, out, "--max_steps", "5", "--resume"))
    assert second.returncode == 2 and "in use by a live train run (pid" in second.stderr, second.stderr[-1500:]
    assert len(_ranks_of(out)) >= 2
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert wait_until(lambda: not _ranks_of(out), 30, every=0.2), "ranks outlived their launcher"

    proc = stage("train", "--nproc", "2", *sft_args(prepared_tiny, tmp_path / "other", "--max_steps", "1",
                                                    "--train_split", "nope"))
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "nope" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_checkpoint_another_rank_was_still_writing_is_not_resumed_from(tmp_path):
    """DeepSpeed writes `latest` once rank 0's files are done, before the other ranks' optimizer shards are; a kill
    in between must not leave a checkpoint that --resume picks and rank 1 cannot read (a CI run hit this)."""
    from pipeline.train.checkpointing import COMPLETE_FILE, STATE_FILE, complete_tags, resume_order

    root = tmp_path / "checkpoints"
    for tag, finished in (("step00000003", True), ("step00000006", False)):
        (root / tag).mkdir(parents=True)
        (root / tag / "mp_rank_00_model_states.pt").write_bytes(b"rank 0 done")
        (root / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"half")
        (root / tag / STATE_FILE).write_text(json.dumps({"step": int(tag[4:]), "complete_marker": COMPLETE_FILE}))
        if finished:
            (root / tag / COMPLETE_FILE).write_text("{}")
    (root / "latest").write_text("step00000006")
    order, note = resume_order(root)
    assert order == ["step00000003"] and "names 'step00000006', which is not a complete checkpoint" in note
    legacy = tmp_path / "legacy" / "step00000002"  # written before geokd marked checkpoints: states suffice
    legacy.mkdir(parents=True)
    (legacy / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (legacy / STATE_FILE).write_text(json.dumps({"step": 2}))
    assert complete_tags(legacy.parent) == ["step00000002"]


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_so(prepared_tiny, tmp_path):
    """A dangling `latest` or a truncated newest checkpoint: --resume takes the one before, saying which and why;
    geokd's own checkpoint files are JSON, not pickles."""
    out = tmp_path / "run"
    args = sft_args(prepared_tiny, out, "--max_steps", "6", "--checkpoint_every", "2", "--keep_checkpoints", "0",
                    "--valid_split", "")
    assert stage("train", *args, "--stop_after", "4").returncode == 0
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step*")) == ["step00000002", "step00000004"]
    assert not list(root.rglob("rng-rank*.pt")) and json.loads((root / "step00000004" / "rng-rank0.json").read_text())
    (root / "latest").write_text("step00000009")  # names a checkpoint that is not there
    states = root / "step00000004" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])  # and the newest one is truncated
    proc = stage("train", *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not a complete checkpoint" in proc.stdout and "step00000004 cannot be read" in proc.stdout
    assert "falling back to the previous checkpoint, step00000002" in proc.stdout
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert (out / "model" / "config.json").is_file()


def test_a_flipped_bit_in_a_token_shard_is_caught_by_cache_train_and_verify(prepared_tiny, tmp_path):
    """Prepared token shards are checked against their manifest's sha256 whenever they are opened (cache,
    train), and `prepare --verify` lists every damaged file."""
    import shutil

    prep = tmp_path / "prep"
    shutil.copytree(prepared_tiny, prep)
    assert stage("prepare", "--verify", "--out", prep).returncode == 0
    shard = prep / "train" / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01  # inside the token ids
    shard.write_bytes(bytes(raw))
    for name, args in (("cache", ["--data", prep, "--teacher", "preset:tiny-teacher", "--out", tmp_path / "s",
                                  "--layers", "1"]),
                       ("train", sft_args(prep, tmp_path / "run", "--max_steps", "1"))):
        proc = stage(name, *args)
        assert proc.returncode == 2 and "shard-00001.safetensors: sha256 differs" in proc.stderr, proc.stderr[-999:]
    proc = stage("prepare", "--verify", "--out", prep)
    assert proc.returncode == 2 and "1 of 6 files damaged" in proc.stderr and "shard-00001" in proc.stderr


def test_eval_and_train_refuse_what_is_not_a_usable_causal_lm(prepared_tiny, tiny_pair, tmp_path):
    """A BERT encoder, a vision model, a dir without weights or without a tokenizer: each is a one-line message
    (exit 2) from eval and train, never a traceback or a score."""
    import shutil

    from transformers import BertConfig, BertForMaskedLM, ViTConfig, ViTModel

    bert, vit = tmp_path / "bert", tmp_path / "vit"
    BertForMaskedLM(BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(bert)
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4)).save_pretrained(vit)
    no_tok, no_weights = tmp_path / "no_tokenizer", tmp_path / "no_weights"
    no_tok.mkdir()
    no_weights.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_pair.student / f, no_tok / f)
    shutil.copy(tiny_pair.student / "config.json", no_weights / "config.json")
    bench = prepared_tiny / "valid" / "records.jsonl"
    for model, words in ((bert, "not a causal LM"), (vit, "not a causal LM"), (no_tok, "no tokenizer files")):
        proc = refusal("eval", "--models", model, "--benchmarks", bench, "--field_map", "output=references",
                     "--greedy", "--out", tmp_path / "eval")
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-999:]
    for model, words in ((bert, "not a causal LM"), (no_weights, "no weights")):
        proc = refusal("train", "--mode", "sft", "--data", prepared_tiny, "--student", model, "--out",
                     tmp_path / "run", "--max_steps", "1")
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-999:]


def test_a_misspelt_or_unknown_deepspeed_key_is_named_with_its_nearest_spelling(tmp_path):
    """A ds_config typo (top level, inside zero_optimization or optimizer.params) is an error naming the key and
    what it probably meant, not a pydantic traceback or a silently ignored setting."""
    from pipeline.errors import ConfigError
    from pipeline.train.ds_config import EngineSettings, load_ds_config, resolve_ds_config

    settings = EngineSettings(micro_batch_size=2, grad_accum=1, world_size=1, grad_clip=1.0, lr=1e-4,
                              betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, precision="fp32", hidden_size=64)
    for where, key, meant in ((None, "gradient_clippping", "gradient_clipping"),
                              ("zero_optimization", "reduce_bucket_sise", "reduce_bucket_size"),
                              ("params", "weight_decy", "weight_decay")):
        raw = load_ds_config(ROOT / "ds_configs" / "zero2.json")
        target = raw if where is None else raw[where] if where != "params" else raw["optimizer"]["params"]
        target[key] = 1
        with pytest.raises(ConfigError, match=f"unknown key .*{key}'; did you mean '{meant}'"):
            resolve_ds_config(raw, settings, origin="my.json")


def test_verify_on_an_overwritten_manifest_and_a_full_disk_are_messages(prepared_tiny, tiny_pair, tmp_path):
    """cache --verify on a store whose manifest was overwritten, and prepare on a disk that fills up, each end in
    one line naming the file (exit 2), not a traceback."""
    import resource

    store = tmp_path / "store"
    assert stage("cache", "--data", prepared_tiny, "--teacher", tiny_pair.teacher, "--out", store, "--layers", "1",
                 "--progress", "false").returncode == 0
    (store / "manifest.json").write_text('{"kind": "something else"}')
    proc = stage("cache", "--verify", "--out", store)
    assert proc.returncode == 2 and "not a feature-store manifest" in proc.stderr and "Traceback" not in proc.stderr
    env = clean_env()
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # noqa: E731  (files > 20 kB fail)
    proc = subprocess.run([sys.executable, "-m", "stages.prepare", "--data", "builtin", "--out", str(tmp_path / "p"),
                           "--tokenizer", "builtin-tiny"], cwd=ROOT, env=env, capture_output=True, text=True,
                          preexec_fn=limit, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert "File too large" in proc.stderr or "No space" in proc.stderr


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return path


def test_prepare_reads_valid_jsonl_and_names_the_odd_record(tmp_path):
    """A raw U+2028 inside a string is valid JSONL (prepare and eval agree); a Dolly record among Alpaca ones is
    named by its line, and so is a field that appears twice in one record."""
    ok = [{"instruction": f"Say {i}\u2028now.", "output": f"{i}"} for i in range(5)]
    assert stage("prepare", "--data", _jsonl(tmp_path / "u2028.jsonl", ok), "--out", tmp_path / "a",
                 "--tokenizer", "builtin-tiny").returncode == 0
    mixed = ok[:3] + [{"instruction": "x", "context": "", "response": "y", "category": "qa"}] + ok[3:]
    proc = stage("prepare", "--data", _jsonl(tmp_path / "mixed.jsonl", mixed), "--out", tmp_path / "b",
                 "--tokenizer", "builtin-tiny")
    assert proc.returncode == 2 and "mixed.jsonl:4: a dolly record in a file whose first record" in proc.stderr
    dup = ['{"instruction": "a", "instruction": "b", "output": "c"}']
    proc = stage("prepare", "--data", _jsonl(tmp_path / "dup.jsonl", dup), "--out", tmp_path / "c",
                 "--tokenizer", "builtin-tiny")
    assert proc.returncode == 2 and "dup.jsonl:1: field 'instruction' appears twice" in proc.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_duplicates_are_reported_and_never_straddle_train_and_valid(tmp_path):
    """Repeated records are kept with a warning, and every copy of one lands in the same split."""
    records = [{"instruction": f"Name {i % 7}.", "output": f"{i % 7}"} for i in range(40)]
    out = tmp_path / "p"
    proc = stage("prepare", "--data", _jsonl(tmp_path / "d.jsonl", records), "--out", out, "--tokenizer",
                 "builtin-tiny", "--valid_size", "3")
    assert proc.returncode == 0 and "33 samples repeat an earlier one" in proc.stdout
    from pipeline.data.prepared import PreparedData

    data = PreparedData(out)
    train = {r["prompt"] for r in data.records("train")}
    valid = {r["prompt"] for r in data.records("valid")}
    assert valid and not train & valid


def test_a_refused_valid_size_leaves_no_folder_behind(tmp_path):
    """--valid_size as large as the data is an error, and the --out it would have made does not exist after."""
    records = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(5)]
    proc = stage("prepare", "--data", _jsonl(tmp_path / "d.jsonl", records), "--out", tmp_path / "p",
                 "--tokenizer", "builtin-tiny", "--valid_size", "5")
    assert proc.returncode == 2 and "leaves no training samples" in proc.stderr
    assert not (tmp_path / "p").exists()


def test_eval_names_bad_benchmarks_and_reads_fastchat_sets(tiny_pair, tmp_path):
    """An empty set, invalid UTF-8 or a record without the reference field is one line naming file and line;
    FastChat's two-file Vicuna layout is read by `fastchat:QUESTIONS:ANSWERS`; --fields and --field_map are one
    option in prepare and eval alike."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    wrong = _jsonl(tmp_path / "wrong.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "answer": "b"}])
    for bench, words in ((empty, "empty.jsonl: no records"), (latin, "latin.jsonl:2: not valid UTF-8"),
                         (wrong, "wrong.jsonl:2: record has no field 'output'")):
        proc = refusal("eval", "--models", tiny_pair.student, "--benchmarks", bench, "--greedy", "--out",
                     tmp_path / "e")
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-999:]
    questions = _jsonl(tmp_path / "question.jsonl", [{"question_id": i, "category": "generic",
                                                      "turns": [f"Describe {w}."]} for i, w in enumerate("ab")])
    answers = _jsonl(tmp_path / "answers.jsonl", [{"question_id": i, "choices": [{"index": 0, "turns": [f"{w}!"]}]}
                                                  for i, w in enumerate("ab")])
    proc = refusal("eval", "--models", tiny_pair.student, "--benchmarks", f"fastchat:{questions}:{answers}",
                 "--greedy", "--max_new_tokens", "2", "--out", tmp_path / "fc")
    assert proc.returncode == 0, proc.stderr[-1500:]
    rows = [json.loads(x) for x in (tmp_path / "fc" / "generations" / "student" / "question" / "greedy.jsonl")
            .read_text().splitlines()]
    assert [r["references"] for r in rows] == [["a!"], ["b!"]] and "Describe a." in rows[0]["prompt"]
    from eval.config import EvalConfig
    from pipeline.config import parse_config
    from pipeline.data.config import PrepareConfig

    assert parse_config(EvalConfig, ["--models", "m", "--fields", "output=answer"]).fields() == {"output": "answer"}
    assert parse_config(PrepareConfig, ["--data", "x", "--out", "o", "--field_map", "output=answer"]).fields == [
        "output=answer"]


def test_a_missing_split_and_a_tampered_tokenizer_are_named(prepared_tiny, tmp_path):
    """cache --split of a split that was not prepared, and a prepared tokenizer changed after prepare, are each
    one line (exit 2) naming the folder, never a traceback."""
    import shutil

    proc = refusal("cache", "--data", prepared_tiny, "--teacher", "preset:tiny-teacher", "--split", "test",
                 "--out", tmp_path / "s", "--layers", "1")
    assert proc.returncode == 2 and "no split 'test'" in proc.stderr and "Traceback" not in proc.stderr
    prep = tmp_path / "prep"
    shutil.copytree(prepared_tiny, prep)
    config = json.loads((prep / "tokenizer" / "tokenizer_config.json").read_text())
    config["pad_token"] = config["eos_token"]  # pad was "<pad>": ids change
    (prep / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    proc = refusal("train", *sft_args(prep, tmp_path / "run", "--max_steps", "1"))
    assert proc.returncode == 2 and "does not match the fingerprint in its manifest" in proc.stderr, proc.stderr


def test_resume_refuses_a_checkpoint_others_could_have_written(prepared_tiny, tmp_path):
    """DeepSpeed unpickles checkpoint files: a checkpoint with a world-writable file is refused, naming it, and
    nothing is loaded from it or from an older one."""
    out = tmp_path / "run"
    args = sft_args(prepared_tiny, out, "--max_steps", "4", "--checkpoint_every", "2", "--valid_split", "")
    assert stage("train", *args, "--stop_after", "2").returncode == 0
    states = out / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    states.chmod(0o666)
    proc = stage("train", *args, "--resume")
    assert proc.returncode == 2 and "not safe to load" in proc.stderr and states.name in proc.stderr
    assert "resumed from" not in proc.stdout and not (out / "model").exists()


@pytest.mark.parametrize("args, words", [
    (["--quick", "--methods", "kd", "nonsense"], "--methods 'nonsense': choose sft, kd or kd_<loss>"),
    (["--quick", "--grid", "beta=abc"], "--grid beta=abc: not a number"),
    (["--quick", "--grid", "alpha=0.5,1.5"], "--grid alpha=1.5: --alpha 1.5: must be in [0, 1]"),
    (["--quick", "--grid", "layer_map=1:2+2:9"], "--grid layer_map=1:2+2:9: teacher layer 9 out of range 0..4"),
    (["--seeds", "3", "3"], "--seeds 3 3: a study needs at least two different training seeds"),
    (["--quick", "--student_steps", "0"], "--student_steps must be >= 1"),
])
def test_a_study_checks_every_method_grid_value_and_seed_before_any_work(args, words, tmp_path):
    """study: an unknown method (also beside --quick), a grid value that is not a number or out of range, a layer
    map past the teacher's depth, repeated seeds: one line naming it, exit 2, nothing written."""
    proc = refusal("study", "--out", tmp_path / "study", *args)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "study").exists()


def test_quick_changes_the_studys_defaults_and_keeps_what_the_user_gave():
    """study --quick with --methods/--seeds keeps the user's lists; the other quick defaults still apply; a
    --grid layer map's teacher layers are cached beside the default map's."""
    from stages.study import QUICK, StudyConfig, plan

    cfg = StudyConfig(quick=True, methods=["kd", "kd_fg"], seeds=[4, 5], grid=["layer_map=1:1+2:3"],
                      reference="kd__layer_map1-1_2-3")
    cfg.check()
    points, layers = plan(cfg)
    assert [n for n, _ in points] == ["kd__layer_map1-1_2-3", "kd_fg__layer_map1-1_2-3"] and cfg.seeds == [4, 5]
    assert cfg.student_steps == QUICK["student_steps"] and cfg.sampling_seeds == QUICK["sampling_seeds"]
    assert layers == [1, 2, 3, 4]  # 1 and 3 for the grid's map, 2 and 4 for the default map of tiny models


@pytest.mark.parametrize("args, words", [
    (["--prefetch_factor", "0"], "--prefetch_factor must be >= 1"),
    (["--adam_beta1", "1.5"], "--adam_beta1 1.5: must be in [0, 1)"),
    (["--warmup_steps", "-5"], "--warmup_steps -5"),
    (["--micro_batchsize", "4"], "unknown option '--micro_batchsize' (did you mean --micro_batch_size?)"),
])
def test_train_refuses_bad_optimizer_and_loader_values_and_names_a_misspelt_option(args, words, prepared_tiny,
                                                                                   tmp_path):
    """train: values torch would only refuse with a traceback mid-setup (an Adam beta of 1.5, a prefetch factor
    of 0), a warmup below -1, and a misspelt option: one line, exit 2, nothing written."""
    proc = refusal("train", "--data", prepared_tiny, "--student", "preset:tiny-student", "--out", tmp_path / "r",
                   *args)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("stage, args, words", [
    ("cache", ["--data", "{prep}", "--teacher", "preset:tiny-teacher", "--out", "{tmp}/c", "--layers", "1",
               "--topk_logits", "-2"], "--topk_logits must be >= 0"),
    ("analyze", ["--data", "{prep}", "--teacher", "preset:tiny-teacher", "--out", "{tmp}/a", "--max_tokens", "9"],
     "unknown option '--max_tokens'"),
    ("synthetic", ["--out", "{tmp}/s", "--d_student", "-4"], "--d_student must be >= 1, got -4"),
    ("synthetic", ["--out", "{tmp}/s", "--steps", "0"], "--steps must be >= 1, got 0"),
    ("demo", ["--out", "{tmp}/d", "--student_steps", "0"], "--teacher_steps and --student_steps must be >= 1"),
    ("demo", ["--out", "{tmp}/d", "--micro_batch_size", "0"], "--micro_batch_size must be >= 1"),
])
def test_every_stage_refuses_a_bad_value_before_any_work(stage, args, words, prepared_tiny, tmp_path):
    """The stage walk's findings (cache, analyze, synthetic, demo): a negative top-k, an option another stage has,
    a negative width, zero steps (the demo's train steps would have read 0 as one epoch): one line, exit 2, no
    folder made."""
    args = [a.replace("{prep}", str(prepared_tiny)).replace("{tmp}", str(tmp_path)) for a in args]
    proc = refusal(stage, *args)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert not [p for p in tmp_path.iterdir()]


def test_make_student_checks_the_layers_against_the_config_before_loading_weights(tiny_pair, tmp_path):
    """make-student --layers past the teacher's depth is refused from config.json alone: a teacher folder without
    its weights gets the same one-line message (no load was tried)."""
    config_only = tmp_path / "teacher"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((tiny_pair.teacher / "config.json").read_bytes())
    proc = refusal("make_student", "--teacher", config_only, "--layers", "0,6,40", "--out", tmp_path / "s")
    assert proc.returncode == 2 and "--layers 0,6,40: [6, 40] out of range 0..3" in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()


def test_a_byte_order_mark_is_read_as_one_in_jsonl_json_yaml_and_deepspeed_json(tmp_path):
    """A UTF-8 BOM (Windows tools, GLUE's MRPC files) at the start of JSONL, a JSON array, a YAML config and a
    DeepSpeed JSON is read past, as the BOM it is."""
    from pipeline.config import parse_config
    from pipeline.data.sources import read_file
    from pipeline.io import read_json
    from pipeline.train.config import TrainConfig
    from pipeline.train.ds_config import load_ds_config

    bom = b"\xef\xbb\xbf"
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(bom + b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    array = tmp_path / "a.json"
    array.write_bytes(bom + b'[{"instruction": "a", "output": "b"}]')
    assert [e.references for e in read_file(jsonl).examples] == [["b"], ["d"]]
    assert [e.instruction for e in read_file(array).examples] == ["a"]
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_bytes(bom + b"lr: 0.002\nmode: sft\n")
    assert parse_config(TrainConfig, ["--config", str(yaml_file)]).lr == 0.002
    ds = tmp_path / "ds.json"
    ds.write_bytes(bom + (ROOT / "ds_configs" / "zero2.json").read_bytes())
    assert read_json(ds) == json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    assert load_ds_config(str(ds)) == load_ds_config(str(ROOT / "ds_configs" / "zero2.json"))


def test_eval_reads_self_instruct_sets_and_fastchat_answers_old_and_partial(tiny_pair, tmp_path):
    """eval takes what prepare takes (Self-Instruct's `instances`, one sample each; a BOM), FastChat's older
    answer files ({"question_id", "text"}), and a reference file that covers only some questions: those are
    scored, and it says how many were left out and why."""
    si = tmp_path / "user_oriented.jsonl"
    si.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "u1", "instruction": "Reverse it.", "instances": [
        {"input": "abc", "output": "cba"}, {"input": "xy", "output": "yx"}]}).encode() + b"\n")
    questions = _jsonl(tmp_path / "question.jsonl", [{"question_id": i, "category": "generic",
                                                      "turns": [f"Describe {w}."]} for i, w in enumerate("abc", 1)])
    answers = _jsonl(tmp_path / "gpt35.jsonl", [{"question_id": 1, "text": "a!", "model_id": "gpt-3.5"},
                                                {"question_id": 3, "text": "c!", "model_id": "gpt-3.5"}])
    proc = refusal("eval", "--models", tiny_pair.student, "--benchmarks", si, f"fastchat:{questions}:{answers}",
                   "--greedy", "--max_new_tokens", "2", "--out", tmp_path / "e")
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "question: 1 of 3 questions left out: no reference answer in" in proc.stdout
    gen = tmp_path / "e" / "generations" / "student"
    rows = [json.loads(x) for x in (gen / "user_oriented" / "greedy.jsonl").read_text().splitlines()]
    assert [r["references"] for r in rows] == [["cba"], ["yx"]] and "abc" in rows[0]["prompt"]
    rows = [json.loads(x) for x in (gen / "question" / "greedy.jsonl").read_text().splitlines()]
    assert [r["references"] for r in rows] == [["a!"], ["c!"]]
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())
    assert "question_id 2" in json.dumps(scores)


def test_cache_refuses_a_teacher_with_another_tokenizer_before_loading_it(prepared_tiny, tiny_pair, tmp_path):
    """cache: a teacher whose tokenizer is not the prepared data's is one line naming both and what differs
    (pipeline/data/tokenizer.check_same_tokenizer, as for teacher and student), checked before its weights load."""
    import shutil

    from pipeline.data.tokenizer import load_tokenizer

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    shutil.copy(tiny_pair.teacher / "config.json", teacher / "config.json")  # no weights: a load would fail
    load_tokenizer("builtin-gpt2").save_pretrained(teacher)
    proc = refusal("cache", "--data", prepared_tiny, "--teacher", teacher, "--out", tmp_path / "store", "--layers", "1")
    assert proc.returncode == 2, proc.stderr
    assert "teacher and prepared data tokenizers differ: vocabulary sizes differ" in proc.stderr
    assert str(teacher) in proc.stderr and not (tmp_path / "store").exists()
