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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

COMPLETE = ".complete"


def is_built(path: Path) -> bool:
    return (path / COMPLETE).is_file()


@contextmanager
def holding_lock(path: Path, take: bool = True) -> Iterator[None]:
    """The stage's lock for the block (concurrent builders of `path` take turns); `take=False`: none."""
    if not take:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_stage(path: Path, build: Callable[[Path], None]) -> None:
    """Build into a temporary sibling with `build(tmp_dir)`, mark it complete, and rename it into place."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        (tmp / COMPLETE).touch()
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_once(path: Path, build: Callable[[Path], None], what: str) -> Path:
    """Return `path`, building it with `build(tmp_dir)` first if no one has yet."""
    path = Path(path)
    if is_built(path):
        log.info("%s: reusing cached %s", what, path)
        return path
    with holding_lock(path):
        if is_built(path):
            log.info("%s: built by another process meanwhile, reusing %s", what, path)
            return path
        log.info("%s: building %s", what, path)
        write_stage(path, build)
    return path


def build_once_collective(path: Path, build: Callable[[Path], None], what: str) -> Path:
    """`build_once` for a stage every rank of the job builds together (a DeepSpeed stage): rank 0 holds
    the lock and says whether to build; every rank then calls `build`, which writes the stage's files
    on rank 0 alone (into the directory renamed into place; the other ranks get a scratch one)."""
    import tempfile

    from .distributed import from_rank0, init_distributed, launched_ranks, wait_for_ranks

    path = Path(path)
    if launched_ranks()[1] == 1:
        return build_once(path, build, what)
    rank, world = init_distributed()
    # rank 0 may wait on the lock for as long as another job builds the stage: the others wait for its
    # word on the file system, not in a collective that would time out
    with holding_lock(path, take=rank == 0):
        if not from_rank0(path.parent, f"build-{path.name}", lambda: not is_built(path)):
            log.info("%s: reusing cached %s", what, path)
            return path
        log.info("%s: building %s over %d ranks", what, path, world)
        if rank == 0:
            write_stage(path, build)
        else:
            scratch = Path(tempfile.mkdtemp(prefix="rs-stage-"))
            try:
                build(scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    wait_for_ranks(path.parent, f"built-{path.name}")  # the stage is in place before any rank reads it
    return path


def checkpoint_dir(stage_dir: Path) -> Path:
    """Where a stage keeps its checkpoints while it is built: beside it, outliving a failed attempt's
    temporary directory, removed once the stage is complete."""
    stage_dir = Path(stage_dir)
    return stage_dir.parent / f".{stage_dir.name}.checkpoints"


def drop_checkpoints(stage_dir: Path) -> None:
    """A complete stage's checkpoints are no longer needed."""
    shutil.rmtree(checkpoint_dir(stage_dir), ignore_errors=True)


def build_resumable(path: Path, build: Callable[[Path, Path], None], what: str) -> Path:
    """`build_once_collective` for a stage that keeps checkpoints while it is built: `build(tmp_dir,
    checkpoint_dir)`; a later attempt finds them, and they are dropped once the stage is complete."""
    path = Path(path)
    built = build_once_collective(path, lambda tmp: build(tmp, checkpoint_dir(path)), what)
    drop_checkpoints(path)
    return built
