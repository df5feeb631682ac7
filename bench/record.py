"""What every benchmark's JSON carries besides its figures: when, at which commit and on what machine
it was measured, so that docs/benchmarks.md (bench/report.py) can say so of each figure."""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def provenance() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    import torch

    return {"date": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": commit.strip() + ("+dirty" if dirty else ""), "cpu": cpu,
            "cpu_cores": len([line for line in lines if line.startswith("processor")]) or None,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}


def write_result(out: str | Path, result: dict[str, Any]) -> dict[str, Any]:
    """The result with its provenance first, written to `out` and printed as one JSON line."""
    full = {**provenance(), **result}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(full, indent=2) + "\n")
    print(json.dumps(full))
    return full
