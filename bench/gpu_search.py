"""The torch search path (`shard_search.TorchSearch`, what a GPU cell's evaluation runs) against brute
force, dense and sparse, on one device:

    python bench/gpu_search.py --device cuda     # make gpu-check runs this
    python bench/gpu_search.py --device cpu      # the same code on the CPU device

Vectors are on a grid (dense: multiples of 1/8 below 1; sparse: multiples of 1/64 below 32, SPLADE-like
Zipfian terms over Llama-3's 128,256) so that every score is exact in float32 and float16 storage loses
nothing: the hits must be brute force's, ties included, whatever the device's summation order. Both go
through the store's float16 values. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 128_256


def grid_sparse(n: int, nnz: int, seed: int):
    from scipy import sparse

    rng = np.random.default_rng(seed)
    terms = (rng.zipf(1.1, (n, nnz)) - 1) % VOCAB
    weights = np.minimum(np.round(rng.lognormal(0, 0.5, n * nnz) * 64) / 64, 31).astype(np.float32)
    m = sparse.csr_matrix((weights, (np.repeat(np.arange(n), nnz), terms.ravel())), shape=(n, VOCAB))
    m.sum_duplicates()
    m.data = np.minimum(m.data, 31)
    return m


def check(device: str, docs: int, queries: int, dim: int, k: int, shard: int) -> dict:
    from retrieval_scaling.search import brute_force_sparse
    from retrieval_scaling.shard_search import TorchSearch
    from retrieval_scaling.topk import merge_top_k, top_k_rows

    searcher = TorchSearch(device)
    rng = np.random.default_rng(0)
    dense_docs = (rng.integers(0, 8, (docs, dim)) / 8).astype(np.float16)  # as the store holds them
    dense_q = (rng.integers(0, 8, (queries, dim)) / 8).astype(np.float32)
    sparse_docs, sparse_q = grid_sparse(docs, 275, 1), grid_sparse(queries, 30, 2)
    out = {"device": device, "docs": docs, "queries": queries, "k": k, "shard": shard}
    for name, d, q, brute in (("dense", dense_docs, dense_q,
                               lambda: top_k_rows(dense_q @ dense_docs.astype(np.float32).T, k)),
                              ("sparse", sparse_docs, sparse_q, lambda: brute_force_sparse(sparse_q, sparse_docs, k))):
        start = time.perf_counter()
        prepared = searcher.prepare(q)
        s_all = np.full((queries, 0), -np.inf, dtype=np.float32)
        i_all = np.full((queries, 0), -1, dtype=np.int64)
        for lo in range(0, docs, shard):
            s, i = searcher.top_k(prepared, searcher.index(d[lo:lo + shard]), k)
            s_all, i_all = merge_top_k(s_all, i_all, s, i + lo, k)
        seconds = time.perf_counter() - start
        want_s, want_i = brute()
        out[name] = {"identical_to_brute_force": bool(np.array_equal(i_all, want_i) and np.array_equal(s_all, want_s)),
                     "queries_per_s": round(queries / seconds, 1),
                     "tied_at_kth": int(sum((row == row[-1]).sum() > 1 for row in want_s))}
    out["ok"] = out["dense"]["identical_to_brute_force"] and out["sparse"]["identical_to_brute_force"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--docs", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--shard", type=int, default=20_000)
    args = parser.parse_args()
    result = check(args.device, args.docs, args.queries, args.dim, args.k, args.shard)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
