"""Evaluation at the paper's sizes, rehearsed on a CPU.

1. The evaluation path (`EncoderRetriever` over an `EncodingStore`: sharded encoding, persisted shards,
   exact search) with dense and sparse encoders over Llama-3's 128,256-term vocabulary (a tiny random
   backbone; the sparse one's LM head biased so that a document keeps ~200 terms, as a trained
   SPLADE-style model does), on synthetic corpora of 20,000 and 100,000 passages with MS MARCO-like
   lengths. Each run is its own process: its peak RSS is that of the evaluation alone. On the smaller
   corpus the top-k is checked against brute force over the same reps.
2. Exact sparse search at MS MARCO's order of size: 1M synthetic SPLADE-like documents (~200 non-zeros,
   Zipfian term use over 128k terms) and 1,000 queries; our inverted index, torch's path (a GPU cell's,
   run on the CPU device, 200k-document shards) and scipy brute force on the same vectors (a sample of
   queries for scipy), top-1000 compared hit for hit.

    python bench/scale.py [--docs 20000 100000] [--search-docs 1000000] [--out bench/results/scale.json]

Prints one JSON object (with date, commit and CPU model) and writes it to `--out`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from record import write_result  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 128_256  # Llama-3's
WORDS = 50_000  # synthetic word types


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class WordTokenizer:
    """Words → ids below `WORDS` (a stand-in for BPE with the same length profile), BOS 1, pad 0."""

    bos_token_id, pad_token_id = 1, 0

    def __call__(self, texts, add_special_tokens=False, truncation=True, max_length=None):  # noqa: ARG002
        return {"input_ids": [[2 + int(w[1:]) for w in t.split()][:max_length] for t in texts]}


def synthetic_corpus(n: int, seed: int) -> list[str]:
    """MS MARCO-like lengths: log-normal word counts with mean ~56 (5 to 200), Zipfian words."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(50), 0.45, n).astype(int), 5, 200)
    words = np.minimum(rng.zipf(1.2, lengths.sum()), WORDS - 3)
    out, at = [], 0
    for length in lengths:
        out.append(" ".join(f"w{w}" for w in words[at:at + length]))
        at += length
    return out


def tiny_encoder(paradigm: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from retrieval_scaling.backbone import set_bidirectional
    from retrieval_scaling.paradigms import paradigm_of

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, attn_implementation="sdpa",
                                         bos_token_id=1, pad_token_id=0))
    set_bidirectional(model, True)
    if paradigm == "sparse":
        # A head with a bias at ~3.85 standard deviations of its logits: of 128k terms, ~200 are positive after
        # max-pooling ~75 tokens (a trained SPLADE-style model's sparsity; random weights give ~half the vocabulary).
        old = model.lm_head
        head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            head.weight.copy_(old.weight)
            head.bias.fill_(-3.85 * float(old.weight.std()) * (old.in_features ** 0.5))
        model.lm_head = head
    return paradigm_of({"name": paradigm}).encoder(model).eval().requires_grad_(False)


def eval_child(paradigm: str, n_docs: int, shard_size: int, check: bool) -> dict:
    import torch
    from scipy import sparse

    from retrieval_scaling.data import Collection
    from retrieval_scaling.distributed import configure_threads
    from retrieval_scaling.inference import encoder_retriever, inference_encoder
    from retrieval_scaling.search import brute_force_sparse
    from retrieval_scaling.topk import top_k_rows

    configure_threads(torch.get_num_threads())
    texts = synthetic_corpus(n_docs, seed=1)
    queries = synthetic_corpus(200, seed=2)
    coll = Collection("synthetic", {f"d{i}": t for i, t in enumerate(texts)},
                      {f"q{i}": " ".join(t.split()[:8]) for i, t in enumerate(queries)}, {})
    encoder = inference_encoder(tiny_encoder(paradigm), "auto")
    with tempfile.TemporaryDirectory() as store:
        retriever = encoder_retriever(encoder, WordTokenizer(), 128, "bench", Path(store))
        start = time.perf_counter()
        _, scores, idx = retriever.search(coll, 100, 32, 128, shard_size)
        seconds = time.perf_counter() - start
        out = {"paradigm": paradigm, "docs": n_docs, "shard_size": shard_size, "seconds": round(seconds, 1),
               "docs_per_s": round(n_docs / seconds, 1), "peak_rss_gb": round(peak_rss_gb(), 3),
               "shards": len(retriever.store.shard_names())}
        if paradigm == "sparse":
            out["doc_nnz"] = round(retriever.nnz["doc_nnz"], 1)
        if check:  # brute force over the same reps, read back from the store in corpus order (after the RSS is read)
            store_ = retriever.store
            view = store_.ensure(texts, 128, "check")
            rows = {}
            for name, (r, first) in view.rows.items():
                reps = store_.read_reps(name)[r]
                for j, p in enumerate(first):
                    rows[int(p)] = reps[j]
            q = retriever.encode(list(coll.queries.values()), 32, "queries")
            if paradigm == "sparse":
                docs = sparse.vstack([rows[p] for p in range(n_docs)], format="csr")
                _, want = brute_force_sparse(q, docs, 100)
            else:
                docs = np.stack([rows[p] for p in range(n_docs)])
                _, want = top_k_rows(q @ docs.T, 100)
            out["top_k_identical_to_brute_force"] = bool(np.array_equal(idx, want))
    return out


