"""The sweep's ledger: which job ran each cell's attempts and each shared stage, and how each ended.
Its own module so that `status` reads it without importing the scheduler (submitit, the planners)."""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .layout import read_json, write_json

FIX = "restore it from a backup, or delete it: status then falls back on DONE markers and MLflow runs"


class Ledger:
    """`sweeps/<name>/ledger.json`: cell → attempts (job id, launcher, when, how it ended), and shared
    stage → its last job. Each change is made under a lock on the file as it is on disk then, and
    written atomically, so that two sweep processes never lose each other's updates."""

    def __init__(self, path: Path):
        self.path = path
        self.cells: dict[str, dict] = {}
        self.stages: dict[str, dict] = {}
        self._load()

    def _load(self) -> None:
        data = read_json(self.path, FIX) if self.path.is_file() else {}
        if data and "cells" not in data:  # the first version held cells only
            data = {"cells": data}
        self.cells, self.stages = data.get("cells", {}), data.get("stages", {})

    def _update(self, change: Callable[[], Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._load()
            change()
            write_json(self.path, {"cells": self.cells, "stages": self.stages})

    def queued(self, cell: str, axes: Mapping[str, str], owner: Mapping[str, Any]) -> None:
        """A cell taken by a local sweep process (`owner`: its pid, host, start) that will start it when
        a worker is free: PENDING while that process lives."""
        def change() -> None:
            entry = self.cells.setdefault(cell, {**axes, "attempts": []})
            entry["attempts"].append({"job_id": None, "launcher": "local", "queued_at": time.time(),
                                      "state": "QUEUED", "owner": dict(owner)})
        self._update(change)

    def submitted(self, cell: str, job_id: str, axes: Mapping[str, str], launcher: str,
                  **process: Any) -> None:
        """A new attempt (in place of the cell's QUEUED one); `process` says how to tell a local job's
        process is still this job's."""
        def change() -> None:
            entry = self.cells.setdefault(cell, {**axes, "attempts": []})
            if entry["attempts"] and entry["attempts"][-1].get("state") == "QUEUED":
                entry["attempts"].pop()
            entry["attempts"].append({"job_id": job_id, "launcher": launcher, "submitted_at": time.time(),
                                      "state": "SUBMITTED", **process})
        self._update(change)

    def stage_submitted(self, stage: str, job_id: str) -> None:
        self._update(lambda: self.stages.__setitem__(stage, {"job_id": job_id, "submitted_at": time.time()}))

    def ended(self, cell: str, state: str, error: str | None = None) -> None:
        def change() -> None:
            attempt = self.cells[cell]["attempts"][-1]
            attempt.update(state=state, ended_at=time.time())
            if error:
                attempt["error"] = error[-2000:]
        self._update(change)
