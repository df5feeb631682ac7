"""One-shot fault injection, to test the orchestration against real failures.

`sweeps/<name>/faults.json` maps a cell id to one fault, fired once at a training step:
  {"<cell_id>": {"raise_at_step": 30}}                 an exception (the cell ends FAILED)
  {"<cell_id>": {"sleep_at_step": 30, "seconds": 120}}  a stall (to scancel, SIGKILL or time out)
A fault is removed from the file as it fires, so the resubmitted cell runs clean. Without the file
nothing happens.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from pathlib import Path
from typing import Any

from .layout import write_json
from .requeue import REQUEUE

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    pass


class Faults:
    def __init__(self, path: Path, cell: str):
        self.path, self.cell = Path(path), cell
        self.fault: dict[str, Any] | None = None
        if self.path.is_file():
            self.fault = json.loads(self.path.read_text()).get(cell)

    def _consume(self) -> None:
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            faults = json.loads(self.path.read_text())
            faults.pop(self.cell, None)
            write_json(self.path, faults)
        self.fault = None

    def at_step(self, step: int) -> None:
        """Call after optimizer step `step` (1-based) has completed."""
        fault = self.fault
        if not fault:
            return
        if fault.get("raise_at_step") == step:
            self._consume()
            raise InjectedFault(f"fault injected at step {step} ({self.path})")
        if fault.get("sleep_at_step") == step:
            self._consume()
            log.warning("fault injected at step %d: sleeping %s s", step, fault["seconds"])
            end = time.time() + float(fault["seconds"])
            while time.time() < end and not REQUEUE.pending:  # a requeue signal ends the stall
                time.sleep(0.5)
