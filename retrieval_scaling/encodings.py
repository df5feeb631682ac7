"""Corpus encodings of one model, persisted as shards and keyed by content.

An `EncodingStore` is a directory of shard files (`shard-<hash>.npz`), each holding the content keys of
its documents and their reps, as the model's paradigm writes them (`Paradigm.shard_arrays`): dense, an
(n, d) array in `eval.store_dtype` (float16 halves the store; the searches, `corpus_search`, score the
stored values exactly, in float32; a shard whose values would overflow float16 is stored in float32
instead); sparse, CSR with float32 weights.

A document's key is a hash of its text and the length it is truncated to, never its collection or id,
so collections whose corpora are the same (MS MARCO dev, DL19, DL20) or overlap (FEVER, Climate-FEVER)
encode each distinct document once. A shard is written to a temporary name and renamed, so an
evaluation killed mid-corpus keeps every shard it finished and its next attempt encodes only the rest.
Over W ranks, new shards are encoded round-robin (shard j on rank j mod W). Before a store grows, the
free space of its file system is checked against what the new shards will take.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config_checks import check_choice
from .disk import human_size
from .distributed import balanced_shards, from_rank0, wait_for_ranks
from .errors import UserError
from .layout import write_via
from .shard_search import HostSearch, TorchSearch
from .store_format import KEY, KEY_BYTES, STORE_DTYPES, store_dtype

log = logging.getLogger(__name__)

# texts, max length in tokens, progress label -> their reps, in the host form of the store's paradigm
EncodeFn = Callable[[list[str], int, str], Any]
# what reading a damaged shard raises: a bad CRC or header (zipfile), a truncated array (numpy), a lost member
DAMAGED = (zipfile.BadZipFile, ValueError, EOFError, KeyError, OSError)


def store_settings(eval_cfg: Mapping[str, Any], paradigm, arch, device: Any = "cpu",
                   step0: bool = False) -> dict[str, Any]:
    """How an evaluation's encodings are stored and searched: `eval.store_dtype`, the bytes a document
    is planned to take (`paradigm.doc_bytes` for a model of shapes `arch`, at the passage length), and
    `eval.search`'s searcher on the encoder's `device` (a torch device)."""
    planned = paradigm.doc_bytes(arch, eval_cfg, float(eval_cfg.get("passage_max_len") or 0), step0)
    return {"store_dtype": store_dtype(eval_cfg), "planned_doc_bytes": planned,
            "searcher": paradigm.searcher(str(eval_cfg.get("search") or "auto"), device)}


def doc_key(text: str, max_len: int) -> bytes:
    """What identifies an encoding: the text and the length it is truncated to."""
    return hashlib.blake2b(f"{max_len}\x00{text}".encode(), digest_size=KEY_BYTES).digest()


def shard_name(keys: np.ndarray) -> str:
    return "shard-" + hashlib.blake2b(np.ascontiguousarray(keys).tobytes(), digest_size=8).hexdigest()


def contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which of `keys` are in `sorted_keys` (both `KEY` arrays)."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


@dataclass
class CorpusView:
    """A corpus as the store holds it: for each shard with any of its documents, the rows that are
    its documents and the corpus position of each (the first, where texts repeat); `repeats` lists
    the further positions of a repeated text, by first position."""

    label: str
    size: int
    rows: dict[str, tuple[np.ndarray, np.ndarray]]  # shard name -> (rows, first positions), by position
    repeats: dict[int, list[int]] = field(default_factory=dict)


class EncodingStore:
    """Document reps of one model under `root`; `encode` makes new ones `shard_size` documents at a time,
    in the form `paradigm` (a `paradigms.Paradigm`) keeps, writes and searches."""

    def __init__(self, root: Path, encode: EncodeFn, paradigm, shard_size: int, rank: int = 0,
                 world: int = 1, store_dtype: str = "float16", planned_doc_bytes: int | None = None,
                 searcher: HostSearch | TorchSearch | None = None):
        self.root, self.encode, self.paradigm = Path(root), encode, paradigm
        self.shard_size, self.rank, self.world = max(1, int(shard_size)), rank, world
        self.store_dtype = check_choice("eval.store_dtype", store_dtype, tuple(STORE_DTYPES))
        self.planned_doc_bytes = planned_doc_bytes
        self.searcher = searcher or paradigm.searcher("host")
        self.root.mkdir(parents=True, exist_ok=True)
        self.encoded_docs = 0  # by this rank, in this process: what tests and logs count
        self.reused_shards = 0
        self.shard_reads = 0  # shards whose reps this rank read
        self.doc_nnz = 0  # values the corpus's documents hold, where that varies (`corpus_search`)
        self.keys: dict[str, np.ndarray] = {}  # shard name -> its documents' keys, as read so far
        self.known = np.empty(0, dtype=KEY)  # every key read so far, sorted

    # ---- on disk ----

    def shard_path(self, name: str) -> Path:
        return self.root / f"{name}.npz"

    def shard_names(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("shard-*.npz"))

    def read_keys(self, name: str) -> np.ndarray:
        """A shard's document keys, one `KEY` (16-byte) item each."""
        with np.load(self.shard_path(name)) as z:
            return np.ascontiguousarray(z["keys"]).view(KEY).ravel()

    def read_reps(self, name: str) -> Any:
        """A shard's reps, as its paradigm reads them back. A shard damaged since it was
        checked is removed, and the evaluation stops to be run again."""
        self.shard_reads += 1
        try:
            return self._read_reps(name)
        except DAMAGED as exc:
            self.shard_path(name).unlink(missing_ok=True)
            raise UserError(f"encodings shard {self.shard_path(name)} is damaged ({type(exc).__name__}: {exc}); it "
                            "was removed: run the evaluation again, which encodes its documents again") from None

    def _read_reps(self, name: str) -> Any:
        with np.load(self.shard_path(name)) as z:
            return self.paradigm.from_arrays(z)

    def write_shard(self, name: str, keys: np.ndarray, reps) -> None:
        arrays = {"keys": np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), KEY_BYTES)}
        arrays.update(self.paradigm.shard_arrays(reps, self.store_dtype))
        write_via(self.shard_path(name), lambda tmp: np.savez(tmp, **arrays))

    # ---- encoding ----

    def ensure(self, texts: Sequence[str], max_len: int, label: str) -> CorpusView:
        """Every distinct text of this corpus encoded (this rank's share of the missing shards), and
        the corpus's view of the store. Collective: every rank calls it with the same corpus. Keys are
        kept as sorted arrays, not Python sets: a paper-sized evaluation holds ~35M of them."""
        keys = np.frombuffer(b"".join(doc_key(t, max_len) for t in texts), dtype=KEY)
        distinct, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        self.paradigm.check_corpus(label, len(distinct), max_len)
        firsts = first[inverse.ravel()]
        again = np.flatnonzero(firsts != np.arange(len(keys)))
        repeats: dict[int, list[int]] = {}
        for pos in again:
            repeats.setdefault(int(firsts[pos]), []).append(int(pos))
        if self.rank == 0 and not self.keys:  # this process's first look: shards of an earlier attempt
            self.drop_damaged()
        self.wait("store-read")  # every rank reads the same store before any writes to it
        self.refresh()
        new_here = ~contains(self.known, distinct)
        order = np.argsort(first[new_here], kind="stable")  # by corpus position
        missing_keys, missing_first = distinct[new_here][order], first[new_here][order]
        self.check_space(len(missing_keys), self.planned_doc_bytes, label)
        self.wait("store-planned")
        plan = balanced_shards(len(missing_keys), self.shard_size, self.world)
        log.info("%s: %d documents, %d distinct; %d already encoded, %d to encode in %d shard(s) over %d rank(s)",
                 label, len(texts), len(distinct), len(distinct) - len(missing_keys), len(missing_keys), len(plan),
                 self.world)
        mine = [(j, part) for j, part in enumerate(plan) if j % self.world == self.rank]
        todo = sum(len(missing_keys[part]) for _, part in mine)
        start, done = time.time(), 0
        for n, (j, part) in enumerate(mine, start=1):
            chunk = missing_keys[part]
            reps = self.encode([texts[p] for p in missing_first[part]], max_len, f"{label} shard {j + 1}/{len(plan)}")
            name = shard_name(chunk)
            self.write_shard(name, chunk, reps)
            self.encoded_docs += len(chunk)
            done += len(chunk)
            # what this rank's shards still to come need, at the size a shard really takes
            self.check_space(todo - done, self.shard_path(name).stat().st_size / len(chunk), label, every_rank=False)
            rate = done / max(time.time() - start, 1e-9)
            log.info("%s: rank %d encoded shard %d/%d (%d/%d of its documents, %.1f docs/s)", label, self.rank, n,
                     len(mine), done, todo, rate)
        self.wait("shards-written")  # every shard is on disk before anyone searches
        self.refresh()
        new = {shard_name(missing_keys[part]) for part in plan}
        rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, stored in self.keys.items():
            at = np.minimum(np.searchsorted(distinct, stored), len(distinct) - 1)
            inside = np.flatnonzero(distinct[at] == stored)
            if len(inside):
                positions = first[at[inside]]
                by_position = np.argsort(positions, kind="stable")
                rows[name] = (inside[by_position], positions[by_position].astype(np.int64))
        reused = len(set(rows) - new)
        self.reused_shards += reused
        log.info("%s: %d shard(s) hold its documents, %d of them reused from before", label, len(rows), reused)
        return CorpusView(label, len(texts), rows, repeats)

    def check_space(self, documents: int, per_doc: float | None, label: str, every_rank: bool = True) -> None:
        """A clear error, before anything is written, when `documents` new encodings of `per_doc` bytes
        would not fit the store's file system. `every_rank`: rank 0 measures and every rank decides on
        its figure, so all stop together."""
        if not documents or not per_doc:
            return
        def free() -> int:
            return shutil.disk_usage(self.root).free
        free_bytes = from_rank0(self.root, "store-free", free) if every_rank else free()
        needed = int(documents * per_doc)
        if needed > free_bytes:
            raise UserError(f"{self.root}: the encodings of {label} need {human_size(needed)} more "
                            f"({documents} documents × {per_doc:.0f} bytes), and {human_size(free_bytes)} is "
                            "free there; free space on that file system or move the sweep (sweep.root) to one "
                            "with room.")

    def wait(self, name: str) -> None:
        """Every rank of the job here, waiting on the store's file system: one rank's last shard can take
        longer than a collective may wait."""
        wait_for_ranks(self.root, name)

    def drop_damaged(self) -> None:
        """Remove the shards an earlier attempt left that cannot be read whole (a disk error, a copy cut
        short): they are a cache, so their documents are simply encoded again. Each is read once, here."""
        for name in self.shard_names():
            path = self.shard_path(name)
            try:
                with np.load(path) as z:
                    for member in z.files:
                        z[member]  # reading a member whole checks its CRC
            except DAMAGED as exc:
                log.warning("encodings shard %s is damaged (%s: %s): removed, its documents are encoded again",
                            path, type(exc).__name__, exc)
                path.unlink(missing_ok=True)

    def refresh(self) -> None:
        """Read the keys of shards this process has not seen yet (other ranks', an earlier attempt's)."""
        fresh = []
        for name in self.shard_names():
            if name not in self.keys:
                self.keys[name] = self.read_keys(name)
                fresh.append(self.keys[name])
        if fresh:
            self.known = np.sort(np.concatenate([self.known, *fresh]))
