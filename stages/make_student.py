"""Stage `make-student`: a student built from a subset of the teacher's decoder layers (same family, tokenizer,
embeddings and head), the usual way to start a small student of a pretrained teacher.

    ./run.sh make-student --teacher models/smollm2 --layers 0,6,12,18,24,29 --out models/smol6

--layers are 0-based decoder layer indices, kept in order. OUT/student.json records the teacher (path and
fingerprint), the kept layers and which teacher hidden state each student hidden state came from, to pick
--layer_map pairs by. The work: pipeline/models/student_init.py.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from pipeline.config import stage_main
from pipeline.errors import ConfigError
from pipeline.models.student_init import make_student


@dataclass
class MakeStudentConfig:
    teacher: str = field(default="", metadata={"help": "teacher model directory"})
    layers: str = field(default="", metadata={"help": "0-based decoder layers to keep, e.g. 0,6,12,18,24,29"})
    out: str = field(default="", metadata={"help": "student model folder to create (never overwritten)"})

    def check(self) -> None:
        if not self.teacher or not self.layers or not self.out:
            raise ConfigError("make-student needs --teacher DIR --layers 0,6,... --out DIR")


def run(cfg: MakeStudentConfig) -> None:
    info = make_student(cfg.teacher, cfg.layers, cfg.out)
    print(f"[make-student] {cfg.out}: {len(info['kept_layers'])} of {info['teacher_layers']} layers "
          f"({info['parameters'] / 1e6:.1f}M parameters); student hidden state -> teacher hidden state: "
          + " ".join(f"{s}->{t}" for s, t in info["hidden_state_of_teacher"].items()))


def main(argv: list[str] | None = None) -> int:
    return stage_main("make-student", MakeStudentConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
