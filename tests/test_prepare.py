"""The prepare stage: input formats, bad input, tokenization and masks, truncation, the output folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.data.builtin import builtin_split
from pipeline.data.prepared import INCOMPLETE, PreparedData, collate_batch, tokenize_examples
from pipeline.io import sha256_file
from pipeline.data.prompts import render_prompt
from pipeline.data.sources import Example, parse_field_map, read_source
from pipeline.errors import DataError
from pipeline.data.tokenizer import encode_text, load_tokenizer, tokenizer_fingerprint
from pipeline.data.config import PrepareConfig
from stages.prepare import main, run

RECORDS = [  # instruction, input, outputs
    ("Name the capital of Peru.", "", ["The capital of Peru is Lima."]),
    ("Summarize the text.", "Cats sleep a lot. They also eat.", ["Cats sleep and eat.", "Cats rest a lot."]),
    ("Reverse the list.", "a, b, c", ["c, b, a"]),
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin-tiny")


def expected_examples():
    return [Example(i, x, list(o), render_prompt(i, x)) for i, x, o in RECORDS]


def test_every_format_parses_to_the_same_examples(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl",
                         [{"instruction": i, "input": x, "output": o if len(o) > 1 else o[0]} for i, x, o in RECORDS])
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": i, "context": x, "response": o if len(o) > 1
                                                    else o[0], "category": "qa"} for i, x, o in RECORDS])
    self_inst = write_jsonl(tmp_path / "self_instruct.jsonl",
                            [{"instruction": i, "instances": [{"input": x, "output": o if len(o) > 1 else o[0]}]}
                             for i, x, o in RECORDS])
    mapped = write_jsonl(tmp_path / "mapped.jsonl",
                         [{"q": i, "ctx": x, "answers": o} for i, x, o in RECORDS])
    with_prompt = write_jsonl(tmp_path / "minillm.jsonl",
                              [{"instruction": i, "input": x, "output": o, "prompt": render_prompt(i, x)}
                               for i, x, o in RECORDS])
    array = tmp_path / "alpaca_array.json"
    array.write_text(json.dumps([{"instruction": i, "input": x, "output": o} for i, x, o in RECORDS]))
    cases = [(alpaca, {}, "alpaca"), (dolly, {}, "dolly"), (self_inst, {}, "self-instruct"),
             (mapped, parse_field_map(["instruction=q", "input=ctx", "output=answers"]), "mapped"),
             (with_prompt, {}, "alpaca"), (array, {}, "alpaca")]
    for path, fields, fmt in cases:
        src = read_source(str(path), fields)
        assert src.format == fmt, path
        assert src.examples == expected_examples(), path
        assert src.sha256 == sha256_file(path)


def test_self_instruct_expands_instances_and_prompt_field_is_used_as_given(tmp_path):
    path = write_jsonl(tmp_path / "si.jsonl", [{"instruction": "Add one.", "instances": [
        {"input": "1", "output": "2"}, {"input": "5", "output": "6"}]}])
    assert [(e.input, e.references) for e in read_source(str(path)).examples] == [("1", ["2"]), ("5", ["6"])]
    custom = write_jsonl(tmp_path / "custom.jsonl", [{"instruction": "x", "output": "y", "prompt": "Q: x\nA:"}])
    assert read_source(str(custom)).examples[0].prompt == "Q: x\nA:"


@pytest.mark.parametrize("content,message", [
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "c" "output": "d"}\n', r"bad\.jsonl:3: not valid JSON"),
    ('{"instruction": "a", "output": "b"}\n[1, 2]\n', r"bad\.jsonl:2: expected one JSON object per line, got list"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": "d"}\n',
     r"bad\.jsonl:2: record has no field 'output'; its fields are: input, instruction"),
    ('{"instruction": "a", "output": null}\n', r"bad\.jsonl:1: field 'output' is null"),
    ('{"instruction": "a", "output": 7}\n', r"bad\.jsonl:1: field 'output' must be a string"),
    ('{"instruction": "a", "output": []}\n', r"must be a string or a non-empty list of strings"),
    ('{"question": "a", "answer": "b"}\n',
     r"bad\.jsonl: cannot tell the format from the fields \['answer', 'question'\]"),
    ('\n  \n', r"bad\.jsonl: no records"),
])
def test_bad_input_names_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_source(str(path))


def test_invalid_utf8_unreadable_missing_and_offline_hub(tmp_path, monkeypatch):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        read_source(str(path))
    with pytest.raises(DataError, match="is a directory"):
        read_source(str(tmp_path))
    with pytest.raises(DataError, match="no such file"):
        read_source(str(tmp_path / "nope.jsonl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"offline \(HF_HUB_OFFLINE=1\).*local JSONL"):
        read_source("databricks/databricks-dolly-15k")
    with pytest.raises(DataError, match="OURS=THEIRS"):
        parse_field_map(["answer"])
    with pytest.raises(DataError, match="at least instruction"):
        parse_field_map(["input=ctx"])


def test_tokens_decode_to_prompt_and_labels_cover_exactly_the_response(tok):
    examples = expected_examples()
    samples, report = tokenize_examples(examples, tok)
    assert report["kept"] == len(examples) and report["truncated"] == {"prompt": 0, "response": 0}
    items = []
    for ex, s in zip(examples, samples):
        assert s.input_ids[0] == tok.bos_token_id and s.input_ids[-1] == tok.eos_token_id
        assert tok.decode(s.input_ids[1 : s.prompt_len]) == ex.prompt
        assert tok.decode(s.input_ids[s.prompt_len : -1]) == ex.references[0]
        # Training ids of the prompt are what a generator gets from tokenizing the rendered prompt.
        assert s.input_ids[: s.prompt_len] == tok(ex.prompt)["input_ids"]
        items.append({"sample_id": s.sample_id, "input_ids": torch.tensor(s.input_ids),
                      "prompt_len": s.prompt_len})
    batch = collate_batch(items, tok.pad_token_id)
    for row, s in enumerate(samples):
        supervised = (batch["labels"][row] != -100).nonzero().flatten().tolist()
        assert supervised == list(range(s.prompt_len, len(s.input_ids)))
        assert batch["attention_mask"][row].sum() == len(s.input_ids)
        assert (batch["input_ids"][row, len(s.input_ids):] == tok.pad_token_id).all()
    assert batch["sample_ids"].tolist() == [0, 1, 2]


def test_truncation_and_drop_counts(tok):
    long_input = " ".join(["river garden window planet"] * 40)
    long_output = " ".join(["The capital of Peru is Lima."] * 40)
    examples = [Example(i, x, [o], render_prompt(i, x)) for i, x, o in [
        ("Short.", "", "Fine."),
        ("Long prompt.", long_input, "Fine."),
        ("Long answer.", "", long_output),
        ("Both long.", long_input, long_output),
        ("Nothing to say.", "", "  "),
    ]]
    samples, report = tokenize_examples(examples, tok, max_prompt_len=48, max_len=96)
    assert report["truncated"] == {"prompt": 2, "response": 2}
    assert report["dropped"] == {"empty_output": 1, "prompt_too_long": 0}
    by_id = {s.sample_id: s for s in samples}
    assert sorted(by_id) == [0, 1, 2, 3]  # ids are positions in the input, gaps where records were dropped
    cut_prompt = by_id[1]
    assert cut_prompt.prompt_len == 48 and cut_prompt.prompt.endswith("### Response:\n")
    assert cut_prompt.input_ids[1:48] == encode_text(tok, cut_prompt.prompt)  # records.jsonl text matches tokens
    for sid in (2, 3):
        assert len(by_id[sid].input_ids) == 96 and by_id[sid].input_ids[-1] != tok.eos_token_id
    assert by_id[0].input_ids[-1] == tok.eos_token_id
    dropped, report = tokenize_examples(examples, tok, max_prompt_len=48, max_len=96, prompt_overflow="drop")
    assert report["dropped"] == {"empty_output": 1, "prompt_too_long": 2}
    assert [s.sample_id for s in dropped] == [0, 2]
    with pytest.raises(ValueError, match="max_prompt_len"):
        tokenize_examples(examples, tok, max_prompt_len=512, max_len=256)


def test_prepare_folder_manifest_readers_and_rerun(tmp_path, tok):
    data = write_jsonl(tmp_path / "data.jsonl",
                       [{"instruction": f"Say {n}.", "input": "", "output": f"{n} it is."} for n in range(50)])
    out = tmp_path / "prep"
    cfg = PrepareConfig(data=[str(data)], out=str(out), tokenizer="builtin-tiny", valid_size=10, shard_size=16)
    run(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "geokd.prepared" and not (out / INCOMPLETE).exists()
    assert m["sources"][0]["sha256"] == sha256_file(data)
    assert m["counts"]["splits"] == {"train": 40, "valid": 10}
    assert [s["samples"] for s in m["splits"]["train"]["shards"]] == [16, 16, 8]

    prepared = PreparedData(out)
    prepared.verify()
    assert prepared.tokenizer_fingerprint == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(prepared.tokenizer()) == tokenizer_fingerprint(tok)
    train, valid = prepared.split("train"), prepared.split("valid")
    ids = sorted(train.sample_ids.tolist() + valid.sample_ids.tolist())
    assert ids == list(range(50))
    for name, ds in (("train", train), ("valid", valid)):
        records = prepared.records(name)
        assert [r["sample_id"] for r in records] == ds.sample_ids.tolist()
        for i in (0, len(ds) - 1):
            item, rec = ds[i], records[i]
            assert ds.position(item["sample_id"]) == i
            assert len(item["input_ids"]) == ds.lengths[i]
            assert tok.decode(item["input_ids"][1 : item["prompt_len"]]) == rec["prompt"]
            assert rec["references"] == [f"{item['sample_id']} it is."]
    with pytest.raises(DataError, match="no split 'test'"):
        prepared.split("test")

    # Same inputs: nothing is rewritten. Other inputs: an error that says what differs.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    run(cfg)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    with pytest.raises(FileExistsError, match="max_len 512 vs 300"):
        run(PrepareConfig(**{**cfg.__dict__, "max_len": 300}))
    write_jsonl(data, [{"instruction": "Other.", "output": "data."}])
    with pytest.raises(FileExistsError, match="other inputs.*sources"):
        run(cfg)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_validation_split_follows_the_seed(tmp_path):
    def valid_ids(seed, name):
        out = run(PrepareConfig(data=["builtin"], out=str(tmp_path / name), tokenizer="builtin-tiny", limit=100,
                                valid_size=10, seed=seed))
        return PreparedData(out).split("valid").sample_ids.tolist()

    assert valid_ids(1, "a") == valid_ids(1, "b") != valid_ids(2, "c")


def test_incomplete_folder_is_redone_and_foreign_folder_refused(tmp_path, capsys):
    out = tmp_path / "prep"
    (out / "train").mkdir(parents=True)
    (out / INCOMPLETE).write_text("x\n")
    (out / "train" / "shard-00000.safetensors").write_bytes(b"half written")
    run(PrepareConfig(data=["builtin"], out=str(out), tokenizer="builtin-tiny", limit=30))
    PreparedData(out).verify()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["--data", "builtin", "--out", str(foreign), "--tokenizer", "builtin-tiny", "--limit", "5"]) == 2
    assert "not a prepared-data folder" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        PreparedData(foreign)


def test_cli_reports_bad_data_and_prints_a_summary(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    assert main(["--data", str(bad), "--out", str(tmp_path / "o"), "--tokenizer", "builtin-tiny"]) == 2
    assert "bad.jsonl:2: record has no field 'output'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["--data", "builtin:test", "--split", "test", "--out", str(tmp_path / "t"),
                 "--tokenizer", "builtin-tiny"]) == 0
    printed = capsys.readouterr().out
    assert "300 records" in printed and "test: 300 samples" in printed and "prompt" in printed
    assert PreparedData(tmp_path / "t").splits == ["test"]


def test_prepared_tiny_fixture(prepared_tiny):
    p = PreparedData(prepared_tiny)
    assert {n: len(p.split(n)) for n in p.splits} == {"train": 540, "valid": 60}
    assert len(p.manifest["splits"]["train"]["shards"]) == 3


def test_builtin_dataset_is_deterministic_and_varied():
    a, b = builtin_split("train"), builtin_split("train")
    assert a == b and len(a) == 3000
    assert len({r["instruction"] for r in a}) > 200
    assert all(r["output"].strip() for r in a)
    test = builtin_split("test")
    seen = {(r["instruction"], r["input"]) for r in a}
    assert sum((r["instruction"], r["input"]) in seen for r in test) < len(test) // 4
    with pytest.raises(ValueError, match="choose one of train, test"):
        builtin_split("dev")


def test_real_minillm_files_match_our_template(shared_data):
    test = read_source(str(shared_data / "dolly_test.jsonl"))
    assert test.records == 500 and test.format == "alpaca"
    raw = [json.loads(line) for line in open(shared_data / "dolly_test.jsonl", encoding="utf-8")]
    # MiniLLM's stored prompts are exactly the template we render for records without one.
    assert all(r["prompt"] == render_prompt(r["instruction"], r["input"]) for r in raw)
    sinst = read_source(str(shared_data / "sinst_test.jsonl"))
    assert sinst.records == 1694 and max(len(e.references) for e in sinst.examples) > 1


def test_real_dolly_train_part_tokenizes_with_gpt2(shared_data):
    src = read_source(str(shared_data / "dolly_train_part2.jsonl"))
    assert src.records == 5717
    gpt2 = load_tokenizer("builtin-gpt2")
    samples, report = tokenize_examples(src.examples[:300], gpt2)
    assert report["kept"] == 300 and all(len(s.input_ids) <= 512 and s.prompt_len <= 256 for s in samples)
    s = samples[0]
    assert gpt2.decode(s.input_ids[1 : s.prompt_len]) == src.examples[0].prompt

