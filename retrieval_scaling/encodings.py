"""Corpus encodings of one model, persisted as shards and keyed by content, searched exactly over ranks.

An `EncodingStore` is a directory of shard files (`shard-<hash>.npz`), each holding the content keys of
its documents and their reps (dense: an (n, d) float32 array; sparse: CSR). A document's key is a hash
of its text and the length it is truncated to, never its collection or id, so collections whose
corpora are the same (MS MARCO dev, DL19, DL20) or overlap (FEVER, Climate-FEVER) encode each distinct
document once. A shard is written to a temporary name and renamed, so an evaluation killed mid-corpus
keeps every shard it finished and its next attempt encodes only the rest.

Over W ranks, new shards are encoded round-robin (shard j on rank j mod W), and each rank searches its
share of the corpus's shards; rank 0 merges the partial top-k lists. Hits are ordered by score, then by
corpus position, in every shard and in the merge, so the result is exactly brute force's whatever the
number of ranks or how the shards were cut (to the last bit of a dense score: see `topk`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse

from .distributed import balanced_shards, wait_for_ranks
from .layout import write_via
from .search import InvertedIndex, to_csr
from .topk import dense_top_k, merge_top_k, pad_top_k

log = logging.getLogger(__name__)

KEY_BYTES = 16
KEY = np.dtype(f"V{KEY_BYTES}")  # a key as one numpy item: sortable, searchable
# texts, max length in tokens, progress label -> (N, dim) reps: a float32 array, or CSR for sparse ones
EncodeFn = Callable[[list[str], int, str], "np.ndarray | sparse.csr_matrix"]


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
    """Document reps of one model under `root`; `encode` makes new ones `shard_size` documents at a time."""

    def __init__(self, root: Path, encode: EncodeFn, sparse_reps: bool, shard_size: int, rank: int = 0,
                 world: int = 1):
        self.root, self.encode, self.sparse = Path(root), encode, sparse_reps
        self.shard_size, self.rank, self.world = max(1, int(shard_size)), rank, world
        self.root.mkdir(parents=True, exist_ok=True)
        self.encoded_docs = 0  # by this rank, in this process: what tests and logs count
        self.reused_shards = 0
        self.doc_nnz = 0
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

    def read_reps(self, name: str) -> np.ndarray | sparse.csr_matrix:
        with np.load(self.shard_path(name)) as z:
            if self.sparse:
                return sparse.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
            return z["reps"]

    def write_shard(self, name: str, keys: np.ndarray, reps) -> None:
        arrays = {"keys": np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), KEY_BYTES)}
        if self.sparse:
            m = to_csr(reps)
            arrays.update(data=m.data, indices=m.indices, indptr=m.indptr, shape=np.array(m.shape))
        else:
            arrays["reps"] = np.ascontiguousarray(reps, dtype=np.float32)
        write_via(self.shard_path(name), lambda tmp: np.savez(tmp, **arrays))

    # ---- encoding ----

    def ensure(self, texts: Sequence[str], max_len: int, label: str) -> CorpusView:
        """Every distinct text of this corpus encoded (this rank's share of the missing shards), and
        the corpus's view of the store. Collective: every rank calls it with the same corpus. Keys are
        kept as sorted arrays, not Python sets: a paper-sized evaluation holds ~35M of them."""
        keys = np.frombuffer(b"".join(doc_key(t, max_len) for t in texts), dtype=KEY)
        distinct, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        firsts = first[inverse.ravel()]
        again = np.flatnonzero(firsts != np.arange(len(keys)))
        repeats: dict[int, list[int]] = {}
        for pos in again:
            repeats.setdefault(int(firsts[pos]), []).append(int(pos))
        self.wait("store-read")  # every rank reads the same store before any writes to it
        self.refresh()
        new_here = ~contains(self.known, distinct)
        order = np.argsort(first[new_here], kind="stable")  # by corpus position
        missing_keys, missing_first = distinct[new_here][order], first[new_here][order]
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
            self.write_shard(shard_name(chunk), chunk, reps)
            self.encoded_docs += len(chunk)
            done += len(chunk)
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

    def wait(self, name: str) -> None:
        """Every rank of the job here, waiting on the store's file system: one rank's last shard can take
        longer than a collective may wait."""
        wait_for_ranks(self.root, name)

    def refresh(self) -> None:
        """Read the keys of shards this process has not seen yet (other ranks', an earlier attempt's)."""
        fresh = []
        for name in self.shard_names():
            if name not in self.keys:
                self.keys[name] = self.read_keys(name)
                fresh.append(self.keys[name])
        if fresh:
            self.known = np.sort(np.concatenate([self.known, *fresh]))

    def gather(self, view: CorpusView, positions: np.ndarray) -> np.ndarray | sparse.csr_matrix:
        """The reps of the documents at corpus `positions`, in that order (read by this rank alone)."""
        positions = np.asarray(positions, dtype=np.int64)
        back = {p: first for first, later in view.repeats.items() for p in later}  # a repeat → its first position
        firsts = np.array([back.get(int(p), int(p)) for p in positions], dtype=np.int64)
        parts, where = [], []
        for name, (rows, first) in sorted(view.rows.items()):
            at = np.minimum(np.searchsorted(first, firsts), len(first) - 1)
            found = np.flatnonzero(first[at] == firsts)
            if len(found):
                parts.append(self.read_reps(name)[rows[at[found]]])
                where.append(found)
        order = np.argsort(np.concatenate(where), kind="stable") if where else np.empty(0, dtype=np.int64)
        if len(order) != len(positions):
            raise ValueError(f"{view.label}: {len(positions) - len(order)} positions asked for are not in the store")
        stacked = sparse.vstack(parts, format="csr") if self.sparse else np.concatenate(parts)
        return stacked[order]

    # ---- search ----

    def search(self, view: CorpusView, queries, k: int, scratch: Path) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact top-k corpus positions for `queries` (dense array or CSR): (scores, positions), each
        (queries, k), best first, ties by lower position, -1 where the corpus has fewer than k
        documents. Collective: rank 0 gets the result, the others None. `scratch`: where ranks leave
        their partial lists for rank 0 (a directory shared by the ranks)."""
        k = min(k, view.size)
        n_q = queries.shape[0]
        scores = np.full((n_q, 0), -np.inf, dtype=np.float32)
        positions = np.full((n_q, 0), -1, dtype=np.int64)
        self.doc_nnz = 0  # sparse: non-zeros over the corpus's documents (a repeated text at each position)
        for name in sorted(view.rows)[self.rank::self.world]:
            s, p = self.search_shard(name, view, queries, k)
            scores, positions = merge_top_k(scores, positions, s, p, k)
        if self.world == 1:
            return pad_top_k(scores, positions, k)
        scratch.mkdir(parents=True, exist_ok=True)
        part = scratch / f"{view.label.replace('/', '_')}.rank{self.rank}.npz"
        write_via(part, lambda tmp: np.savez(tmp, scores=scores, positions=positions, doc_nnz=np.array(self.doc_nnz)))
        self.wait("searched")
        if self.rank != 0:
            self.wait("merged")
            return None
        for r in range(1, self.world):
            other = part.with_name(part.name.replace(".rank0.", f".rank{r}."))
            with np.load(other) as z:
                scores, positions = merge_top_k(scores, positions, z["scores"], z["positions"], k)
                self.doc_nnz += int(z["doc_nnz"])
        for r in range(self.world):
            part.with_name(part.name.replace(".rank0.", f".rank{r}.")).unlink(missing_ok=True)
        self.wait("merged")
        return pad_top_k(scores, positions, k)

    def search_shard(self, name: str, view: CorpusView, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of one shard's rows of this corpus, ordered by their corpus position so that ties
        break by position; repeated texts count at each of their positions."""
        rows, first = view.rows[name]
        reps = self.read_reps(name)[rows]
        kk = min(k, len(rows))
        if self.sparse:
            counts = np.diff(reps.indptr)
            repeated = (sum(int(counts[j]) * len(view.repeats.get(int(p), ())) for j, p in enumerate(first))
                        if view.repeats else 0)
            self.doc_nnz += int(counts.sum()) + repeated
            s, i = InvertedIndex(reps).search(queries, kk)
        else:
            s, i = dense_top_k(queries, reps, kk)
        s = s.astype(np.float32)
        p = np.where(i >= 0, first[np.clip(i, 0, None)], -1)
        if view.repeats:
            s, p = expand_repeats(s, p, view.repeats)
        return merge_top_k(s[:, :0], p[:, :0], s, p, k)


def expand_repeats(scores: np.ndarray, positions: np.ndarray,
                   repeats: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Each hit whose text repeats also at its further positions, with the same score."""
    extra_s: list[list[float]] = [[] for _ in range(len(scores))]
    extra_p: list[list[int]] = [[] for _ in range(len(scores))]
    for q, row in enumerate(positions):
        for col, pos in enumerate(row):
            for other in repeats.get(int(pos), ()):
                extra_s[q].append(float(scores[q, col]))
                extra_p[q].append(other)
    width = max(len(e) for e in extra_p)
    if width == 0:
        return scores, positions
    s = np.full((len(scores), width), -np.inf, dtype=np.float32)
    p = np.full((len(scores), width), -1, dtype=np.int64)
    for q in range(len(scores)):
        s[q, :len(extra_s[q])], p[q, :len(extra_p[q])] = extra_s[q], extra_p[q]
    return np.concatenate([scores, s], axis=1), np.concatenate([positions, p], axis=1)
