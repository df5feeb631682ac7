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
import time
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
    def key(self) -> str:
        return f"{self.kind}:{self.source}" + (f"@{self.revision}" if self.revision not in (None, "main") else "")

    def describe(self) -> str:
        return f"{self.kind} {self.source}" + (f"@{self.revision}" if self.revision not in (None, "main") else "") \
            + f" ({', '.join(self.users)})"


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
    base = entry_path(entry, directory)
    for rel, meta in entry["files"].items():
        path = base / rel
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return "damaged"
    return "prepared"


def entry_path(entry: Mapping[str, Any], directory: Path) -> Path:
    """Where an entry's files are: under the inputs directory (fetched) or where they are (local)."""
    return Path(entry["path"]) if entry["kind"] == LOCAL else Path(directory) / entry["path"]


def unprepared(cfgs: Sequence[Mapping[str, Any]]) -> list[tuple[Input, str]]:
    """(input, 'missing' | 'damaged') for each fetched input these cells need that is not prepared."""
    directory = inputs_dir(cfgs[0])
    manifest = read_manifest(directory)
    states = [(item, state(item, manifest, directory)) for item in needed_inputs(cfgs) if item.kind in FETCHED]
    return [(item, s) for item, s in states if s != "prepared"]


# --- content hashes ----------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(base: Path, rels: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {rel: {"size": (base / rel).stat().st_size, "sha256": sha256_file(base / rel)} for rel in sorted(rels)}


