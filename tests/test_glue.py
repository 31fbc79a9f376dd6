"""BERT-family encoders on a classification task through every stage, with a tiny random BERT on GLUE-shaped
files: fine-tune a teacher (sft), cut a student, cache token features and class logits, distil under ZeRO 0 and 3
with equal losses, score with the task's metric; and one clear line for each mismatch of model and data."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from helpers import stage_in_process, stage_ok, stage_process

WORDS = "the a cat dog sat ran on mat big small is was not and it he she red old new".split()


def write_cola(path: Path, n: int, seed: int) -> None:
    """CoLA's layout (source, label, annotation, sentence; no header); label 1 when the sentence has "cat"."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        label = int("cat" in words)
        rows.append(f"src{i % 3}\t{label}\t{'' if label else '*'}\t{' '.join(words)}")
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def glue(tmp_path_factory) -> dict[str, Path]:
    """A tiny base BERT (4 layers, width 32) with a WordPiece tokenizer, CoLA-shaped data prepared with it, a
    teacher fine-tuned from it (sft), a 2-layer student cut from the teacher, and the teacher's stores."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("glue")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    (root / "cola").mkdir()
    write_cola(root / "cola" / "train.tsv", 128, 0)
    write_cola(root / "cola" / "dev.tsv", 48, 1)
    data = root / "data"
    stage_ok("prepare", "--task", "cola", "--data", root / "cola", "--tokenizer", root / "base", "--out", data)
    stage_ok("train", "--mode", "sft", "--data", data, "--student", root / "base", "--out", root / "teacher",
             "--max_steps", "24", "--micro_batch_size", "16", "--lr", "3e-3", "--progress", "false")
    teacher = root / "teacher" / "model"
    stage_ok("make_student", "--teacher", teacher, "--layers", "1,3", "--out", root / "student")
    stores = {}
    for split in ("train", "valid"):
        stores[split] = root / f"features_{split}"
        stage_ok("cache", "--data", data, "--split", split, "--teacher", teacher, "--out", stores[split],
                 "--layers", "2", "4", "--progress", "false")  # the default store: int8, rotated
    return {"root": root, "data": data, "base": root / "base", "teacher": teacher, "student": root / "student",
            **{f"features_{k}": v for k, v in stores.items()}}


def test_the_store_holds_the_teacher_s_class_logits_and_token_features(glue):
    from transformers import AutoModelForSequenceClassification

    from pipeline.data.prepared import PreparedData, collate_classification
    from pipeline.features.store import FeatureStore

    data = PreparedData(glue["data"])
    assert data.task["name"] == "cola" and data.task["metric"] == "mcc"
    store = FeatureStore(glue["features_valid"], unrotate=True)  # the default store is rotated int8
    assert store.has_class_logits and store.manifest["class_logits"]["labels"] == ["unacceptable", "acceptable"]
    teacher = AutoModelForSequenceClassification.from_pretrained(glue["teacher"]).eval()
    items = [data.split("valid")[i] for i in range(6)]
    batch = collate_classification(items, 0)
    with torch.no_grad():
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"], output_hidden_states=True)
    for b, item in enumerate(items):  # class logits are stored exactly (fp32), the features within int8's error
        torch.testing.assert_close(store.get_class_logits(item["sample_id"]), out.logits[b], rtol=0, atol=1e-6)
        n = len(item["input_ids"])
        feat = store.get(item["sample_id"], [4])[4].float()
        ref = out.hidden_states[4][b, :n]
        assert (feat - ref).norm() / ref.norm() < 0.02
    # eval: the task's metric, recomputable from the per-example predictions it writes.
    scores = stage_ok("eval", "--data", glue["data"], "--models", glue["teacher"], glue["student"], "--names",
                      "teacher", "student", "--out", glue["root"] / "eval")
    assert "teacher: cola valid mcc" in scores.stdout
    result = json.loads((glue["root"] / "eval" / "scores.json").read_text())["results"]
    pred = json.loads((glue["root"] / "eval" / "predictions" / "teacher.json").read_text())
    from eval.metrics import task_scores

    assert result["teacher"]["cola"]["scores"] == task_scores("mcc", pred["predictions"], pred["gold"])
    assert result["teacher"]["cola"]["n_samples"] == len(pred["gold"]) == 48
    assert set(result) == {"teacher", "student"} and (glue["root"] / "eval" / "scores.png").is_file()


# PKD's loss is a mean over examples, so two ranks of 4 give one rank's loss over 8; a distance over the batch's
# token rows is not, so Procrustes compares one rank under each stage.
@pytest.mark.parametrize("loss,rows,ranks", [("procrustes", "tokens", 1), ("pkd", "cls", 2)])
def test_distillation_gives_the_same_losses_under_zero_0_and_3(glue, loss, rows, ranks):
    runs = {}
    for stage, nproc in ((0, 1), (3, ranks)):
        out = glue["root"] / f"distill_{loss}_z{stage}"
        stage_ok("train", "--mode", "distill", "--data", glue["data"], "--student", glue["student"], "--features",
                 glue["features_train"], "--valid_features", glue["features_valid"], "--loss", loss,
                 "--feature_rows", rows, "--layer_map", "1:2", "2:4", "--alpha", "0.5", "--kd_temperature", "2",
                 "--ds_config", f"ds_configs/zero{stage}.json", "--max_steps", "3", "--micro_batch_size",
                 str(8 // nproc), "--nproc", str(nproc), "--progress", "false", "--out", out)
        runs[stage] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train0 = [r for r in runs[0] if r["split"] == "train"]
    train3 = [r for r in runs[3] if r["split"] == "train"]
    assert len(train0) == 3 and train0[0]["kd"] > 0 and train0[0][f"{loss}/s1_t2"] > 0
    for a, b in zip(train0, train3):
        for key in ("loss", "ce", "kd", f"{loss}/s1_t2", f"{loss}/s2_t4"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    valid = [r for r in runs[0] if r["split"] == "valid"][-1]
    assert 0 <= valid["accuracy"] <= 1 and valid["D_P/s2_t4"] > 0
    assert (glue["root"] / f"distill_{loss}_z0" / "model" / "config.json").is_file()


def test_an_online_teacher_gives_the_stored_teacher_s_kd(glue):
    # The base encoder with a fresh head as the student: far from the teacher, so KD is large.
    r = stage_process("train", "--mode", "distill", "--data", glue["data"], "--student", glue["base"],
                      "--teacher", glue["teacher"], "--teacher_mode", "online", "--loss", "none", "--alpha", "1",
                      "--max_steps", "1", "--micro_batch_size", "8", "--progress", "false",
                      "--out", glue["root"] / "online")
    assert r.returncode == 0, r.stderr[-2000:]
    stage_ok("train", "--mode", "distill", "--data", glue["data"], "--student", glue["base"], "--features",
             glue["features_train"], "--loss", "none", "--alpha", "1", "--max_steps", "1", "--micro_batch_size",
             "8", "--progress", "false", "--out", glue["root"] / "stored")
    kd = [json.loads((glue["root"] / d / "metrics.jsonl").read_text().splitlines()[0])["kd"]
          for d in ("online", "stored")]
    assert kd[0] > 1e-3 and kd[0] == pytest.approx(kd[1], rel=1e-4)  # class logits are stored in fp32


def test_mismatched_models_and_data_are_one_line_each_exit_2(glue, prepared_tiny, tiny_pair):
    root = glue["root"]
    cases = [
        # a decoder where a classifier is needed, and the reverse
        ("train", ["--data", glue["data"], "--student", tiny_pair.student, "--out", root / "bad1"], "not an encoder"),
        ("train", ["--data", prepared_tiny, "--student", glue["student"], "--out", root / "bad2"], "not a causal LM"),
        ("eval", ["--data", glue["data"], "--models", tiny_pair.teacher, "--out", root / "bad3"], "not an encoder"),
        # a base encoder cannot be a teacher: its class head is untrained
        ("cache", ["--data", glue["data"], "--teacher", glue["base"], "--out", root / "bad4", "--layers", "2"],
         "a base encoder, not a classifier fine-tuned"),
        ("train", ["--mode", "distill", "--data", glue["data"], "--student", glue["student"], "--features",
                   glue["features_train"], "--kd", "final", "--out", root / "bad5"], "--kd final distils a causal"),
        ("train", ["--mode", "distill", "--data", prepared_tiny, "--student", tiny_pair.student, "--teacher",
                   tiny_pair.teacher, "--loss", "pkd", "--out", root / "bad6"], "--loss pkd is for classification"),
    ]
    for stage, args, words in cases:
        r = stage_in_process(stage, *args)
        assert r.returncode == 2, (stage, r.stdout[-1500:], r.stderr[-1500:])
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and words in lines[0], (stage, r.stderr)


def test_pkd_refuses_other_widths_with_a_message(glue):
    from transformers import BertConfig, BertForSequenceClassification

    narrow = glue["root"] / "narrow"
    config = BertConfig.from_pretrained(glue["student"])
    config.hidden_size, config.intermediate_size = 16, 32
    BertForSequenceClassification(config).save_pretrained(narrow)
    r = stage_in_process("train", "--mode", "distill", "--data", glue["data"], "--student", narrow, "--features",
                         glue["features_train"], "--loss", "pkd", "--layer_map", "1:2", "--out",
                         glue["root"] / "bad_pkd")
    assert r.returncode == 2 and "pkd compares [CLS] rows of the same width" in r.stderr


def test_a_tiny_glue_study_runs_two_at_a_time_and_reports_the_task_s_metric(glue):
    out = glue["root"] / "study"
    r = stage_process("study", "--task", "cola", "--glue_dir", glue["root"], "--teacher", glue["base"], "--out", out,
                      "--methods", "kd", "kd_pkd", "--seeds", "0", "1", "--teacher_steps", "4", "--student_steps",
                      "2", "--student_layers", "1,3", "--micro_batch_size", "16", "--jobs", "2", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((out / "study.json").read_text())
    assert results["metric"] == "mcc" and results["benchmark"] == "cola" and set(results["methods"]) == {"kd", "kd_pkd"}
    assert set(results["reference_models"]) == {"teacher", "student_untrained"}
    scores = json.loads((out / "eval" / "scores.json").read_text())["results"]
    per_seed = [scores[f"kd_pkd__seed{s}"]["cola"]["mean"] for s in (0, 1)]
    assert results["methods"]["kd_pkd"]["score_per_seed"] == per_seed
    (versus_kd,) = results["comparisons"]["kd"]
    assert versus_kd["method"] == "kd_pkd" and 0 <= versus_kd["bootstrap_p"] <= 1
    report = (out / "report.md").read_text()
    assert "cola MCC" in report and "bootstrap over examples" in report and (out / "forest.png").is_file()


def test_the_metric_bootstrap_recomputes_the_metric_on_each_resample():
    import numpy as np

    from eval.bootstrap import metric_per_seed, paired_metric_bootstrap
    from eval.metrics import task_scores

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 400)
    good = np.where(rng.random((3, 400)) < 0.85, gold, 1 - gold)
    poor = np.where(rng.random((3, 400)) < 0.65, gold, 1 - gold)
    for metric, key in (("mcc", "mcc"), ("f1", "f1"), ("accuracy", "accuracy")):
        assert metric_per_seed(good, gold, metric) == pytest.approx(
            [task_scores(metric, p.tolist(), gold.tolist())[key] for p in good])
        est, p = paired_metric_bootstrap(good, poor, gold, metric)
        assert est.low < est.mean < est.high and est.mean > 0 and p < 0.01
    same, p_same = paired_metric_bootstrap(good, good[::-1], gold, "mcc")
    assert same.low <= 0 <= same.high and p_same > 0.05


def test_real_minilm_on_cola_fine_tune_cache_distill_and_score(tmp_path):
    """The real pretrained encoder (all-MiniLM-L6-v2 from its PyPI wheel) on 48 CoLA sentences of the shared TSVs:
    class logits from the store equal the fine-tuned model's, its token rule leaves nothing out (no massive
    activations, unlike a decoder's), and a 2-step distillation trains and scores."""
    from helpers import real_model
    from pipeline.data.prepared import PreparedData, collate_classification
    from pipeline.features.store import FeatureStore
    from pipeline.models.encoders import encoder_forward, load_classifier

    cola = Path(os.environ.get("GEOKD_GLUE_DATA") or Path(__file__).resolve().parents[2] / "shared/data/glue") / "cola"
    if not (cola / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {cola}")
    minilm = real_model("minilm-l6", "minilm")
    data = tmp_path / "data"
    stage_ok("prepare", "--task", "cola", "--data", cola, "--tokenizer", minilm, "--out", data, "--limit", "48")
    stage_ok("train", "--mode", "sft", "--data", data, "--student", minilm, "--out", tmp_path / "teacher",
             "--max_steps", "2", "--micro_batch_size", "16", "--lr", "1e-4", "--progress", "false")
    teacher = tmp_path / "teacher" / "model"
    stage_ok("make_student", "--teacher", teacher, "--layers", "1,3,5", "--out", tmp_path / "student")
    store = tmp_path / "valid_store"
    stage_ok("cache", "--data", data, "--split", "valid", "--teacher", teacher, "--out", store, "--layers", "2", "4",
             "--progress", "false")
    items = [PreparedData(data).split("valid")[i] for i in range(8)]
    batch = collate_classification(items, 0)
    model = load_classifier(str(teacher), ["unacceptable", "acceptable"]).eval()
    with torch.no_grad():
        _, logits = encoder_forward(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], [])
    features = FeatureStore(store)
    for b, item in enumerate(items):
        torch.testing.assert_close(features.get_class_logits(item["sample_id"]), logits[b], rtol=1e-5, atol=1e-5)
    stage_ok("analyze", "--features", store, "--data", data, "--split", "valid", "--out", tmp_path / "analysis")
    layers = json.loads((tmp_path / "analysis" / "analysis.json").read_text())["layers"]
    assert layers["4"]["outlier_tokens"] == 0 and layers["4"]["first_token_norm_ratio"] < 3
    # A valid store for the student's geometry report: the valid split both trains and validates here.
    stage_ok("train", "--mode", "distill", "--data", data, "--train_split", "valid", "--student", tmp_path / "student",
             "--features", store, "--valid_features", store, "--loss", "procrustes", "--layer_map", "1:2", "2:4",
             "--max_steps", "2", "--micro_batch_size", "16", "--progress", "false", "--out", tmp_path / "distill")
    rows = [json.loads(x) for x in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kd"] >= 0 and rows[0]["procrustes/s2_t4"] > 0 and rows[-1]["split"] == "valid"
    stage_ok("eval", "--data", data, "--models", teacher, tmp_path / "distill" / "model", "--names", "teacher",
             "student", "--out", tmp_path / "eval")
    results = json.loads((tmp_path / "eval" / "scores.json").read_text())["results"]
    assert {r["cola"]["n_samples"] for r in results.values()} == {48}
