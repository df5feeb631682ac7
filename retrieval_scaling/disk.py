"""What a sweep holds on disk, and the encoding stores that no cell needs any more.

An evaluation keeps its encoded shards until it finishes (a requeued one resumes from them) and then
removes them. A store outlives that only when its evaluation can never finish or resume: the weights it
encoded were replaced, its cell finished without removing it, or another cell finished the step-0
evaluation it was for. `stale_stores` finds exactly those; the sweep removes them before it submits, and
`status` reports the bytes a sweep holds, by kind.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError
from .layout import DONE, FINAL, STEP0_STORE_SUFFIX, sweep_dir

log = logging.getLogger(__name__)

KINDS = ("checkpoints", "encodings", "runs", "other", "shared cache")
# How a full disk shows itself: the OS's error, SQLite's through MLflow, torch's zip writer cut short.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_TEXT = re.compile(r"No space left on device|database or disk is full|Disk quota exceeded|unexpected pos \d+")
READ_ONLY_ERRNOS = (errno.EROFS,)


class DiskFull(UserError):
    """A write that did not fit its file system: never worth retrying."""


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
        return True
    return FULL_TEXT.search(str(exc)) is not None


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes of the file system holding `path` (or its nearest existing parent)."""
    at = Path(path).absolute()
    while not at.exists() and at != at.parent:
        at = at.parent
    try:
        return shutil.disk_usage(at).free
    except OSError:
        return None


def disk_full(path: str | os.PathLike, what: str) -> DiskFull:
    """The one line for a full disk: where, how much is free, what was being written, what to do."""
    free = free_bytes(path)
    room = "" if free is None else f" ({human_size(free)} free)"
    return DiskFull(f"no space left on the file system of {path}{room} while writing {what}: free space there "
                    "(or move sweep.root / sweep.cache_dir to a larger one), then run the same command again; "
                    "finished work is kept")


def human_size(n: float) -> str:
    """Bytes for people: 3 significant digits, decimal units."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (links not followed; files that vanish meanwhile skipped)."""
    total = 0
    stack = [Path(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
    return total


def cell_dirs(root: str | os.PathLike, name: str) -> Iterator[Path]:
    cells = sweep_dir(root, name) / "cells"
    if cells.is_dir():
        yield from sorted(p for p in cells.iterdir() if p.is_dir())


def sweep_disk(root: str | os.PathLike, name: str, cache_dir: str | os.PathLike) -> dict[str, int]:
    """Bytes a sweep holds, by kind: its cells' checkpoints, encodings (its cells' and the step-0
    stores in the cache) and run files, the rest of its directory, and the cache it shares with the
    other sweeps under its root (prepared inputs, backbones, tokens)."""
    out = dict.fromkeys(KINDS, 0)
    base = sweep_dir(root, name)
    for cell in cell_dirs(root, name):
        for kind in ("checkpoints", "runs"):
            out[kind] += tree_bytes(cell / kind)
        out["encodings"] += tree_bytes(cell / "eval")
    cells_total = sum(out.values())
    out["other"] = max(0, tree_bytes(base) - cells_total)
    stores = sum(tree_bytes(p) for p in (Path(cache_dir) / "step0-evals").glob(f"*{STEP0_STORE_SUFFIX}"))
    out["encodings"] += stores
    out["shared cache"] = max(0, tree_bytes(cache_dir) - stores)
    return out


def cache_dir_of(root: str | os.PathLike, name: str) -> Path:
    """The cache a sweep's cells use (their config's sweep.cache_dir), else the default beside them."""
    from omegaconf import OmegaConf

    for cell in cell_dirs(root, name):
        try:
            found = OmegaConf.select(OmegaConf.load(cell / "config.yaml"), "sweep.cache_dir", default=None)
        except (OSError, ValueError):
            continue
        if found:
            return Path(found)
    return Path(root) / ".cache"


def disk_line(usage: dict[str, int]) -> str:
    return "disk: " + " · ".join(f"{kind} {human_size(usage[kind])}" for kind in KINDS)


def stale_stores(root: str | os.PathLike, name: str, cache_dir: str | os.PathLike) -> list[Path]:
    """The encoding stores of a sweep that no evaluation will read again:
    - a cell's final-evaluation store (`eval/final-<weights hash>`) once the cell is DONE, or once its
      final weights are not the ones it encoded;
    - a step-0 store (in the cache, or an older one in a cell's `eval/`) once that step 0 is built."""
    from .identity import file_hash
    from .stages import is_built

    step0 = Path(cache_dir) / "step0-evals"
    stale = []
    for cell in cell_dirs(root, name):
        finals = sorted((cell / "eval").glob("final-*"))
        current = None
        if finals and not (cell / DONE).is_file() and (cell / FINAL).is_file():
            current = file_hash(cell / FINAL)
        if finals and (cell / DONE).is_file() and keeps_encodings(cell):
            finals = []  # the user asked to keep them (eval.keep_encodings)
        stale += [p for p in finals if current is None or p.name != f"final-{current}"]
        stale += [p for p in sorted((cell / "eval").glob("step0-*")) if is_built(step0 / p.name[len("step0-"):])]
    if step0.is_dir():
        stale += [p for p in sorted(step0.glob(f"*{STEP0_STORE_SUFFIX}"))
                  if is_built(step0 / p.name[:-len(STEP0_STORE_SUFFIX)])]
    return stale


def keeps_encodings(cell: Path) -> bool:
    from omegaconf import OmegaConf

    try:
        return bool(OmegaConf.select(OmegaConf.load(cell / "config.yaml"), "eval.keep_encodings", default=False))
    except (OSError, ValueError):
        return False


def remove_stale_stores(root: str | os.PathLike, name: str, cache_dir: str | os.PathLike) -> int:
    """Remove `stale_stores`; the bytes freed."""
    freed = 0
    for path in stale_stores(root, name, cache_dir):
        size = tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        freed += size
        log.info("removed %s (%.2f GB): no evaluation reads it again", path, size / 1e9)
    return freed
