"""Exact sparse top-k search over encoded corpora.

An inverted index over every non-zero weight (term → documents, weights), scored term-at-a-time into a
per-thread accumulator and reduced by a top-k heap; queries in parallel (numba). Terms found in at least
`dense_fraction` of the documents keep their postings as a dense column (zeros included): adding such a
column is a vectorised pass instead of a scatter, and learned sparse vectors put most of a query's work
in such terms. The search is exact: the same hits as brute force, ties by lower document index.

Floating point: a score is the sum of its products in the query's term order, whatever the document's
shard or place in it, so it is the same bits under any shard cut or rank count. (Dense search: `topk`.)
"""

from __future__ import annotations

from collections.abc import Iterable

import numba
import numpy as np
from scipy import sparse

from .topk import top_k_rows

QUERIES_PER_TASK = 64  # queries a thread takes at a time: small enough to balance the threads' loads


def to_csr(reps: np.ndarray | sparse.spmatrix) -> sparse.csr_matrix:
    """Non-zero weights of sparse representations, float32 CSR (explicit zeros dropped)."""
    m = sparse.csr_matrix(reps, dtype=np.float32)
    m.eliminate_zeros()
    return m


class InvertedIndex:
    """Postings of a sparse corpus: for each term, the documents with a non-zero weight and the weights;
    the postings of terms in ≥ `dense_fraction` of the documents as dense columns."""

    def __init__(self, docs: sparse.spmatrix | np.ndarray, dense_fraction: float = 0.25):
        csc = sparse.csc_matrix(to_csr(docs))
        csc.sort_indices()
        self.n_docs, self.n_terms = csc.shape
        df = np.diff(csc.indptr)
        dense_terms = np.flatnonzero(df >= max(1, int(np.ceil(dense_fraction * self.n_docs))))
        self.dense_slot = np.full(self.n_terms, -1, dtype=np.int64)
        self.dense_slot[dense_terms] = np.arange(len(dense_terms))
        self.dense_cols = np.ascontiguousarray(csc[:, dense_terms].T.toarray(), dtype=np.float32)
        keep = np.ones(self.n_terms, dtype=np.float32)
        keep[dense_terms] = 0
        postings = sparse.csc_matrix(csc @ sparse.diags(keep))
        postings.eliminate_zeros()
        postings.sort_indices()
        self.indptr = postings.indptr.astype(np.int64)
        self.doc_ids = postings.indices.astype(np.int32)
        self.weights = postings.data.astype(np.float32)
        self.nnz = int(csc.nnz)

    @classmethod
    def from_shards(cls, shards: Iterable[sparse.spmatrix | np.ndarray], dense_fraction: float = 0.25) -> InvertedIndex:
        return cls(sparse.vstack([to_csr(s) for s in shards], format="csr"), dense_fraction)

    def search(self, queries: sparse.spmatrix | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by dot product over all non-zero weights: (scores, doc indices), each
        (queries, min(k, docs)), best first, ties by lower doc index — what brute force returns.
        Documents sharing no term with a query score 0 and rank as such (in index order)."""
        q = to_csr(queries)
        if q.shape[1] != self.n_terms:
            raise ValueError(f"queries have {q.shape[1]} terms, the index {self.n_terms}")
        k = min(k, self.n_docs)
        return _search(self.indptr, self.doc_ids, self.weights, self.dense_cols, self.dense_slot, self.n_docs,
                       q.indptr.astype(np.int64), q.indices.astype(np.int64), q.data.astype(np.float32), k,
                       max(1, min(q.shape[0], numba.get_num_threads() * 4)))


def search_positive_postings(indptr: np.ndarray, doc_ids: np.ndarray, weights: np.ndarray, n_docs: int,
                             q_indptr: np.ndarray, q_terms: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over postings whose weights are all > 0 (BM25's; term t: `doc_ids[indptr[t]:indptr[t+1]]`,
    `weights` alike) for queries given as CSR arrays of term ids, a term listed twice counted twice,
    summed in the listed order: (scores, doc indices), each (queries, k), best first, ties by lower
    index, documents sharing no term at 0. Positive weights let a zero score mark an untouched document,
    so the scan keeps no per-document flags and no branch per posting."""
    n_q = len(q_indptr) - 1
    return _search_positive(indptr, doc_ids, weights, n_docs, q_indptr, q_terms, min(k, n_docs),
                            max(1, min(QUERIES_PER_TASK, -(-n_q // max(1, numba.get_num_threads())))))


def brute_force_sparse(queries: sparse.spmatrix | np.ndarray, docs: sparse.spmatrix | np.ndarray,
                       k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: every query · document product with scipy (a dense score matrix), then per query
    the k best (best first, ties by lower doc index)."""
    scores = (to_csr(queries) @ to_csr(docs).T).toarray()
    return top_k_rows(scores, k)


# ---- compiled kernels ----

@numba.njit(cache=True, nogil=True)
def _ranks_before(s1, d1, s2, d2):  # pragma: no cover — compiled
    """Hit (s1, d1) ranks before (s2, d2): a higher score, or the same score and a lower doc index."""
    return s1 > s2 or (s1 == s2 and d1 < d2)


@numba.njit(cache=True, nogil=True)
def _sift_root(hs, hi, size, score, doc):  # pragma: no cover — compiled
    """Put (score, doc) at the root of a heap of `size` items and sift it down."""
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _ranks_before(hs[child], hi[child], hs[child + 1], hi[child + 1]):
            child += 1
        if _ranks_before(score, doc, hs[child], hi[child]):
            hs[pos] = hs[child]
            hi[pos] = hi[child]
            pos = child
        else:
            break
    if size > 0:
        hs[pos] = score
        hi[pos] = doc


@numba.njit(cache=True, nogil=True)
def _heap_push(hs, hi, size, score, doc):  # pragma: no cover — compiled
    """Offer a hit to the heap of the k best (root = the worst kept); returns the new size."""
    if size == hs.shape[0]:
        if _ranks_before(score, doc, hs[0], hi[0]):  # better than the worst kept: replaces it
            _sift_root(hs, hi, size, score, doc)
        return size
    pos = size  # not full: sift up from the end
    while pos > 0:
        parent = (pos - 1) // 2
        if _ranks_before(score, doc, hs[parent], hi[parent]):
            break
        hs[pos] = hs[parent]
        hi[pos] = hi[parent]
        pos = parent
    hs[pos] = score
    hi[pos] = doc
    return size + 1


@numba.njit(cache=True, nogil=True)
def _scan_all(acc, hs, hi, qi, q_indptr, q_terms, q_weights, indptr, doc_ids, weights, dense_cols, dense_slot,
              n_docs):  # pragma: no cover
    """Most documents share a term with query `qi`: accumulate without bookkeeping, then scan them all.
    Returns the heap's size; `acc` is left zeroed."""
    for p in range(q_indptr[qi], q_indptr[qi + 1]):
        t, w = q_terms[p], q_weights[p]
        if dense_slot[t] >= 0:
            col = dense_cols[dense_slot[t]]
            for d in range(n_docs):
                acc[d] += w * col[d]
        else:
            for j in range(indptr[t], indptr[t + 1]):
                acc[doc_ids[j]] += w * weights[j]
    size, k = 0, hs.shape[0]
    for d in range(n_docs):
        # in index order, a full heap's root is beaten only by a strictly higher score: checked inline, as
        # almost every document fails it
        if size < k or acc[d] > hs[0]:
            size = _heap_push(hs, hi, size, acc[d], d)
        acc[d] = 0.0
    return size


@numba.njit(cache=True, nogil=True)
def _scan_touched(acc, hit, touched, hs, hi, qi, q_indptr, q_terms, q_weights, indptr, doc_ids, weights, n_docs,
                  k):  # pragma: no cover
    """Few documents share a term with query `qi`: score only those, then let documents sharing none
    (score 0) fill the k hits in index order while there are fewer than k or the worst kept hit scores
    below 0. Returns the heap's size; `acc` and `hit` are left cleared."""
    n_touched = 0
    for p in range(q_indptr[qi], q_indptr[qi + 1]):
        t, w = q_terms[p], q_weights[p]
        for j in range(indptr[t], indptr[t + 1]):
            d = doc_ids[j]
            if not hit[d]:
                hit[d] = True
                touched[n_touched] = d
                n_touched += 1
            acc[d] += w * weights[j]
    size = 0
    for x in range(n_touched):
        d = touched[x]
        if size < k or _ranks_before(acc[d], d, hs[0], hi[0]):
            size = _heap_push(hs, hi, size, acc[d], d)
    d = 0
    while d < n_docs and (size < k or hs[0] < 0):
        if not hit[d]:
            size = _heap_push(hs, hi, size, np.float32(0.0), d)
        d += 1
    for x in range(n_touched):
        acc[touched[x]] = 0.0
        hit[touched[x]] = False
    return size


@numba.njit(cache=True, parallel=True, nogil=True)
def _search(indptr, doc_ids, weights, dense_cols, dense_slot, n_docs, q_indptr, q_terms, q_weights, k,
            n_chunks):  # pragma: no cover
    n_q = q_indptr.shape[0] - 1
    out_s = np.empty((n_q, k), dtype=np.float32)
    out_i = np.empty((n_q, k), dtype=np.int64)
    for c in numba.prange(n_chunks):
        acc = np.zeros(n_docs, dtype=np.float32)
        hit = np.zeros(n_docs, dtype=np.bool_)
        touched = np.empty(n_docs, dtype=np.int64)
        hs = np.empty(k, dtype=np.float32)
        hi = np.empty(k, dtype=np.int64)
        for qi in range(c, n_q, n_chunks):
            work = 0
            for p in range(q_indptr[qi], q_indptr[qi + 1]):
                t = q_terms[p]
                work += n_docs if dense_slot[t] >= 0 else indptr[t + 1] - indptr[t]
            if work >= n_docs // 4:
                size = _scan_all(acc, hs, hi, qi, q_indptr, q_terms, q_weights, indptr, doc_ids, weights,
                                 dense_cols, dense_slot, n_docs)
            else:
                size = _scan_touched(acc, hit, touched, hs, hi, qi, q_indptr, q_terms, q_weights, indptr, doc_ids,
                                     weights, n_docs, k)
            _pop_into(hs, hi, size, out_s[qi], out_i[qi])
    return out_s, out_i


@numba.njit(cache=True, nogil=True)
def _scan_positive(acc, touched, hs, hi, qi, q_indptr, q_terms, indptr, doc_ids, weights, n_docs):  # pragma: no cover
    """`_scan_touched` for weights > 0: a document is new while its score is still 0, appended without a
    branch. Returns the heap's size; `acc` is left zeroed."""
    n_touched = 0
    for p in range(q_indptr[qi], q_indptr[qi + 1]):
        t = q_terms[p]
        for j in range(indptr[t], indptr[t + 1]):
            d = doc_ids[j]
            a = acc[d]
            touched[n_touched] = d
            n_touched += a == 0.0
            acc[d] = a + weights[j]
    size, k = 0, hs.shape[0]
    if n_touched < k:  # fewer than k documents share a term: the rest at 0, in index order
        for x in range(n_touched):
            size = _heap_push(hs, hi, size, acc[touched[x]], touched[x])
        d = 0
        while size < k and d < n_docs:
            if acc[d] == 0.0:
                size = _heap_push(hs, hi, size, np.float32(0.0), d)
            d += 1
        for x in range(n_touched):
            acc[touched[x]] = 0.0
        return size
    for x in range(k):
        d = touched[x]
        size = _heap_push(hs, hi, size, acc[d], d)
        acc[d] = 0.0
    worst_s, worst_i = hs[0], hi[0]
    for x in range(k, n_touched):  # almost every document fails the first comparison
        d = touched[x]
        s = acc[d]
        acc[d] = 0.0
        if s >= worst_s and _ranks_before(s, d, worst_s, worst_i):
            _sift_root(hs, hi, size, s, d)
            worst_s, worst_i = hs[0], hi[0]
    return size


@numba.njit(cache=True, parallel=True, nogil=True)
def _search_positive(indptr, doc_ids, weights, n_docs, q_indptr, q_terms, k, per_task):  # pragma: no cover
    n_q = q_indptr.shape[0] - 1
    out_s = np.empty((n_q, k), dtype=np.float32)
    out_i = np.empty((n_q, k), dtype=np.int64)
    for task in numba.prange((n_q + per_task - 1) // per_task):
        # a task's scratch, allocated per task of many queries: a thread holds one at a time
        acc = np.zeros(n_docs, dtype=np.float32)
        touched = np.empty(n_docs, dtype=np.int32)
        hs = np.empty(k, dtype=np.float32)
        hi = np.empty(k, dtype=np.int64)
        for qi in range(task * per_task, min(n_q, (task + 1) * per_task)):
            size = _scan_positive(acc, touched, hs, hi, qi, q_indptr, q_terms, indptr, doc_ids, weights, n_docs)
            _pop_into(hs, hi, size, out_s[qi], out_i[qi])
    return out_s, out_i


@numba.njit(cache=True, nogil=True)
def _pop_into(hs, hi, size, out_s, out_i):  # pragma: no cover — compiled
    """Pop a heap of `size` hits worst-first into the outputs, back to front: best first."""
    for r in range(size - 1, -1, -1):
        out_s[r] = hs[0]
        out_i[r] = hi[0]
        last_s, last_i = hs[r], hi[r]
        _sift_root(hs, hi, r, last_s, last_i)
