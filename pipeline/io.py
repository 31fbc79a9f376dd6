"""Small file helpers every stage shares: atomic writes, content hashes, JSON manifests, strict JSONL.

A file a stage writes appears under its final name only once complete (write to a temporary name in the same
folder, fsync, rename), so a killed job never leaves something that looks finished.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import DataError


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600, and so do writers that replace the file (safetensors): give it the mode a plain
        # open() would (0666 less the umask), after the writer is done.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it gets the usual modes and is renamed onto
    `path` (which must not exist). A failure or a kill leaves no half-written `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        usual_modes(tmp)
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_folder_is_ours(out: str | Path, stage: str, own: set[str], kind: str) -> None:
    """Refuse an output folder that holds anything `stage` does not write (`own`: its top-level names), or a
    manifest of another stage: no stage writes into a folder that belongs to another or to the user."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in own and not (p.name.startswith(".") and p.name.endswith(".tmp")))
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            other = json.loads(manifest.read_text(encoding="utf-8")).get("kind")
        except (ValueError, AttributeError):
            other = "unreadable"
        if other != kind:
            foreign.insert(0, f"manifest.json of kind {other!r}")
    if foreign:
        raise FileExistsError(f"--out {out} holds what {stage} did not make ({', '.join(foreign[:5])}"
                              f"{', ...' if len(foreign) > 5 else ''}); nothing was written there: choose another "
                              f"--out")


def hold_folder_lock(out: str | Path, stage: str) -> Any:
    """Hold OUT/.lock for as long as this process lives (the kernel drops it when the process dies, SIGKILL
    included): a second run into a folder that a live run writes is refused, naming the holder."""
    import fcntl

    path = Path(out) / ".lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FileExistsError(f"--out {out} is in use by a live {stage} run ({holder}); wait for it to end or "
                              f"choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    return handle


def usual_modes(folder: str | Path) -> None:
    """Give a folder and everything in it the modes a plain mkdir/open would (0777/0666 less the umask): mkdtemp
    makes folders 0700, and transformers writes safetensors 0600, which colleagues on shared storage cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    root = Path(folder)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from e


def read_text(path: str | Path) -> str:
    """A text file a user hands us (JSON, JSONL, YAML, TSV), by `decode_utf8`; OSErrors pass through."""
    return decode_utf8(path, Path(path).read_bytes())


def decode_utf8(path: str | Path, raw: bytes) -> str:
    """The text of a file's bytes without a leading byte-order mark (Windows tools write one, and GLUE's MRPC files
    ship with one), or a DataError naming the line and byte that are not UTF-8."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_jsonl(path: str | Path, raw: bytes | None = None) -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSONL file; a DataError names the file and line of the
    first line that is not UTF-8 or not JSON. Lines end at "\n" only: JSON strings may hold U+2028 and friends."""
    path = Path(path)
    if raw is None:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    text = decode_utf8(path, raw)
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line, object_pairs_hook=_unique_keys)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON: {e.msg} (column {e.colno})") from None
        except _DuplicateKey as e:
            raise DataError(f"{path}:{number}: field {e.args[0]!r} appears twice in one record") from None
    return rows
