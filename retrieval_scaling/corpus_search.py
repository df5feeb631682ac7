"""One pass over a corpus's shards in an `EncodingStore`, serving every query set searched over that corpus
and the scores their contrastive entropy needs: MS MARCO dev, DL19 and DL20 share one corpus, so each
of its shards is read once for all three, and once only.

Over W ranks, each searches its share of the shards (shard j on rank j mod W); rank 0 merges the
partial top-k lists and entropy scores, left for it in a directory the ranks share. Hits are ordered by
score, then by corpus position, in every shard and in the merge: the result is brute force's whatever
the number of ranks or the shards' cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .contrastive_entropy import EntropySample
from .encodings import CorpusView, EncodingStore
from .layout import write_via
from .topk import merge_top_k, pad_top_k


@dataclass
class SearchRequest:
    """One query set searched over a corpus: its queries' reps, the depth, and the contrastive entropy
    sample to fill on the same pass (None: not asked for)."""

    queries: Any  # in the host form of the store's paradigm
    k: int
    entropy: EntropySample | None = None


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


def search_corpus(store: EncodingStore, view: CorpusView, requests: Sequence[SearchRequest],
                  scratch: Path) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Exact top-k corpus positions for each request's queries: a list of
    (scores, positions), each (queries, k), best first, ties by lower position, -1 where the corpus
    has fewer than k documents; each request's entropy sample filled on the way. One read of each
    shard serves every request. Collective: rank 0 gets the result, the others None. `scratch`:
    where ranks leave their partial lists for rank 0 (a directory shared by the ranks)."""
    ks = [min(r.k, view.size) for r in requests]
    prepared = [store.searcher.prepare(r.queries) for r in requests]
    found = [(np.full((r.queries.shape[0], 0), -np.inf, dtype=np.float32),
              np.full((r.queries.shape[0], 0), -1, dtype=np.int64)) for r in requests]
    needed = needed_firsts(view, requests)
    store.doc_nnz = 0  # values over the corpus's documents, where they vary (a repeated text at each position)
    for name in sorted(view.rows)[store.rank::store.world]:
        rows, first = view.rows[name]
        reps = store.paradigm.take(store.read_reps(name), rows)
        docs = store.searcher.index(reps)  # once for every request
        counts = store.paradigm.stored_values(reps)
        if counts is not None:
            repeated = (sum(int(counts[j]) * len(view.repeats.get(int(p), ())) for j, p in enumerate(first))
                        if view.repeats else 0)
            store.doc_nnz += int(counts.sum()) + repeated
        for j, request in enumerate(requests):
            s, p = search_reps(store, docs, first, view, prepared[j], ks[j])
            found[j] = merge_top_k(*found[j], s, p, ks[j])
            if request.entropy is not None:
                positions, at = needed[j]
                where = np.searchsorted(first, at)
                inside = np.flatnonzero((where < len(first)) & (first[np.minimum(where, len(first) - 1)] == at))
                request.entropy.score_shard(request.queries, positions[inside],
                                            store.paradigm.take(reps, where[inside]), store.paradigm)
    if store.world == 1:
        return [pad_top_k(s, p, k) for (s, p), k in zip(found, ks, strict=True)]
    return merge_ranks(store, view, requests, found, ks, scratch)


def needed_firsts(view: CorpusView,
                  requests: Sequence[SearchRequest]) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """For each request with an entropy sample: the corpus positions it needs, and the first position
    of each one's text (where the store holds it)."""
    back = {p: first for first, later in view.repeats.items() for p in later}  # a repeat → its first
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for request in requests:
        if request.entropy is None:
            out.append(None)
            continue
        positions = request.entropy.positions()
        out.append((positions, np.array([back.get(int(p), int(p)) for p in positions], dtype=np.int64)))
    return out


def search_reps(store: EncodingStore, docs, first: np.ndarray, view: CorpusView, queries,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one shard's rows of this corpus (`docs`, its searcher's index of them, at corpus
    positions `first`, ascending), so that ties break by position; repeated texts count at each of their
    positions."""
    s, i = store.searcher.top_k(queries, docs, min(k, len(first)))
    s = s.astype(np.float32)
    p = np.where(i >= 0, first[np.clip(i, 0, None)], -1)
    if view.repeats:
        s, p = expand_repeats(s, p, view.repeats)
    return merge_top_k(s[:, :0], p[:, :0], s, p, k)


def merge_ranks(store: EncodingStore, view: CorpusView, requests: Sequence[SearchRequest], found: list, ks: list[int],
                scratch: Path) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Every rank's partial lists (and entropy scores) merged on rank 0, through `scratch`."""
    scratch.mkdir(parents=True, exist_ok=True)
    part = scratch / f"{view.label.replace('/', '_')}.rank{store.rank}.npz"
    arrays = {"doc_nnz": np.array(store.doc_nnz)}
    for j, ((s, p), request) in enumerate(zip(found, requests, strict=True)):
        arrays.update({f"scores{j}": s, f"positions{j}": p})
        if request.entropy is not None:
            arrays.update({f"negative{j}": request.entropy.negative, f"positive{j}": request.entropy.positive})
    write_via(part, lambda tmp: np.savez(tmp, **arrays))
    store.wait("searched")
    if store.rank != 0:
        store.wait("merged")
        return None
    for r in range(1, store.world):
        with np.load(part.with_name(part.name.replace(".rank0.", f".rank{r}."))) as z:
            for j, request in enumerate(requests):
                found[j] = merge_top_k(*found[j], z[f"scores{j}"], z[f"positions{j}"], ks[j])
                if request.entropy is not None:
                    request.entropy.merge(z[f"negative{j}"], z[f"positive{j}"])
            store.doc_nnz += int(z["doc_nnz"])
    for r in range(store.world):
        part.with_name(part.name.replace(".rank0.", f".rank{r}.")).unlink(missing_ok=True)
    store.wait("merged")
    return [pad_top_k(s, p, k) for (s, p), k in zip(found, ks, strict=True)]
