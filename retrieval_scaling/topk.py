"""Exact top-k: of rows of scores, of two candidate lists, and of dense inner-product search.

Every result is what brute force gives: hits by score, ties by lower document index, at the k-th place
too. Dense search scores each query block by one matrix product and keeps each row's k best; shard
results are merged by (score, index) (`corpus_search`), so the corpus is bounded by memory (one shard's
vectors at a time), not by code. (faiss's flat index is not used: among exactly tied documents at the k-th place it
keeps whichever its heap holds, not the lowest index.)

Floating point: a dense score comes from a BLAS matrix product, whose last bit may depend on where the
document falls in the kernel's blocks; two distinct documents within about one unit in the last place
of each other may then swap under another shard cut. Repeated texts are scored once and share that
score (`encodings`), so they always tie exactly.
"""

from __future__ import annotations

import numpy as np

QUERY_BLOCK = 256  # queries scored at once: a (block, shard documents) float32 score matrix


def dense_top_k(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of `docs` for each query: (scores, doc indices), each
    (queries, min(k, docs)), best first, ties by lower index."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    docs = np.ascontiguousarray(docs, dtype=np.float32)
    k = min(k, len(docs))
    out_s = np.empty((len(queries), k), dtype=np.float32)
    out_i = np.empty((len(queries), k), dtype=np.int64)
    for lo in range(0, len(queries), QUERY_BLOCK):
        out_s[lo:lo + QUERY_BLOCK], out_i[lo:lo + QUERY_BLOCK] = top_k_rows(queries[lo:lo + QUERY_BLOCK] @ docs.T, k)
    return out_s, out_i


def merge_top_k(scores_a: np.ndarray, pos_a: np.ndarray, scores_b: np.ndarray, pos_b: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two candidate lists per query, by score, then lower position; empty slots
    (position -1) last."""
    s = np.concatenate([scores_a, scores_b], axis=1).astype(np.float32)
    p = np.concatenate([pos_a, pos_b], axis=1).astype(np.int64)
    s = np.where(p >= 0, s, -np.inf)
    order = np.lexsort((np.where(p >= 0, p, np.iinfo(np.int64).max), -s), axis=-1)[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(p, order, axis=1)


def pad_top_k(scores: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    missing = k - scores.shape[1]
    if missing > 0:
        scores = np.pad(scores, ((0, 0), (0, missing)), constant_values=-np.inf)
        positions = np.pad(positions, ((0, 0), (0, missing)), constant_values=-1)
    return scores, positions


def top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each row (best first, ties by lower column): a partition finds each row's k-th
    score, and only the candidates at or above it are sorted."""
    k = min(k, scores.shape[1])
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
    out_s = np.empty((len(scores), k), dtype=np.float32)
    out_i = np.empty((len(scores), k), dtype=np.int64)
    for row, (values, floor) in enumerate(zip(scores, kth, strict=True)):
        cand = np.flatnonzero(values >= floor)
        best = cand[np.lexsort((cand, -values[cand]))[:k]]
        out_s[row], out_i[row] = values[best], best
    return out_s, out_i
