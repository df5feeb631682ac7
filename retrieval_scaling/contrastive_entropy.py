"""Contrastive entropy (Fang et al., SIGIR 2024): a smooth measure of how well a retriever's scores set a
query's relevant documents apart from the corpus, for scaling fits that nDCG's steps make noisy.

For a judged query q with relevant documents R (relevance > 0) and one fixed sample S of K corpus
documents (drawn with `seed`, the same for every cell that shares the evaluation config), with q's own
relevant documents left out of S for q:

    CE(q) = mean over d in R of  −log( exp(s(q,d)/τ) / (exp(s(q,d)/τ) + Σ_{n in S∖R} exp(s(q,n)/τ)) )

τ is the paradigm's temperature, the scale its losses train the scores at. Lower is better; scores that
cannot tell documents apart give log(K + 1). The collection's value is the mean over its judged queries
with a relevant document in the corpus. K and the seed are in the metric's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import sparse
from scipy.special import logsumexp


def metric_name(spec: Mapping[str, Any]) -> str:
    return f"contrastive_entropy_k{int(spec['negatives'])}_seed{int(spec['seed'])}"


def sample_negatives(n_docs: int, k: int, seed: int) -> np.ndarray:
    """K corpus positions, sorted, drawn without replacement (the whole corpus when it is smaller)."""
    return np.sort(np.random.default_rng(seed).choice(n_docs, size=min(k, n_docs), replace=False))


def per_query(positive: Sequence[np.ndarray], negative: np.ndarray, excluded: np.ndarray,
              temperature: float) -> np.ndarray:
    """CE of each query from its positives' scores, the (queries, K) negatives' scores and which of
    those negatives are its own relevant documents (`excluded`, left out)."""
    neg = np.where(excluded, -np.inf, negative / temperature)
    out = np.empty(len(positive))
    for i, pos in enumerate(positive):
        pos = np.asarray(pos, dtype=np.float64) / temperature
        rest = logsumexp(neg[i]) if np.isfinite(neg[i]).any() else -np.inf
        out[i] = float(np.mean(np.logaddexp(pos, rest) - pos))
    return out


def scores(queries: np.ndarray | sparse.spmatrix, docs: np.ndarray | sparse.spmatrix) -> np.ndarray:
    """Dot products, (queries, docs), as a dense float64 array."""
    product = queries @ docs.T
    return np.asarray(product.toarray() if sparse.issparse(product) else product, dtype=np.float64)


def contrastive_entropy(queries: np.ndarray | sparse.spmatrix, qids: Sequence[str],
                        qrels: Mapping[str, Mapping[str, int]], doc_ids: Sequence[str],
                        gather: Callable[[np.ndarray], Any], spec: Mapping[str, Any],
                        temperature: float) -> dict[str, float]:
    """{query id: CE} over the judged queries; `gather(positions)` gives the docs' reps from the store."""
    position = {d: i for i, d in enumerate(doc_ids)}
    judged = [(row, q, [position[d] for d, rel in qrels[q].items() if rel > 0 and d in position])
              for row, q in enumerate(qids) if q in qrels]
    judged = [(row, q, rel) for row, q, rel in judged if rel]
    if not judged:
        return {}
    sample = sample_negatives(len(doc_ids), int(spec["negatives"]), int(spec["seed"]))
    relevant = np.unique(np.concatenate([np.asarray(rel) for _, _, rel in judged]))
    reps = gather(np.concatenate([sample, relevant]))
    rows = np.array([row for row, _, _ in judged])
    q = queries[rows]
    negative = scores(q, reps[:len(sample)])
    relevant_reps, column = reps[len(sample):], {p: j for j, p in enumerate(relevant)}
    # query by query: a (queries, relevant documents) table is ~0.4 GB on MS MARCO dev
    positive = [scores(q[i:i + 1], relevant_reps[[column[p] for p in rel]])[0] for i, (_, _, rel) in enumerate(judged)]
    excluded = np.array([np.isin(sample, rel) for _, _, rel in judged])
    values = per_query(positive, negative, excluded, temperature)
    return {q: float(v) for (_, q, _), v in zip(judged, values, strict=True)}
