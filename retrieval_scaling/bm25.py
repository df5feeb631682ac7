"""BM25 over a collection (bm25s, Lucene's variant, English stop words, Snowball stemming): the
baseline retriever, the miner of hard negatives and the offline teacher all score with it.

bm25s builds the index: for each term, the documents holding it and their BM25 weights (a CSC matrix).
That is an inverted index, so queries are searched in batches by `search`'s compiled term-at-a-time
kernel, in parallel over the job's cores: each document's score is the sum of its weights in the query's
token order, as bm25s sums them, so scores are bitwise bm25s's and the top-k (ties by lower position) is
what scoring every document one query at a time gives. An index saved with `save` is memory-mapped by
`load`: every process on a node that mines from it shares one copy in the page cache.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

ARRAYS = ("weights", "doc_ids", "indptr", "corpus_ids")


class BM25Index:
    """bm25s over a collection's documents: scores, batched exact top-k, and a saved, shareable form."""

    def __init__(self, corpus: Mapping[str, str], k1: float = 1.5, b: float = 0.75):
        import bm25s

        tokenizer = _tokenizer()
        tokens = tokenizer.tokenize(list(corpus.values()), return_as="tuple", show_progress=False)
        retriever = bm25s.BM25(k1=k1, b=b)
        retriever.index(tokens, show_progress=False)
        csc = retriever.scores  # term → (documents, weights)
        self.tokenizer, self.k1, self.b = tokenizer, k1, b
        self.weights = np.asarray(csc["data"], dtype=np.float32)
        self.doc_ids = np.asarray(csc["indices"], dtype=np.int32)
        self.indptr = np.asarray(csc["indptr"], dtype=np.int64)
        self.corpus_ids = np.array(list(corpus), dtype=bytes)
        self.n_docs = len(corpus)

    # ---- a saved index, memory-mapped ----

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in ARRAYS:
            np.save(directory / f"{name}.npy", getattr(self, name))
        self.tokenizer.save_vocab(str(directory))
        (directory / "bm25.json").write_text(json.dumps({"k1": self.k1, "b": self.b, "n_docs": self.n_docs}))

    @classmethod
    def load(cls, directory: Path) -> BM25Index:
        """The index `save` wrote, its arrays memory-mapped read-only (shared by every process reading it)."""
        directory = Path(directory)
        index = cls.__new__(cls)
        meta = json.loads((directory / "bm25.json").read_text())
        index.k1, index.b, index.n_docs = meta["k1"], meta["b"], meta["n_docs"]
        for name in ARRAYS:
            setattr(index, name, np.load(directory / f"{name}.npy", mmap_mode="r"))
        index.tokenizer = _tokenizer()
        index.tokenizer.load_vocab(str(directory))
        return index

    def corpus_id(self, position: int) -> str:
        return self.corpus_ids[position].decode()

    # ---- scoring ----

    def query_tokens(self, queries: Sequence[str]) -> list[list[int]]:
        """Each query's term ids, in order, repeats kept (bm25s counts a repeated term each time).
        Unknown terms are dropped; a query of unknown terms only becomes the empty token (score 0)."""
        return self.tokenizer.tokenize(list(queries), update_vocab=False, return_as="ids", show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """Every document's score for one query (bm25s's `get_scores`)."""
        out = np.zeros(self.n_docs, dtype=np.float32)
        for term in self.query_tokens([query])[0]:
            lo, hi = self.indptr[term], self.indptr[term + 1]
            np.add.at(out, self.doc_ids[lo:hi], self.weights[lo:hi])
        return out

    def scores_of(self, query: str, positions: Sequence[int]) -> np.ndarray:
        """The scores of the documents at `positions` only, summed in the same order as `scores`."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.zeros(len(positions), dtype=np.float32)
        for term in self.query_tokens([query])[0]:
            docs = self.doc_ids[self.indptr[term]:self.indptr[term + 1]]  # ascending: bm25s's CSC
            at = np.minimum(np.searchsorted(docs, positions), max(len(docs) - 1, 0))
            found = (docs[at] == positions) if len(docs) else np.zeros(len(positions), dtype=bool)
            out[found] += self.weights[self.indptr[term] + at[found]]
        return out

    def top_k(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, corpus positions) of each query's k best documents, best first, ties by lower
        position: exact, every document is scored. All queries at once, on every numba thread."""
        from .search import search_positive_postings  # numba: imported only where searched

        tokens = self.query_tokens(queries)
        q_indptr = np.zeros(len(tokens) + 1, dtype=np.int64)
        q_indptr[1:] = np.cumsum([len(t) for t in tokens])
        q_terms = np.fromiter((t for ts in tokens for t in ts), dtype=np.int64, count=int(q_indptr[-1]))
        return search_positive_postings(self.indptr, self.doc_ids, self.weights, self.n_docs, q_indptr, q_terms, k)


def _tokenizer():
    import Stemmer
    from bm25s.tokenization import Tokenizer

    return Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer("english"))