def content_hash(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One hash of an input: of its files' names and hashes."""
    return hashlib.sha256("".join(f"{rel}\t{m['sha256']}\n" for rel, m in sorted(files.items())).encode()).hexdigest()


def damaged_files(entry: Mapping[str, Any], directory: Path) -> list[str]:
    """The recorded files that are gone or whose bytes no longer hash to the manifest's."""
    base = entry_path(entry, directory)
    bad = []
    for rel, meta in entry["files"].items():
        path = base / rel
        if not path.is_file() or path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            bad.append(rel)
    return bad


def _files_under(base: Path) -> list[str]:
    """Every regular file under `base`, as relative paths, leaving out locks and half-written files."""
    skip = (".lock", ".tmp", ".incomplete")
    return sorted(str(p.relative_to(base)) for p in base.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and not p.name.endswith(skip))


# --- fetching ----------------------------------------------------------------------------------------

def fetch(item: Input, directory: Path) -> dict[str, Any]:
    """Fetch (or, for a local input, find and validate) one input; its manifest entry."""
    if item.kind == HUB:
        commit, path = _fetch_hub(item, directory)
        rel = str(path.relative_to(directory))
        files = hash_files(path, _files_under(path))
        extra = {"revision": item.revision, "commit": commit}
    elif item.kind == IR_DATASETS:
        path = _fetch_ir_datasets(item, directory)
        rel = str(path.relative_to(directory))
        files = hash_files(path, _files_under(path))
        extra = {}
    else:
        path, rel = Path(item.source), item.source
        if not path.exists():
            raise DataError(f"{item.describe()}: {path} does not exist; put it there or fix the config that names it.")
        files = hash_files(path.parent, [path.name]) if path.is_file() else hash_files(path, _files_under(path))
        if path.is_file():
            files, rel = {path.name: files[path.name]}, str(path.parent)
        extra = {}
    return {"kind": item.kind, "source": item.source, **extra, "path": rel,
            "size": sum(m["size"] for m in files.values()), "sha256": content_hash(files), "files": files,
            "users": list(item.users),
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _fetch_hub(item: Input, directory: Path) -> tuple[str, Path]:
    """snapshot_download into the inputs' hub cache. Its credentials are the environment's (HF_TOKEN):
    none is passed, written or logged here. It resumes half-downloaded files and locks each blob."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    _discard_incomplete(hub_cache(directory) / f"models--{item.source.replace('/', '--')}" / "blobs")
    try:
        path = Path(snapshot_download(item.source, revision=item.revision, cache_dir=hub_cache(directory)))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise DataError(f"cannot fetch {item.describe()} from the hub ({type(exc).__name__}: {reason}); run prepare "
                        "where the hub is reachable, with HF_TOKEN set for gated models (what was fetched is kept)"
                        ) from None
    return path.name, path


def _discard_incomplete(blobs: Path) -> None:
    """A killed download leaves `<blob>.<random>.incomplete`, which no later download resumes (each takes
    a new name): up to a whole model's size of dead bytes. Under the input's lock, no live fetch owns one."""
    for part in blobs.glob("*.incomplete") if blobs.is_dir() else ():
        log.info("removing %s (%s) left by an interrupted download", part.name, human_size(part.stat().st_size))
        part.unlink(missing_ok=True)


def ir_datasets_dir(dataset_id: str, home: Path) -> Path:
    """The directory ir_datasets keeps a dataset's files in: its first path component, or the first two
    for BEIR, whose datasets each have their own (`beir/fiqa/test` → `<home>/beir/fiqa`)."""
    parts = dataset_id.split("/")
    return Path(home).joinpath(*parts[:2 if parts[0] == "beir" else 1])


def _fetch_ir_datasets(item: Input, directory: Path) -> Path:
    """ir_datasets' own download of the dataset, in a child process: ir_datasets fixes each dataset's
    directory from $IR_DATASETS_HOME when it is imported, so the home must be set before that."""
    import subprocess
    import sys

    home = ir_datasets_home(directory)
    code = "import sys; from retrieval_scaling.inputs import fetch_ir_dataset_here; fetch_ir_dataset_here(sys.argv[1])"
    env = {**os.environ, "IR_DATASETS_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-c", code, item.source], env=env, stderr=subprocess.PIPE, text=True)
    last = ""
    for line in proc.stderr:  # its progress, passed on; its last line says why it failed
        sys.stderr.write(line)
        last = line.strip() or last
    if proc.wait() != 0:
        reason = last.removeprefix("error: ")[:300]
        raise DataError(f"cannot fetch {item.describe()} ({reason}); run prepare where its sources are reachable "
                        "(what was fetched is kept)")
    return ir_datasets_dir(item.source, home)


def fetch_ir_dataset_here(dataset_id: str) -> None:
    """In the child: load the id and read each part once (ir_datasets downloads a file on its first read)."""
    import sys

    import ir_datasets

    from .data import fetch_ir_dataset

    try:
        fetch_ir_dataset(ir_datasets.load(dataset_id), dataset_id)
    except KeyError:
        print(f"error: ir_datasets has no dataset {dataset_id!r}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 — network, HTTP and checksum failures all end the same way
        print(f"error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(3)


def discard_damaged(entry: Mapping[str, Any], bad: Sequence[str], directory: Path) -> None:
    """Remove damaged files so that the next fetch downloads them again (a hub snapshot's file is a link
    to a blob: both go)."""
    base = entry_path(entry, directory)
    for rel in bad:
        path = base / rel
        if path.is_symlink():
            path.resolve().unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def prepare_input(item: Input, directory: Path) -> tuple[str, dict[str, Any]]:
    """One input made complete and verified, under its own lock: ('prepared' | 'fetched' | 'repaired' |
    'verified', its entry). Two prepares at once take turns on each input; the second finds it done."""
    from .stages import holding_lock

    lock = Path(directory) / "locks" / hashlib.sha256(item.key.encode()).hexdigest()[:16]
    with holding_lock(lock):
        entry = read_manifest(directory).get(item.key)
        outcome = "fetched"
        if entry is not None:
            bad = damaged_files(entry, directory)
            if not bad:
                return "prepared", entry
            if item.kind == LOCAL:
                outcome = "verified"
            else:
                log.warning("%s: %d damaged file(s), fetched again: %s", item.describe(), len(bad), ", ".join(bad[:5]))
                discard_damaged(entry, bad, directory)
                outcome = "repaired"
        elif item.kind == LOCAL:
            outcome = "verified"
        entry = fetch(item, directory)
        record(directory, item, entry)
        return outcome, entry


def work_offline(cfg: Mapping[str, Any]) -> None:
    """In a job, before anything imports the hub's or ir_datasets' libraries: read the prepared caches
    only, and fail at once where something is not there (no job waits on a network it may not have)."""
    directory = inputs_dir(cfg)
    os.environ.update(OFFLINE_ENV)
    os.environ["HF_HUB_CACHE"] = str(hub_cache(directory))
    os.environ["IR_DATASETS_HOME"] = str(ir_datasets_home(directory))


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"

