"""`python -m retrieval_scaling.prepare <the sweep's overrides>` — fetch everything the sweep's cells read.

Run it once where there is network (a login node), with the same overrides as the sweep, before the
sweep: it downloads the backbones' weights and tokenizers and the teacher from the hub (credentials
from the environment: HF_TOKEN), the ir_datasets collections, and validates the local BEIR/TREC files,
all into `sweep.inputs_dir` with a manifest (see `inputs`). Safe to interrupt and to run twice at once;
a rerun fetches only what is missing or fails its hashes. The sweep then checks the manifest before it
submits anything, and its jobs run offline.

    python -m retrieval_scaling.prepare +grid=full
    python -m retrieval_scaling.sweep +grid=full
"""

from __future__ import annotations

import sys
from typing import Any


def run_prepare(cfgs: list[dict[str, Any]]) -> int:
    """Every input of these cells prepared and verified; a table of what was done. Exit status 0."""
    from .config_checks import check_cell
    from .disk import human_size
    from .fetching import prepare_input
    from .inputs import inputs_dir, manifest_path, needed_inputs
    from .scheduler import check_inputs, normalise_paths
    from .status import print_table

    for cfg in cfgs:
        check_cell(cfg)
    cfgs = [normalise_paths({**c, "sweep": {**c["sweep"], "dry_run": False}}) for c in cfgs]
    directory = inputs_dir(cfgs[0])
    rows = []
    for item in needed_inputs(cfgs):
        outcome, entry = prepare_input(item, directory)
        print(f"{outcome:>9}  {item.describe()}  {human_size(entry['size'])}", flush=True)
        rows.append({"input": f"{item.kind} {item.source}", "used by": ", ".join(item.users), "state": outcome,
                     "files": len(entry["files"]), "size": human_size(entry["size"]),
                     "sha256": entry["sha256"][:16]})
    check_inputs(cfgs)  # the local collections load and validate as the sweep will load them
    print_table(rows, title=f"inputs of sweep '{cfgs[0]['sweep']['name']}'",
                columns=("input", "used by", "state", "files", "size", "sha256"))
    print(f"manifest: {manifest_path(directory)}; the sweep's jobs read these offline")
    return 0


def cli() -> int:
    from . import sweep

    sweep.ACTION["verb"] = run_prepare
    return sweep.cli()


if __name__ == "__main__":
    sys.exit(cli())
