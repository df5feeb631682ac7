"""Fetching a sweep's inputs into the inputs directory, and checking them against the manifest's hashes
(the `prepare` verb's work; `inputs` says what is needed and where it lives)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .disk import human_size
from .errors import DataError
from .inputs import (
    HUB,
    IR_DATASETS,
    LOCAL,
    Input,
    damaged_files,
    entry_path,
    hub_cache,
    ir_datasets_home,
    read_manifest,
    record,
    sha256_file,
)

log = logging.getLogger(__name__)


# --- content hashes ----------------------------------------------------------------------------------

def hash_files(base: Path, rels: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {rel: {"size": (base / rel).stat().st_size, "sha256": sha256_file(base / rel)} for rel in sorted(rels)}


def files_hash(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One hash of an input: of its files' names and hashes."""
    return hashlib.sha256("".join(f"{rel}\t{m['sha256']}\n" for rel, m in sorted(files.items())).encode()).hexdigest()


def _files_under(base: Path) -> list[str]:
    """Every regular file under `base`, as relative paths, leaving out locks and half-written files."""
    skip = (".lock", ".tmp", ".incomplete")
    return sorted(str(p.relative_to(base)) for p in base.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and not p.name.endswith(skip))


# --- fetching ----------------------------------------------------------------------------------------

def fetch(item: Input, directory: Path) -> dict[str, Any]:
    """Fetch (or, for a local input, find and validate) one input; its manifest entry."""
    if item.kind in (HUB, IR_DATASETS):
        extra: dict[str, Any] = {}
        if item.kind == HUB:
            commit, path = _fetch_hub(item, directory)
            extra = {"revision": item.revision, "commit": commit}
        else:
            path = _fetch_ir_datasets(item, directory)
        rel, files = str(path.relative_to(directory)), hash_files(path, _files_under(path))
    else:
        path = Path(item.source)
        if not path.exists():
            raise DataError(f"{item.describe()}: {path} does not exist; put it there or fix the config that names it.")
        base, rels = (path.parent, [path.name]) if path.is_file() else (path, _files_under(path))
        rel, files, extra = str(base), hash_files(base, rels), {}
    return {"kind": item.kind, "source": item.source, **extra, "path": rel,
            "size": sum(m["size"] for m in files.values()), "sha256": files_hash(files), "files": files,
            "users": list(item.users),
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# What transformers and sentence-transformers never load: other frameworks' copies of the weights, and
# Meta's original checkpoint beside the converted one (as large again: 16 GB more for the 8B).
NOT_LOADED = ["original/*", "onnx/*", "openvino/*", "coreml/*", "*.h5", "*.msgpack", "*.onnx", "*.tflite", "*.ot",
              "*.gguf"]


def _fetch_hub(item: Input, directory: Path) -> tuple[str, Path]:
    """snapshot_download into the inputs' hub cache, of the files the loaders read (safetensors weights,
    or the PyTorch ones where a repo has no safetensors). Credentials are the environment's (HF_TOKEN):
    none is passed, written or logged here."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    _discard_incomplete(hub_cache(directory) / f"models--{item.source.replace('/', '--')}" / "blobs")
    try:
        files = HfApi().list_repo_files(item.source, revision=item.revision)
        pickled = ["*.bin", "*.pth", "*.pt"] if any(f.endswith(".safetensors") for f in files) else []
        path = Path(snapshot_download(item.source, revision=item.revision, cache_dir=hub_cache(directory),
                                      ignore_patterns=NOT_LOADED + pickled))
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


def _fetch_ir_datasets(item: Input, directory: Path) -> Path:
    """ir_datasets' own download of the dataset, in a child process: ir_datasets fixes each dataset's
    directory from $IR_DATASETS_HOME when it is imported, so the home must be set before that."""
    import subprocess
    import sys

    from .data import ir_datasets_dir

    home = ir_datasets_home(directory)
    code = ("import sys; from retrieval_scaling.fetching import fetch_ir_dataset_here; "
            "fetch_ir_dataset_here(sys.argv[1])")
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
