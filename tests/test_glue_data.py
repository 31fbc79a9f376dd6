"""Classification data for encoders (pipeline/data/classification.py): GLUE's TSV layouts, the generic JSONL form,
the shards and manifest prepare writes for them, the collate, and the task metrics (eval/metrics.py)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from eval.metrics import PRIMARY, accuracy, f1_binary, matthews_corrcoef, task_scores
from helpers import ROOT, stage_in_process
from pipeline.data.classification import TASKS, read_classification
from pipeline.data.prepared import PreparedData, collate_batch, collate_classification
from pipeline.errors import DataError

GLUE = Path(os.environ.get("GEOKD_GLUE_DATA") or ROOT.parent / "shared/data/glue")
WORDS = ("the a cat dog sat on mat is was not and he she said it big small red ran home "
         "\" . , ' yes no paris france capital of in").split()

RTE_ROWS = [("The cat sat on the mat.", "A cat sat.", "entailment"),
            ("The dog ran home.", "The dog was not home.", "not_entailment"),
            ("She said it was big.", "It was small.", "not_entailment"),
            ("Paris is the capital of France.", "Paris is in France.", "entailment")]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT WordPiece tokenizer, saved as a model dir would hold it (no EOS token, as BERT's)."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s"]
    path = tmp_path_factory.mktemp("bert") / "tokenizer"
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    return path


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def rte_tsv(path: Path, rows=RTE_ROWS) -> Path:
    return write(path, "index\tsentence1\tsentence2\tlabel\n"
                 + "".join(f"{i}\t{a}\t{b}\t{y}\n" for i, (a, b, y) in enumerate(rows)))


def prepare(*args) -> None:
    r = stage_in_process("prepare", *args)
    assert r.returncode == 0, r.stdout + r.stderr


def test_each_glue_layout_parses_with_its_label_ids(tmp_path):
    cola = read_classification(write(tmp_path / "cola.tsv", 'gj04\t1\t\tHe said "yes".\ngj04\t0\t*\tCat the sat.'),
                               "cola")  # no header, no final newline, a bare quote
    assert [(e.text, e.text_pair, e.label) for e in cola.examples] == [('He said "yes".', None, 1),
                                                                       ("Cat the sat.", None, 0)]
    assert cola.records == 2 and cola.task is TASKS["cola"] and len(cola.sha256) == 64
    rte = read_classification(rte_tsv(tmp_path / "rte.tsv"), "rte")
    assert [e.label for e in rte.examples] == [0, 1, 1, 0] and rte.examples[0].text_pair == "A cat sat."
    mrpc = read_classification(write(tmp_path / "mrpc.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                     '1\t7\t8\the said " it " .\tit was said .\n0\t9\t10\ta cat .\ta dog .\n',
                                     bom=True), "mrpc")
    assert [(e.text, e.label) for e in mrpc.examples] == [('he said " it " .', 1), ("a cat .", 0)]
    assert TASKS["mrpc"].labels[1] == "equivalent" and TASKS["cola"].metric == "mcc" and TASKS["rte"].pair


@pytest.mark.parametrize("task,train,dev", [("cola", (6023, 2528), (721, 322)), ("rte", (1249, 1241), (146, 131)),
                                            ("mrpc", (2474, 1194), (279, 129))])
def test_the_shared_glue_files_have_the_readme_counts(task, train, dev):
    if not GLUE.is_dir():
        pytest.skip(f"GLUE data not found at {GLUE} (set GEOKD_GLUE_DATA)")
    positive = {"cola": 1, "rte": 0, "mrpc": 1}[task]  # acceptable, entailment, paraphrase
    for split, (pos, neg) in (("train", train), ("dev", dev)):
        src = read_classification(GLUE / task / f"{split}.tsv", task)
        labels = [e.label for e in src.examples]
        assert src.records == pos + neg and (labels.count(positive), len(labels) - labels.count(positive)) == (pos, neg)


@pytest.mark.parametrize("text,where,what", [
    ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n", "line 3", "3 tab-separated column"),
    ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tcontradiction\n", "line 2", "label 'contradiction'"),
    ("index\tsentence1\tsentence2\tlabel\n0\t\tb\tentailment\n", "line 2", "empty sentence1"),
    ("sentence1\tsentence2\tlabel\n", "line 1", "expected the rte header"),
])
def test_a_bad_tsv_row_names_file_and_line(tmp_path, text, where, what):
    path = write(tmp_path / "rte.tsv", text)
    with pytest.raises(DataError) as e:
        read_classification(path, "rte")
    assert f"{path} {where}" in str(e.value) and what in str(e.value)


def test_a_label_outside_the_set_names_file_line_and_labels(tmp_path):
    path = jsonl(tmp_path / "rte.jsonl", [{"text": "a", "text_pair": "b", "label": 1},
                                          {"text": "a", "text_pair": "b", "label": "contradiction"}])
    with pytest.raises(DataError, match=rf"{path} line 2: label 'contradiction' .*entailment, not_entailment"):
        read_classification(path, "rte")
    with pytest.raises(DataError, match=r"line 1: label 2 .*neg, pos"):
        read_classification(jsonl(tmp_path / "g.jsonl", [{"text": "a", "label": 2}]), "classification", ["neg", "pos"])
    with pytest.raises(DataError, match=r"line 2: 'text' must be a non-empty string"):
        read_classification(jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": 0}, {"label": 1}]), "classification")
    write(tmp_path / "bad.jsonl", '{"text": "a", "label": 0}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_classification(tmp_path / "bad.jsonl", "classification")
    with pytest.raises(DataError, match="sentence-pair task: 'text_pair' is missing"):
        read_classification(jsonl(tmp_path / "p.jsonl", [{"text": "a", "label": 0}]), "rte")


def test_generic_labels_come_from_the_train_file_sorted(tmp_path):
    rows = [{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 2}]
    src = read_classification(jsonl(tmp_path / "n.jsonl", rows), "classification")
    assert src.task.labels == ("2", "10") and [e.label for e in src.examples] == [1, 0, 0]
    assert src.task.metric == "accuracy" and not src.task.pair
    rows = [{"text": "a", "text_pair": "x", "label": "pos"}, {"text": "b", "label": "neg"}]
    src = read_classification(jsonl(tmp_path / "s.jsonl", rows), "classification", metric="f1")
    assert src.task.labels == ("neg", "pos") and src.task.pair and src.task.metric == "f1"


def test_generic_jsonl_round_trip(tmp_path, bert_dir):
    rows = [{"text": "the cat sat on the mat", "text_pair": "a cat sat", "label": "yes"},
            {"text": "the dog ran home", "label": "no"},
            {"text": "she said it was big", "text_pair": "it was small", "label": 0},
            {"text": "the red cat", "text_pair": "a small dog ran home and sat on the mat", "label": "yes"},
            {"text": "paris is the capital of france", "text_pair": "paris is in france", "label": 1}]
    out = tmp_path / "out"
    args = ["--task", "classification", "--data", jsonl(tmp_path / "data.jsonl", rows), "--labels", "no,yes",
            "--tokenizer", bert_dir, "--out", out, "--valid_size", "2", "--max_len", "12"]
    prepare(*args)
    data = PreparedData(out)
    assert data.task == {"type": "classification", "name": "classification", "labels": ["no", "yes"],
                         "metric": "accuracy", "pair": True}
    assert data.splits == ["train", "valid"] and data.manifest["counts"]["truncated"] == 2  # rows 3, 4
    assert sum(data.manifest["counts"]["labels"]["train"].values()) == 3
    tok = data.tokenizer()
    items = [data.split(s)[i] for s in ("train", "valid") for i in range(len(data.split(s)))]
    records = {r["sample_id"]: r for s in ("train", "valid") for r in data.records(s)}
    assert sorted(records) == [0, 1, 2, 3, 4] and records[1] == {"sample_id": 1, "text": "the dog ran home",
                                                                 "text_pair": None, "label": "no"}
    for item in items:
        sid, ids, types = item["sample_id"], item["input_ids"].tolist(), item["token_type_ids"].tolist()
        row = rows[sid]
        expected = tok(row["text"], row.get("text_pair"), truncation=True, max_length=12)
        assert ids == expected["input_ids"] and types == expected["token_type_ids"]
        assert item["label"] == ["no", "yes"].index(records[sid]["label"]) == {"no": 0, "yes": 1, 0: 0, 1: 1}[
            row["label"]]
        assert item["prompt_len"] == len(ids) and len(ids) <= 12
        first_sep = ids.index(tok.sep_token_id)
        assert set(types[: first_sep + 1]) == {0} and set(types[first_sep + 1:]) == ({1} if "text_pair" in row
                                                                                     else set())
    batch = collate_classification(items, tok.pad_token_id)
    width = max(len(x["input_ids"]) for x in items)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (5, width), "attention_mask": (5, width), "token_type_ids": (5, width), "labels": (5,),
        "sample_ids": (5,)}
    assert batch["labels"].dtype == torch.long and batch["token_type_ids"][batch["attention_mask"] == 0].sum() == 0
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
    assert (collate_batch(items, tok.pad_token_id)["labels"] == -100).all()  # a causal-LM collate: no LM label
    from safetensors.numpy import load_file
    shard = load_file(out / data.manifest["splits"]["train"]["shards"][0]["file"])
    assert {k: str(v.dtype) for k, v in shard.items()} == {
        "input_ids": "int32", "offsets": "int64", "prompt_lens": "int32", "sample_ids": "int64",
        "token_type_ids": "int8", "class_labels": "int64"}
    r = stage_in_process("prepare", *args)
    assert r.returncode == 0 and "up to date" in r.stdout


def test_a_glue_task_as_jsonl_gives_the_samples_of_its_tsv(tmp_path, bert_dir):
    """RTE as a folder of TSVs and as JSONL (labels as names, and as ids) prepare to the same samples."""
    rte_tsv(tmp_path / "tsv" / "train.tsv")
    rte_tsv(tmp_path / "tsv" / "dev.tsv", RTE_ROWS[:2])
    as_rows = [{"text": a, "text_pair": b, "label": y} for a, b, y in RTE_ROWS]
    jsonl(tmp_path / "names" / "train.jsonl", as_rows)
    jsonl(tmp_path / "names" / "dev.jsonl", as_rows[:2])
    jsonl(tmp_path / "ids.jsonl", [dict(r, label=TASKS["rte"].labels.index(r["label"])) for r in as_rows])
    prepare("--task", "rte", "--data", tmp_path / "tsv", "--tokenizer", bert_dir, "--out", tmp_path / "a")
    prepare("--task", "rte", "--data", tmp_path / "names", "--tokenizer", bert_dir, "--out", tmp_path / "b")
    prepare("--task", "rte", "--data", tmp_path / "ids.jsonl", "--tokenizer", bert_dir, "--out", tmp_path / "c")
    a, b, c = (PreparedData(tmp_path / x) for x in "abc")

    def samples(data, split):
        ds = data.split(split)
        return [(ds[i]["sample_id"], ds[i]["input_ids"].tolist(), ds[i]["token_type_ids"].tolist(), ds[i]["label"])
                for i in range(len(ds))]

    assert a.splits == b.splits == ["train", "valid"] and c.splits == ["train"]
    assert samples(a, "train") == samples(b, "train") == samples(c, "train")
    assert samples(a, "valid") == samples(b, "valid") and len(samples(a, "valid")) == 2
    assert a.task == b.task == c.task == {"type": "classification", "name": "rte", "labels": list(TASKS["rte"].labels),
                                          "metric": "accuracy", "pair": True}
    assert [x["label"] for x in a.records("train")] == [y for _, _, y in RTE_ROWS]
    assert [s["split"] for s in a.manifest["sources"]] == ["train", "valid"]


def test_instruction_data_is_unchanged(tmp_path):
    out = tmp_path / "dec"
    prepare("--data", jsonl(tmp_path / "d.jsonl", [{"instruction": "say hi", "output": "hi"}]), "--out", out,
            "--tokenizer", "builtin-tiny")
    data = PreparedData(out)
    assert data.task is None and "task" not in data.manifest
    assert not {"task", "labels", "metric"} & set(data.manifest["config"])
    assert set(data.split("train")[0]) == {"sample_id", "input_ids", "prompt_len"}


@pytest.mark.parametrize("extra,message", [
    (["--task", "sst2"], "--task 'sst2': choose one of cola, rte, mrpc, classification"),
    (["--labels", "a,b"], "--labels and --metric are for --task classification"),
    (["--task", "cola", "--metric", "f1"], "--labels and --metric are for --task classification; cola has its own"),
    (["--task", "classification", "--metric", "auc"], "--metric 'auc': choose one of accuracy, f1, mcc"),
    (["--task", "rte"], "train.tsv line 3: 3 tab-separated column(s)"),
    (["--task", "rte", "--valid_size", "1"], "is a folder: its dev file becomes split 'valid'"),
])
def test_the_stage_refuses_bad_input_in_one_line(tmp_path, extra, message):
    write(tmp_path / "rte" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n")
    rte_tsv(tmp_path / "rte" / "dev.tsv")
    r = stage_in_process("prepare", "--data", tmp_path / "rte", "--out", tmp_path / "out",
                         "--tokenizer", "builtin-tiny", *extra)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_metrics_match_hand_computed_values():
    # gold 1 1 1 1 0 0 0 0 0 0 vs pred 1 1 1 0 1 0 0 0 0 0: TP 3, FN 1, FP 1, TN 5
    gold = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    pred = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    tp, tn, fp, fn = 3, 5, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_corrcoef(pred, gold) == pytest.approx(mcc) == pytest.approx(14 / 24)
    assert f1_binary(pred, gold) == pytest.approx(2 * tp / (2 * tp + fp + fn)) == pytest.approx(0.75)
    assert f1_binary(pred, gold, positive=0) == pytest.approx(10 / 12)
    assert accuracy(torch.tensor(pred), torch.tensor(gold)) == pytest.approx(0.8)
    assert matthews_corrcoef([1] * 10, gold) == 0.0 and matthews_corrcoef(pred, [0] * 10) == 0.0
    assert matthews_corrcoef(gold, gold) == pytest.approx(1.0) and matthews_corrcoef([1 - g for g in gold], gold) == -1
    assert matthews_corrcoef([0, 1, 2, 0], [0, 1, 2, 0]) == pytest.approx(1.0)
    assert f1_binary([0, 0], [0, 0]) == 0.0
    assert task_scores("mcc", pred, gold) == {"mcc": pytest.approx(100 * mcc)}
    assert task_scores("accuracy", pred, gold) == {"accuracy": pytest.approx(80.0)}
    assert task_scores("f1", pred, gold) == {"f1": pytest.approx(75.0), "accuracy": pytest.approx(80.0)}
    assert PRIMARY == {"mcc": "mcc", "accuracy": "accuracy", "f1": "f1"}
    with pytest.raises(DataError, match="misaligned"):
        accuracy([1, 0], [1])
