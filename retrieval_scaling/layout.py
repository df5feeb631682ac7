"""Where a sweep lives on disk, and how its files are named, read and written.

`<sweep.root>/<sweep.name>/` holds plan.json, ledger.json, the sweep's lock, and `cells/<cell_id>/`
(config.yaml, checkpoints, DONE). Names that become directories are checked here, so that no name
reaches outside the sweeps root; files are written whole or not at all."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CELL_ID = re.compile(r"[0-9a-f]{8}")
DONE = "DONE"


def check_name(key: str, value: Any) -> str:
    """A sweep or experiment name: letters, digits, '.', '_', '-', starting with a letter or digit."""
    text = "" if value is None else str(value)
    if not NAME.fullmatch(text) or ".." in text:
        raise ConfigError(f"{key}={text!r} is not a usable name: it names a directory under the sweeps root, so "
                          "use letters, digits, '.', '_' or '-' (no '/', no '..', not empty), e.g. msmarco-full")
    return text


def check_cell_id(value: Any) -> str:
    text = "" if value is None else str(value)
    if not CELL_ID.fullmatch(text):
        raise ConfigError(f"cell={text!r} is not a cell id (8 hex digits, as `status` lists them)")
    return text


def sweep_dir(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / check_name("sweep.name", name)


def cell_path(root: str | os.PathLike, name: str, cell: str) -> Path:
    return sweep_dir(root, name) / "cells" / check_cell_id(cell)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` whole: a temporary file beside it, flushed, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2))


def read_json(path: Path, fix: str) -> Any:
    """A JSON file the project wrote; a damaged one is a DataError naming it and `fix`."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is damaged ({exc}); {fix}") from None


def read_done(path: Path) -> Mapping[str, Any]:
    """A cell's DONE marker: the metrics its evaluation ended with."""
    return read_json(path, "delete it and resubmit the cell, which then re-evaluates from its final checkpoint")
