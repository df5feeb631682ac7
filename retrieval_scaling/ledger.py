"""The sweep's ledger: which job ran each cell's attempts and each shared stage, and how each ended.
Its own module so that `status` reads it without importing the scheduler (submitit, the planners)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path


class Ledger:
    """`sweeps/<name>/ledger.json`: cell → attempts (job id, launcher, when, how it ended), and shared
    stage → its last job. Written only by `sweep` processes, atomically."""

    def __init__(self, path: Path):
        self.path = path
        data = json.loads(path.read_text()) if path.is_file() else {}
        if data and "cells" not in data:  # the first version held cells only
            data = {"cells": data}
        self.cells: dict[str, dict] = data.get("cells", {})
        self.stages: dict[str, dict] = data.get("stages", {})

    def submitted(self, cell: str, job_id: str, axes: Mapping[str, str], launcher: str) -> None:
        entry = self.cells.setdefault(cell, {**axes, "attempts": []})
        entry["attempts"].append({"job_id": job_id, "launcher": launcher, "submitted_at": time.time(),
                                  "state": "SUBMITTED"})
        self.save()

    def stage_submitted(self, stage: str, job_id: str) -> None:
        self.stages[stage] = {"job_id": job_id, "submitted_at": time.time()}
        self.save()

    def ended(self, cell: str, state: str, error: str | None = None) -> None:
        attempt = self.cells[cell]["attempts"][-1]
        attempt.update(state=state, ended_at=time.time())
        if error:
            attempt["error"] = error[-2000:]
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"cells": self.cells, "stages": self.stages}, indent=2))
        os.replace(tmp, self.path)
