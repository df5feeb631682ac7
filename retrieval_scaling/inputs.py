"""A sweep's inputs: what its cells read from outside the sweep — hub weights and tokenizers (backbones,
teacher), ir_datasets collections, local BEIR/TREC files — where `prepare` puts them, and the manifest
that says each one is complete.

`<sweep.inputs_dir>/` holds `hub/` (a Hugging Face hub cache), `ir_datasets/` (an ir_datasets home) and
`manifest.json`: one entry per input with its source, size and content hash (SHA-256 of every file, the
hash the hub gives its large files). An entry is written only after its input is whole and hashed, so
a prepare killed midway leaves no entry for what it was fetching, and a rerun fetches only what has no
entry or fails its hashes. Jobs never download: they read these caches with the hub and transformers
in offline mode (`work_offline`)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HUB, IR_DATASETS, LOCAL = "hub", "ir_datasets", "local"
FETCHED = (HUB, IR_DATASETS)  # kinds a job cannot read unless prepare fetched them
# Hub and ir_datasets switches that make a job fail at once instead of waiting on a network it lacks.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass(frozen=True)
class Input:
    """One thing the sweep reads: a hub repo, an ir_datasets id, or a local file or directory."""

    kind: str
    source: str  # hub repo id, ir_datasets id, or absolute local path
    revision: str | None = None  # hub branch, tag or commit
    users: tuple[str, ...] = field(default=(), compare=False)  # "model llama3_8b", "eval fiqa", …

    @property
    def pinned(self) -> str:
        """`@<revision>` where one other than the default branch is asked for, else nothing."""
        return f"@{self.revision}" if self.revision not in (None, "main") else ""

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.source}{self.pinned}"

    def describe(self) -> str:
        return f"{self.kind} {self.source}{self.pinned} ({', '.join(self.users)})"


def inputs_dir(cfg: Mapping[str, Any]) -> Path:
    return Path(cfg["sweep"]["inputs_dir"]).resolve()


def hub_cache(directory: Path) -> Path:
    return Path(directory) / "hub"


def ir_datasets_home(directory: Path) -> Path:
    return Path(directory) / "ir_datasets"


def manifest_path(directory: Path) -> Path:
    return Path(directory) / MANIFEST


# --- what a sweep needs ------------------------------------------------------------------------------

def needed_inputs(cfgs: Sequence[Mapping[str, Any]]) -> list[Input]:
    """Every input of these cells, once, with the config entries that read it."""
    users: dict[Input, list[str]] = {}
    for cfg in cfgs:
        for item, user in _cell_inputs(cfg):
            seen = users.setdefault(item, [])
            if user not in seen:
                seen.append(user)
    return [Input(i.kind, i.source, i.revision, tuple(u)) for i, u in users.items()]


def _cell_inputs(cfg: Mapping[str, Any]) -> Iterator[tuple[Input, str]]:
    from .data import source_files, training_spec

    model = cfg["model"]
    if model.get("source") == "hub":
        yield _weights(model.get("name_or_path"), model.get("revision")), f"model {model['name']}"
    teacher = cfg["data"]["teacher"]
    where = teacher.get("name_or_path") or teacher.get("path")
    if teacher["name"] != "bm25" and where:
        yield _weights(where, teacher.get("revision")), f"teacher {teacher['name']}"
    specs = [(training_spec(cfg["data"]), cfg["data"].get("root"), f"data {cfg['data']['name']}")]
    specs += [(dict(c), cfg["eval"].get("root"), f"eval {c['name']}") for c in cfg["eval"]["collections"].values()]
    for spec, root, user in specs:
        if spec.get("source") == "ir_datasets":
            yield Input(IR_DATASETS, spec["id"]), user
        else:
            for path in _local_paths(lambda s=spec, r=root: source_files(s, r).values(), user):
                yield Input(LOCAL, str(path)), user
    run = cfg["data"]["negatives"].get("run")
    if cfg["data"]["negatives"].get("miner") == "run" and run:
        yield Input(LOCAL, str(Path(run).resolve())), f"data {cfg['data']['name']} negatives"


def _weights(where: str | None, revision: str | None) -> Input:
    if where and Path(where).expanduser().exists():
        return Input(LOCAL, str(Path(where).expanduser().resolve()))
    return Input(HUB, str(where), revision or "main")


def _local_paths(files, user: str) -> list[Path]:
    try:
        return [Path(p).resolve() for p in files()]
    except DataError as exc:  # no data root, or no such collection: the sweep's own check says it better
        raise DataError(f"{user}: {exc}") from None


# --- the manifest ------------------------------------------------------------------------------------

def read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    from .layout import read_json

    path = manifest_path(directory)
    if not path.is_file():
        return {}
    return read_json(path, "delete it and run prepare again, which verifies what is on disk and rewrites it")


def record(directory: Path, item: Input, entry: Mapping[str, Any]) -> None:
    """Add one input's entry (read, merge, write whole under the manifest's lock: prepares running at
    once each add theirs)."""
    from .layout import write_json
    from .stages import holding_lock

    with holding_lock(manifest_path(directory)):
        manifest = read_manifest(directory)
        manifest[item.key] = dict(entry)
        write_json(manifest_path(directory), dict(sorted(manifest.items())))


def state(item: Input, manifest: Mapping[str, Mapping[str, Any]], directory: Path) -> str:
    """'prepared', 'missing' (no entry) or 'damaged' (a recorded file is gone or has another size): a stat
    of each file, cheap enough for every submission. `prepare` also checks the hashes."""
    entry = manifest.get(item.key)
    if entry is None:
        return "missing"
    return "damaged" if damaged_files(entry, directory, hashes=False) else "prepared"


def damaged_files(entry: Mapping[str, Any], directory: Path, hashes: bool = True) -> list[str]:
    """The recorded files that are gone, have another size or (`hashes`) no longer hash to the manifest's."""
    base = entry_path(entry, directory)
    return [rel for rel, meta in entry["files"].items()
            if not (base / rel).is_file() or (base / rel).stat().st_size != meta["size"]
            or (hashes and sha256_file(base / rel) != meta["sha256"])]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def entry_path(entry: Mapping[str, Any], directory: Path) -> Path:
    """Where an entry's files are: under the inputs directory (fetched) or where they are (local)."""
    return Path(entry["path"]) if entry["kind"] == LOCAL else Path(directory) / entry["path"]


