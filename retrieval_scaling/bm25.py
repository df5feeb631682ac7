"""BM25 over a collection (bm25s, Lucene's variant, English stop words, Snowball stemming): the
baseline retriever, the miner of hard negatives and the offline teacher all score with it."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class BM25Index:
    """bm25s over a collection's documents; scores for every document of the corpus per query."""

    def __init__(self, corpus: Mapping[str, str], k1: float = 1.5, b: float = 0.75):
        import bm25s
        import Stemmer
        from bm25s.tokenization import Tokenizer

        self.doc_ids = list(corpus)
        self.position = {d: i for i, d in enumerate(self.doc_ids)}
        self.tokenizer = Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer("english"))
        tokens = self.tokenizer.tokenize(list(corpus.values()), return_as="tuple", show_progress=False)
        self.retriever = bm25s.BM25(k1=k1, b=b)
        self.retriever.index(tokens, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        # Unknown terms are dropped; a query of unknown terms only becomes the empty token (score 0).
        tokens = self.tokenizer.tokenize([query], update_vocab=False, return_as="ids", show_progress=False)[0]
        if not tokens:
            return np.zeros(len(self.doc_ids), dtype=np.float32)
        return self.retriever.get_scores(tokens)

    def top_k(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, corpus positions) of each query's k best documents, best first, ties by lower
        position (exact: every document is scored)."""
        from .search import top_k_rows  # numba: imported only where searched

        k = min(k, len(self.doc_ids))
        out_s = np.empty((len(queries), k), dtype=np.float32)
        out_i = np.empty((len(queries), k), dtype=np.int64)
        for row, query in enumerate(queries):
            out_s[row], out_i[row] = (x[0] for x in top_k_rows(self.scores(query)[None, :], k))
        return out_s, out_i
