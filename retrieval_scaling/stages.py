"""Cached stages shared between cells: built once, atomically, whoever asks first.

A stage is a directory. Concurrent callers serialise on a lock file; the builder writes into a
temporary sibling and renames it into place, so a crash mid-build never leaves a half-built stage
that later cells would trust.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

COMPLETE = ".complete"


def is_built(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def build_once(path: Path, build: Callable[[Path], None], what: str) -> Path:
    """Return `path`, building it with `build(tmp_dir)` first if no one has yet."""
    path = Path(path)
    if is_built(path):
        log.info("%s: reusing cached %s", what, path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(path):
            log.info("%s: built by another process meanwhile, reusing %s", what, path)
            return path
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        log.info("%s: building %s", what, path)
        try:
            build(tmp)
            (tmp / COMPLETE).touch()
            shutil.rmtree(path, ignore_errors=True)
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
