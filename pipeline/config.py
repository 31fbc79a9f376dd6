"""Stage configs: one dataclass per stage, loaded from YAML and overridden from the command line.

`--config file.yaml` supplies defaults; any `--field value` after it wins. Parsing is transformers'
`HfArgumentParser`, so lists are `--layers 2 4`, booleans `--flag` / `--flag false`.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import yaml

from pipeline.errors import ConfigError, DataError, run_stage
from pipeline.io import read_text

T = TypeVar("T")


def read_config_text(path: str | Path, what: str = "config") -> str:
    """The text of a config file, or a ConfigError naming the file and why it cannot be read."""
    try:
        return read_text(path)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from e
    except DataError as e:  # not UTF-8: the message names the line
        raise ConfigError(str(e)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = read_config_text(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level, got {type(data).__name__}")
    return data


def parse_config(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Build `cls` from `--config YAML` (optional) and command-line overrides."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a path to a YAML file")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    if "local_rank" not in {f.name for f in dataclasses.fields(cls)}:
        # The deepspeed launcher gives every rank --local_rank=N (LOCAL_RANK in the environment says the same):
        # every stage runs under it, not only train.
        argv = without_option(argv, "--local_rank")

    parser = HfArgumentParser(cls)

    def one_line(message: str) -> None:  # argparse's own refusals (a bad type or choice): one line, not its usage
        raise ConfigError(f"{message}; see --help")

    parser.error = one_line  # type: ignore[method-assign]
    if config_path is not None:
        values = load_yaml(config_path)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{config_path}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
                f"known fields: {', '.join(sorted(known))}"
            )
        parser.set_defaults(**values)
        # A field that is required on the command line is satisfied by the YAML file.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    config, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        options = sorted(f"--{f.name}" for f in dataclasses.fields(cls) if f.init)
        first = next((a for a in unknown if a.startswith("-")), unknown[0]).split("=")[0]
        near = difflib.get_close_matches(first, options, n=1)
        raise ConfigError(f"unknown option {first!r}" + (f" (did you mean {near[0]}?)" if near else "")
                          + f"; see --help (not used: {' '.join(unknown)})")
    return config


def without_option(argv: list[str], option: str) -> list[str]:
    """argv less `option VALUE` and `option=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-safe dict of a stage config, for manifests."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def stage_main(name: str, cls: type[T], recipe: Callable[[T], Any], argv: Sequence[str] | None = None) -> int:
    """A stage's `main`, the one contract every stage follows (tests/test_layering.py holds it): its config parsed
    from the command line (and --config YAML), its `check()` (every option, before any work or any write), then
    its recipe. A user's mistake becomes one line on stderr and exit 2; an int the recipe returns is the exit
    status, anything else 0."""
    def body() -> int:
        config = parse_config(cls, argv)
        config.check()
        result = recipe(config)
        return result if isinstance(result, int) else 0

    return run_stage(name, body)
