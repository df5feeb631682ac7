"""Evaluation: encode a collection, search exactly, score the run with ir_measures.

Dense: faiss IndexFlatIP (exact inner product). Sparse: exact dot products over every non-zero
weight (scipy CSR). Metric names: `<collection>/ndcg_10`, `mrr_10`, `recall_100`, `recall_1000`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .data import Collection
from .encoders import Encoder, encode_inputs

log = logging.getLogger(__name__)

MEASURES = {"ndcg_10": "nDCG@10", "mrr_10": "RR@10", "recall_100": "R@100", "recall_1000": "R@1000"}


@torch.no_grad()
def encode_texts(encoder: Encoder, tokenizer, texts: list[str], max_len: int, batch_size: int,
                 desc: str) -> torch.Tensor:
    """Reps of `texts` in input order; batches are formed over length-sorted texts so that padding is
    small, and run under bf16 autocast (AMX on this CPU) on the encoder's device."""
    from tqdm import tqdm

    encoder.eval()
    device = next(encoder.parameters()).device
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len - 1)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    chunks: list[torch.Tensor] = []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, mininterval=10):
        rows = order[start:start + batch_size]
        input_ids, mask = encode_inputs([ids[i] for i in rows], tokenizer.bos_token_id,
                                        tokenizer.pad_token_id, max_len)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            chunks.append(encoder(input_ids.to(device), mask.to(device)).float().cpu())
    reps = torch.cat(chunks)
    out = torch.empty_like(reps)
    out[torch.as_tensor(order)] = reps
    return out


def search_dense(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(np.ascontiguousarray(docs, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def search_sparse(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by sparse dot products over all non-zero weights."""
    from scipy import sparse

    scores = (sparse.csr_matrix(queries) @ sparse.csr_matrix(docs).T).toarray()
    top = np.argpartition(-scores, kth=min(k, scores.shape[1]) - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1)


def score_run(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]],
              prefix: str) -> dict[str, float]:
    import ir_measures

    measures = {name: ir_measures.parse_measure(m) for name, m in MEASURES.items()}
    agg = ir_measures.calc_aggregate(list(measures.values()), qrels, run)
    return {f"{prefix}/{name}": float(agg[m]) for name, m in measures.items()}


def subset_collection(coll: Collection, queries: int, bm25_depth: int, seed: int) -> Collection:
    """A declared evaluation subset, for models too slow to encode a whole corpus here: `queries` test
    queries drawn with `seed`, searched over a pool of their judged documents plus each one's BM25 top
    `bm25_depth`. Its name says so (`scifact:q100-bm25_100`), so its metrics are never taken for the
    full-corpus numbers. Scores over a pool are optimistic: only the pool's documents compete."""
    from .prepare import BM25Index

    qids = sorted(coll.queries)
    picked = sorted(np.random.default_rng(seed).choice(len(qids), size=min(queries, len(qids)), replace=False))
    chosen = [qids[i] for i in picked]
    index = BM25Index(coll.corpus)
    pool = {d for q in chosen for d in coll.qrels[q]}
    for q in chosen:
        top = np.argsort(-index.scores(coll.queries[q]), kind="stable")[:bm25_depth]
        pool.update(index.doc_ids[i] for i in top)
    return Collection(name=f"{coll.name}:q{len(chosen)}-bm25_{bm25_depth}",
                      corpus={d: t for d, t in coll.corpus.items() if d in pool},
                      queries={q: coll.queries[q] for q in chosen}, qrels={q: coll.qrels[q] for q in chosen})


def load_eval_collections(eval_cfg: Mapping[str, Any]) -> list[Collection]:
    """The evaluation collections of a cell, subset when `eval.subset` asks for it."""
    from .data import load_collection

    out = []
    for spec in eval_cfg["collections"]:
        coll = load_collection(eval_cfg["root"], spec["name"], spec["split"])
        sub = eval_cfg.get("subset")
        if sub:
            coll = subset_collection(coll, int(sub["queries"]), int(sub["bm25_depth"]), int(sub["seed"]))
        out.append(coll)
    return out


def evaluate(encoder: Encoder, tokenizer, coll: Collection, eval_cfg: Mapping[str, Any],
             drop_self_hits: bool) -> dict[str, float]:
    """Metrics of `encoder` on `coll` (full corpus, exact search)."""
    doc_ids, qids = list(coll.corpus), list(coll.queries)
    bs = int(eval_cfg["batch_size"])
    docs = encode_texts(encoder, tokenizer, list(coll.corpus.values()), int(eval_cfg["passage_max_len"]), bs,
                        f"encode {coll.name} corpus").numpy()
    queries = encode_texts(encoder, tokenizer, list(coll.queries.values()), int(eval_cfg["query_max_len"]), bs,
                           f"encode {coll.name} queries").numpy()
    depth = min(int(eval_cfg["depth"]) + (1 if drop_self_hits else 0), len(doc_ids))
    search = search_sparse if encoder.sparse else search_dense
    scores, idx = search(queries, docs, depth)
    run: dict[str, dict[str, float]] = {}
    for row, qid in enumerate(qids):
        hits = {doc_ids[j]: float(s) for s, j in zip(scores[row], idx[row], strict=True) if j >= 0}
        if drop_self_hits:
            hits.pop(qid, None)
        run[qid] = dict(sorted(hits.items(), key=lambda kv: -kv[1])[: int(eval_cfg["depth"])])
    metrics = score_run(run, coll.qrels, coll.name)
    if encoder.sparse:
        metrics[f"{coll.name}/doc_nnz"] = float((docs > 0).sum(1).mean())
        metrics[f"{coll.name}/query_nnz"] = float((queries > 0).sum(1).mean())
    return metrics
