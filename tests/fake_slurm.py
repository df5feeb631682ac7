"""A fake SLURM at the command-line boundary, after dora's `fake_shep.py`: `sbatch`, `sacct`, `squeue`
and `scancel` as the sweep calls them, backed by one JSON file that a test reads and edits.

    python tests/fake_slurm.py <sbatch|sacct|squeue|scancel> [args...]     ($FAKE_SLURM_STATE: the file)

`sbatch` records the script's job name, array size and dependency, and answers as SLURM does
("Submitted batch job N"); nothing runs. `sacct` and `squeue` report each job (or array task) in
the state the test set, PENDING until then; `scancel` records the ids and marks them CANCELLED. The
real cluster's tests (test_slurm.py) keep what this cannot show: jobs that actually run.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

LIVE = ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "COMPLETING")


@contextmanager
def state():
    path = Path(os.environ["FAKE_SLURM_STATE"])
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {"next_id": 1000, "jobs": {}, "cancelled": []}
        yield data
        path.write_text(json.dumps(data, indent=2))


def sbatch(args: list[str]) -> None:
    script = Path(args[-1]).read_text()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.MULTILINE))
    options.update(dict(a[2:].split("=", 1) for a in args[:-1] if a.startswith("--") and "=" in a))
    array = options.get("array")
    with state() as data:
        job_id = str(data["next_id"])
        data["next_id"] += 1
        data["jobs"][job_id] = {"name": options.get("job-name"), "dependency": options.get("dependency"),
                                "kill_on_invalid_dep": options.get("kill-on-invalid-dep"),
                                "tasks": int(array.split("%")[0].split("-")[1]) + 1 if array else None,
                                "state": "PENDING", "task_states": {}}
    print(f"Submitted batch job {job_id}")


def rows() -> list[tuple[str, str]]:
    with state() as data:
        out = []
        for job_id, job in data["jobs"].items():
            if job["tasks"] is None:
                out.append((job_id, job["state"]))
            else:
                out += [(f"{job_id}_{i}", job["task_states"].get(str(i), job["state"])) for i in range(job["tasks"])]
        return out


def asked(args: list[str]) -> set[str]:
    ids = args[args.index("-j") + 1].split(",") if "-j" in args else []
    return set(ids)


def main(argv: list[str]) -> None:
    command, args = argv[0], argv[1:]
    if command == "sbatch":
        sbatch(args)
    elif command in ("sacct", "squeue"):
        wanted = asked(args)
        for job, word in rows():
            if (not wanted or job in wanted or job.split("_")[0] in wanted) and (command == "sacct" or word in LIVE):
                print(f"{job}|{word}")
    elif command == "scancel":
        with state() as data:
            for job_id in args:
                data["cancelled"].append(job_id)
                main_id, _, task = job_id.partition("_")
                job = data["jobs"].get(main_id)
                if job and task:
                    job["task_states"][task] = "CANCELLED"
                elif job:
                    job["state"] = "CANCELLED"
    else:
        sys.exit(f"fake_slurm: unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