def sparse_search(n_docs: int, n_queries: int, scipy_sample: int, k: int, shard_size: int = 200_000) -> dict:
    """Synthetic SPLADE-like vectors: ~200 (documents) / ~30 (queries) distinct Zipfian terms, log-normal
    weights on a grid of 1/64 below 32, so that every score is exact in float32 (and every weight in
    float16) whatever the order of its sum: the three searches can then be compared hit for hit. Our
    numba index over the whole corpus, torch's path (what a GPU cell runs; here on the CPU device) shard
    by shard as the store feeds it, and scipy brute force on a sample of the queries."""
    import numba
    import torch
    from gpu_search import grid_sparse

    from retrieval_scaling.search import InvertedIndex, brute_force_sparse
    from retrieval_scaling.shard_search import TorchSearch
    from retrieval_scaling.topk import merge_top_k

    docs, queries = grid_sparse(n_docs, 275, 3), grid_sparse(n_queries, 30, 4)  # ~200 and ~27 distinct terms
    start = time.perf_counter()
    index = InvertedIndex(docs)
    build = time.perf_counter() - start
    start = time.perf_counter()
    scores, idx = index.search(queries, k)
    ours = time.perf_counter() - start
    del index
    searcher = TorchSearch("cpu")
    start = time.perf_counter()
    prepared = searcher.prepare(queries)
    t_s, t_i = np.full((n_queries, 0), -np.inf, dtype=np.float32), np.full((n_queries, 0), -1, dtype=np.int64)
    for lo in range(0, n_docs, shard_size):
        s, i = searcher.top_k(prepared, searcher.index(docs[lo:lo + shard_size]), k)
        t_s, t_i = merge_top_k(t_s, t_i, s, i + lo, k)
    torch_time = time.perf_counter() - start
    sample = queries[:scipy_sample]
    start = time.perf_counter()
    want_s, want = brute_force_sparse(sample, docs, k)
    brute = time.perf_counter() - start
    threads = numba.get_num_threads()
    return {"docs": n_docs, "queries": n_queries, "k": k, "doc_nnz": round(docs.nnz / n_docs, 1),
            "query_nnz": round(queries.nnz / n_queries, 1), "index_build_s": round(build, 1),
            "ours_queries_per_s": round(n_queries / ours, 2), "scipy_queries_per_s": round(scipy_sample / brute, 2),
            "torch_cpu_queries_per_s": round(n_queries / torch_time, 2), "torch_shard_size": shard_size,
            "torch_threads": torch.get_num_threads(),
            "speedup_vs_scipy": round((n_queries / ours) / (scipy_sample / brute), 2), "threads": threads,
            "ours_queries_per_s_per_core": round(n_queries / ours / threads, 2),
            "top_k_identical_on_scipy_sample": bool(np.array_equal(idx[:scipy_sample], want)
                                                    and np.array_equal(scores[:scipy_sample], want_s)),
            "torch_top_k_identical_on_scipy_sample": bool(np.array_equal(t_i[:scipy_sample], want)
                                                          and np.array_equal(t_s[:scipy_sample], want_s)),
            "torch_top_k_identical_to_ours": bool(np.array_equal(t_i, idx) and np.array_equal(t_s, scores)),
            "scipy_sample": scipy_sample,
            # The authors' index: ~15 min for MS MARCO dev's 6,980 queries on > 32 CPUs.
            "authors_queries_per_s_per_core_at_most": round(6980 / (15 * 60) / 32, 3),
            "peak_rss_gb": round(peak_rss_gb(), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--shard-size", type=int, default=20_000)
    parser.add_argument("--search-docs", type=int, default=1_000_000)
    parser.add_argument("--search-queries", type=int, default=1_000)
    parser.add_argument("--scipy-sample", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument("--child", nargs=2, metavar=("PARADIGM", "DOCS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        paradigm, docs = args.child[0], int(args.child[1])
        print(json.dumps(eval_child(paradigm, docs, args.shard_size, docs == min(args.docs))))
        return
    result = {"evaluation": [], "rss_growth": {}}
    for paradigm in ("sparse", "dense"):
        for docs in args.docs:
            child = ["--child", paradigm, str(docs), "--shard-size", str(args.shard_size),
                     "--docs", *map(str, args.docs)]
            proc = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-3000:])
            result["evaluation"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(result["evaluation"][-1]), file=sys.stderr)
        rss = [r["peak_rss_gb"] for r in result["evaluation"] if r["paradigm"] == paradigm]
        result["rss_growth"][paradigm] = round(rss[-1] / rss[0], 3)
    if args.search_docs:
        result["sparse_search"] = sparse_search(args.search_docs, args.search_queries, args.scipy_sample, 1000)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
