"""geokd's errors, and how a stage reports them.

Everything a user can get wrong (an option, a config file, input data, a feature store, a folder) raises a
`GeokdError` whose message names the option, file, line or field. A stage turns it into one line on stderr and
exit status 2 (`run_stage`); any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable

EXIT_USER_ERROR = 2
ERROR_DIR_VAR = "GEOKD_ERROR_DIR"  # set by runtime.launch_local_ranks: where its ranks leave their one-line error


class GeokdError(Exception):
    """A mistake in what the user gave; the message says which option, file or field, and what to do."""


class ConfigError(GeokdError, ValueError):
    """A config file or option the stage cannot use."""


class DataError(GeokdError, ValueError):
    """Input data (records, prepared shards, benchmark sets) the pipeline cannot use."""


class StoreError(GeokdError, RuntimeError):
    """A feature store that cannot be used as asked; the message names the folder or shard and what is wrong."""


class TrainingDiverged(GeokdError, RuntimeError):
    """Training reached a non-finite loss: the message says at which step and what to change."""


# OS errors about a path the user named (a missing input, an output that exists, an unwritable or full
# folder) are the user's to fix, not bugs: their message carries the path.
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def os_error_message(error: OSError) -> str:
    """`PATH: reason` for an OS error raised by the system; our own OS errors already say it in words."""
    if error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def run_stage(name: str, body: Callable[[], int | None]) -> int:
    """Run a stage's recipe; a user's mistake becomes `[name] error: ...` on stderr and exit status 2."""
    try:
        return int(body() or 0)
    except GeokdError as e:
        message = str(e)
    except OSError as e:
        if not isinstance(e, _USER_OS_ERRORS) and e.errno not in _USER_ERRNOS:
            raise
        message = os_error_message(e)
    except KeyboardInterrupt:
        print(f"[{name}] interrupted", file=sys.stderr)
        return 130
    report(f"[{name}] error: {message}")
    return EXIT_USER_ERROR


def report(line: str) -> None:
    """Say a user's mistake once per job: ranks started by runtime.launch_local_ranks leave it to the launcher
    (which prints each distinct message once); under other launchers, local rank 0 of each node says it."""
    error_dir = os.environ.get(ERROR_DIR_VAR)
    if error_dir and os.path.isdir(error_dir):
        with open(os.path.join(error_dir, f"rank{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(line + "\n")
    elif os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, file=sys.stderr)
