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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
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


@dataclass
class EntropySample:
    """What the entropy of one collection needs from its corpus's encodings: the scores of its judged
    queries against the K sampled documents and against each query's relevant ones. They are filled a
    shard at a time, during the search's own pass over the store (`score_shard`), so the corpus is read
    once; partial fills from several ranks combine with `merge`."""

    qids: list[str]
    rows: np.ndarray  # each judged query's row among the searched queries
    sample: np.ndarray  # K corpus positions, sorted
    pair_query: np.ndarray  # (query, relevant document) pairs: the judged query's index ...
    pair_position: np.ndarray  # ... and the document's corpus position
    excluded: np.ndarray  # (judged, K): a sampled document that is the query's own relevant one
    negative: np.ndarray  # (judged, K) scores, NaN until filled
    positive: np.ndarray  # (pairs,) scores, NaN until filled

    def positions(self) -> np.ndarray:
        """Every corpus position whose reps are needed, sorted, once each."""
        return np.unique(np.concatenate([self.sample, self.pair_position]))

    def score_shard(self, queries, positions: np.ndarray, reps, paradigm) -> None:
        """Fill the scores of the needed documents at corpus `positions` (sorted, distinct), whose reps
        (one row each) are `reps`, scored as their `paradigm` (a `paradigms.Paradigm`) scores them."""
        if len(positions) == 0:
            return
        # (judged, documents of this shard that are needed)
        table = paradigm.host_scores(paradigm.take(queries, self.rows), reps)
        at = np.searchsorted(positions, self.sample)
        found = np.flatnonzero((at < len(positions)) & (positions[np.minimum(at, len(positions) - 1)] == self.sample))
        self.negative[:, found] = table[:, at[found]]
        at = np.searchsorted(positions, self.pair_position)
        hit = np.flatnonzero((at < len(positions))
                             & (positions[np.minimum(at, len(positions) - 1)] == self.pair_position))
        self.positive[hit] = table[self.pair_query[hit], at[hit]]

    def merge(self, negative: np.ndarray, positive: np.ndarray) -> None:
        """Another rank's fills."""
        self.negative = np.where(np.isnan(self.negative), negative, self.negative)
        self.positive = np.where(np.isnan(self.positive), positive, self.positive)

    def values(self, temperature: float) -> dict[str, float]:
        """{query id: CE}, once every score is filled."""
        if np.isnan(self.negative).any() or np.isnan(self.positive).any():
            raise RuntimeError("contrastive entropy: some sampled or relevant documents were never scored")
        ends = np.searchsorted(self.pair_query, np.arange(len(self.qids) + 1))
        positive = [self.positive[ends[i]:ends[i + 1]] for i in range(len(self.qids))]
        values = per_query(positive, self.negative, self.excluded, temperature)
        return {q: float(v) for q, v in zip(self.qids, values, strict=True)}


def entropy_sample(qids: Sequence[str], qrels: Mapping[str, Mapping[str, int]], doc_ids: Sequence[str],
                   spec: Mapping[str, Any]) -> EntropySample | None:
    """The sample of a collection whose queries are `qids` (in search order) over `doc_ids`; None when no
    judged query has a relevant document in the corpus."""
    position = {d: i for i, d in enumerate(doc_ids)}
    judged = [(row, q, sorted(position[d] for d, rel in qrels[q].items() if rel > 0 and d in position))
              for row, q in enumerate(qids) if q in qrels]
    judged = [(row, q, rel) for row, q, rel in judged if rel]
    if not judged:
        return None
    sample = sample_negatives(len(doc_ids), int(spec["negatives"]), int(spec["seed"]))
    pair_query = np.concatenate([np.full(len(rel), i) for i, (_, _, rel) in enumerate(judged)])
    pair_position = np.concatenate([np.asarray(rel, dtype=np.int64) for _, _, rel in judged])
    return EntropySample(qids=[q for _, q, _ in judged], rows=np.array([row for row, _, _ in judged]),
                         sample=sample, pair_query=pair_query, pair_position=pair_position,
                         excluded=np.array([np.isin(sample, rel) for _, _, rel in judged]),
                         negative=np.full((len(judged), len(sample)), np.nan),
                         positive=np.full(len(pair_position), np.nan))