LOCAL_STATE = "local, checked at submission"


def input_states(cfgs: Sequence[Mapping[str, Any]]) -> list[tuple[Input, str]]:
    """Each input these cells read, and its `state` (`LOCAL_STATE` for a local one: the sweep loads it)."""
    directory = inputs_dir(cfgs[0])
    manifest = read_manifest(directory)
    return [(item, state(item, manifest, directory) if item.kind in FETCHED else LOCAL_STATE)
            for item in needed_inputs(cfgs)]


def unprepared(cfgs: Sequence[Mapping[str, Any]]) -> list[tuple[Input, str]]:
    """(input, 'missing' | 'damaged') for each fetched input these cells need that is not prepared."""
    return [(item, s) for item, s in input_states(cfgs) if s in ("missing", "damaged")]


def prepare_command(argv: Sequence[str] | None = None) -> str:
    """The prepare command for the sweep command line `argv` (this process's, by default), with any
    password or token in it masked (a tracking URI may carry one)."""
    import shlex
    import sys

    from .credentials import redact

    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("sweep.dry_run")]
    return redact(" ".join(["python -m retrieval_scaling.prepare", *(shlex.quote(a) for a in args)]))


def check_prepared(cfgs: Sequence[Mapping[str, Any]]) -> None:
    """Every hub repo and ir_datasets collection the cells read is in the inputs' manifest, whole: jobs
    run offline, so one that is not would fail on a compute node, or wait for a download there."""
    missing = unprepared(cfgs)
    if missing:
        listed = "; ".join(f"{item.describe()}: {state}" for item, state in missing)
        raise DataError(f"{len(missing)} input(s) of this sweep are not prepared — {listed}. Nothing was submitted: "
                        f"fetch them on a node with network access with `{prepare_command()}`, then run the sweep "
                        "again.")


def print_inputs(cfgs: Sequence[Mapping[str, Any]]) -> None:
    """The dry run's view of the inputs: each one, what reads it, and whether it is prepared."""
    from .status import print_table

    try:
        states = input_states(cfgs)
    except DataError as exc:
        print(f"inputs: not listed ({exc})")
        return
    print_table([{"input": f"{i.kind} {i.source}", "used by": ", ".join(i.users), "state": s} for i, s in states],
                title=f"inputs of the sweep (prepared into {inputs_dir(cfgs[0])})",
                columns=("input", "used by", "state"))
    todo = sum(s in ("missing", "damaged") for _, s in states)
    print(f"{todo} input(s) not prepared: fetch them with `{prepare_command()}`" if todo else
          "every input the jobs fetch is prepared")


def work_offline(cfg: Mapping[str, Any]) -> None:
    """In a job, before anything imports the hub's or ir_datasets' libraries: read the prepared caches
    only, and fail at once where something is not there (no job waits on a network it may not have)."""
    directory = inputs_dir(cfg)
    os.environ.update(OFFLINE_ENV)
    os.environ["HF_HUB_CACHE"] = str(hub_cache(directory))
    os.environ["IR_DATASETS_HOME"] = str(ir_datasets_home(directory))
