"""`./run.sh demo`: the main job on the embedded defaults.

For now the paper's synthetic geometry experiment; it grows into the whole pipeline (prepare, teacher,
cache, distil with each method, evaluate) as those stages land.
"""
from __future__ import annotations

import sys

from stages import synthetic


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out" not in argv:
        argv += ["--out", "runs/demo/synthetic"]
    synthetic.main(argv)


if __name__ == "__main__":
    main()
