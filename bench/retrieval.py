"""Retrieval benchmark: exact sparse search (our inverted index) vs scipy brute force, on SciFact test
encoded by a trained sparse cell; dense faiss search throughput; corpus encoding throughput (the
trained cell on SciFact, and tiny / SmolLM2-135M encoders at 128 tokens).

    python bench/retrieval.py [--sweep tiny] [--cell <cell_id>] [--repeats 3] [--out bench/results/retrieval.json]

The cell: the given one, else the first DONE sparse cell of the sweep (`make demo` leaves 9), else a
tiny sparse cell trained here first (about two minutes). Both searches run in this process on the
same representations, each timed best-of-`repeats`, and must return the same top-100 (ids and order).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from record import write_result  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_of(repeats: int, fn):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def find_sparse_cell(sweeps: Path, sweep: str, cell: str | None) -> Path:
    cells = sweeps / sweep / "cells"
    if cell:
        return cells / cell
    for d in sorted(cells.glob("*")) if cells.is_dir() else []:
        cfg = d / "config.yaml"
        if (d / "DONE").is_file() and (d / "final").is_dir() and "name: sparse" in cfg.read_text():
            return d
    return Path()


def train_one(sweeps: Path) -> Path:
    """A tiny sparse CL+KD cell (the e2e test's), when no trained one exists."""
    args = ["model=tiny_s", "paradigm=sparse", "loss=cl_kd", "sweep.name=bench", "budget.flops=3e11",
            "model.pretrain.steps=60", "model.mntp.steps=20"]
    env = {**os.environ, "RS_SWEEPS_DIR": str(sweeps)}
    subprocess.run([sys.executable, "-m", "retrieval_scaling.sweep", *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return find_sparse_cell(sweeps, "bench", None)


def encoding_throughput(case: str, docs: int = 256, length: int = 128, batch: int = 32) -> float:
    """Docs/s of a cell's encoder (random weights of its architecture: speed depends on shapes only)
    on `docs` passages of `length` tokens, as evaluation runs it (`inference_encoder`: LoRA merged,
    bf16 weights, sdpa), no grad."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from train_step import case_config

    from retrieval_scaling.flopcheck import RandomStep
    from retrieval_scaling.inference import inference_encoder

    step = RandomStep(case_config(case), queries=1, passages_per_query=1)
    encoder = inference_encoder(step.encoder, "auto", "sdpa")
    ids = torch.randint(2, step.arch.vocab_size, (docs, length))
    mask = torch.ones_like(ids)
    half = next(encoder.parameters()).dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
        encoder(ids[:batch], mask[:batch])
        start = time.perf_counter()
        for i in range(0, docs, batch):
            encoder(ids[i:i + batch], mask[i:i + batch])
    return docs / (time.perf_counter() - start)


def main() -> None:
    import torch
    from omegaconf import OmegaConf

    from retrieval_scaling.cell_model import load_trained_encoder
    from retrieval_scaling.data import load_collection
    from retrieval_scaling.inference import encode_texts, inference_encoder
    from retrieval_scaling.search import InvertedIndex, brute_force_sparse, to_csr
    from retrieval_scaling.topk import dense_top_k

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="tiny")
    parser.add_argument("--cell", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "retrieval.json"))
    args = parser.parse_args()

    sweeps = Path(os.environ.get("RS_SWEEPS_DIR", ROOT / "sweeps"))
    cell_dir = find_sparse_cell(sweeps, args.sweep, args.cell)
    if not (cell_dir / "DONE").is_file():
        cell_dir = train_one(sweeps)
    cell_cfg = OmegaConf.to_container(OmegaConf.load(cell_dir / "config.yaml"), resolve=True)
    encoder, tokenizer = load_trained_encoder(cell_cfg, cell_dir)
    encoder = inference_encoder(encoder, cell_cfg["eval"].get("dtype", "auto"),
                                cell_cfg["model"].get("eval_attn_implementation"))
    coll = load_collection(os.environ.get("RS_DATA_DIR"), "scifact", "test")
    threads = torch.get_num_threads()

    docs_text, queries_text = list(coll.corpus.values()), list(coll.queries.values())
    # a sparse encoder's reps come back as CSR (evaluation never builds the dense corpus array)
    t_docs, docs = best_of(1, lambda: encode_texts(encoder, tokenizer, docs_text, 128, 256, "docs"))
    queries = encode_texts(encoder, tokenizer, queries_text, 32, 256, "queries")
    d_csr, q_csr = to_csr(docs), to_csr(queries)

    t_build, index = best_of(args.repeats, lambda: InvertedIndex(d_csr))
    index.search(q_csr[:2], args.k)  # compile (numba caches it on disk afterwards)
    t_index, (s_idx, i_idx) = best_of(args.repeats, lambda: index.search(q_csr, args.k))
    t_scipy, (s_ref, i_ref) = best_of(args.repeats, lambda: brute_force_sparse(q_csr, d_csr, args.k))
    identical = bool(np.array_equal(i_idx, i_ref))

    dim = encoder.backbone.get_input_embeddings().weight.shape[1]  # the dense head's width for this model
    dense_docs = np.random.default_rng(0).normal(size=(len(docs_text), dim)).astype(np.float32)
    dense_q = np.random.default_rng(1).normal(size=(len(queries_text), dim)).astype(np.float32)
    t_dense, _ = best_of(args.repeats, lambda: dense_top_k(dense_q, dense_docs, 1000))

    result = {
        "benchmark": "retrieval", "collection": "scifact/test", "cell": cell_dir.name,
        "model": cell_cfg["model"]["name"], "docs": len(docs_text), "queries": len(queries_text),
        "vocab": int(docs.shape[1]), "doc_nnz_mean": d_csr.nnz / d_csr.shape[0],
        "query_nnz_mean": q_csr.nnz / q_csr.shape[0], "k": args.k, "threads": threads,
        "sparse_inverted_index_s": t_index, "sparse_scipy_brute_force_s": t_scipy,
        "sparse_speedup_vs_scipy": t_scipy / t_index, "sparse_index_build_s": t_build,
        "sparse_top_k_identical": identical,
        "dense_faiss_queries_per_s": len(dense_q) / t_dense, "dense_dim": dim,
        "encode_docs_per_s": len(docs_text) / t_docs,
        "encode_docs_per_s_128_tokens": {c: encoding_throughput(c) for c in
                                          ("tiny_s/dense/cl", "tiny_l/dense/cl", "smollm2_135m/dense/cl",
                                           "smollm2_135m/sparse/cl")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
