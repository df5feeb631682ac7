"""A sparse cell's step-0 evaluation at Llama-3's vocabulary: memory and disk, pruned and whole.

An untrained Lion-SP head weighs about half of its 128,256 terms for every passage. The step-0 path
(`Evaluator.step0`: `eval.step0_max_terms`, 256 by default) keeps each query's and document's 256
largest weights. Each run is its own process: a random Llama-shaped backbone with Llama-3's vocabulary
(small hidden size, bidirectional, no bias in the head), synthetic MS MARCO-like passages
(bench/scale.py), the evaluation's encoding store with the default shard size, then an exact search
of 200 queries. Measured: peak RSS, bytes on disk per document, non-zeros per document, seconds.

    python bench/step0.py [--docs 4000 20000] [--whole-docs 1000] [--out bench/results/step0.json]

Also SmolLM2-135M's real weights with its untrained head over SciFact passages (`--smollm2-docs`).

Target (issue 32): peak RSS < 2.5 GB at 4,000 and 20,000 passages pruned; disk per document within
the documented bound (`Sparse.doc_bytes`: 256 × (4-byte weight + 4-byte term id) + 4-byte row pointer
+ 16-byte key = 2,068 bytes, and at most 2 KiB per shard file).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import write_result  # bench/ is on sys.path when a script runs
from scale import VOCAB, WordTokenizer, peak_rss_gb, synthetic_corpus

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval_scaling.paradigms import Shapes  # noqa: E402 — after the path is set
from retrieval_scaling.paradigms.sparse import Sparse  # noqa: E402

MAX_TERMS = 256
# per document: weights, term ids, row pointer, key
BOUND_BYTES = Sparse().doc_bytes(Shapes(0), {"step0_max_terms": MAX_TERMS}, 0, step0=True)
SHARD_BYTES = 2048  # per shard file: the npz archive's headers and its shape array


def untrained_sparse_encoder():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from retrieval_scaling.backbone import set_bidirectional
    from retrieval_scaling.paradigms import paradigm_of

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, attn_implementation="sdpa",
                                         bos_token_id=1, pad_token_id=0))
    set_bidirectional(model, True)
    return paradigm_of({"name": "sparse"}).encoder(model).eval().requires_grad_(False)


def child(n_docs: int, max_terms: int | None) -> dict:
    import torch

    from retrieval_scaling.data import Collection
    from retrieval_scaling.distributed import configure_threads
    from retrieval_scaling.inference import encoder_retriever, inference_encoder

    configure_threads(torch.get_num_threads())
    texts = synthetic_corpus(n_docs, seed=1)
    queries = synthetic_corpus(200, seed=2)
    coll = Collection("synthetic", {f"d{i}": t for i, t in enumerate(texts)},
                      {f"q{i}": " ".join(t.split()[:8]) for i, t in enumerate(queries)}, {})
    encoder = inference_encoder(untrained_sparse_encoder(), "auto")
    with tempfile.TemporaryDirectory() as store:
        retriever = encoder_retriever(encoder, WordTokenizer(), 256, "step0", Path(store), max_terms=max_terms)
        start = time.perf_counter()
        retriever.search(coll, 100, 32, 128, 200_000)
        seconds = time.perf_counter() - start
        disk = sum(p.stat().st_size for p in Path(store).glob("shard-*.npz"))
    return {"docs": n_docs, "max_terms": max_terms, "seconds": round(seconds, 1),
            "peak_rss_gb": round(peak_rss_gb(), 3), "disk_bytes_per_doc": round(disk / n_docs, 1),
            "doc_nnz": round(retriever.nnz["doc_nnz"], 1),
            "query_nnz": round(retriever.nnz["query_nnz"], 1)}


def smollm2_child(n_docs: int, max_terms: int) -> dict:
    """SmolLM2-135M's real, untrained sparse head (bidirectional, as a cell's step 0) on SciFact's first
    `n_docs` passages from the data root, through the same store."""
    import os

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from retrieval_scaling.backbone import load_backbone, set_bidirectional
    from retrieval_scaling.data import Collection, load_collection
    from retrieval_scaling.distributed import configure_threads
    from retrieval_scaling.gguf import ensure_converted
    from retrieval_scaling.inference import encoder_retriever, inference_encoder
    from retrieval_scaling.paradigms import paradigm_of

    configure_threads(torch.get_num_threads())
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        model_cfg = OmegaConf.to_container(compose("config", overrides=["model=smollm2_135m"]), resolve=True)["model"]
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as store:
        backbone, tokenizer = load_backbone(model_cfg, ensure_converted(model_cfg, Path(cache)))
        set_bidirectional(backbone, True)
        sparse_encoder = paradigm_of({"name": "sparse"}).encoder(backbone)
        encoder = inference_encoder(sparse_encoder.eval().requires_grad_(False), "auto")
        scifact = load_collection(os.environ["RS_DATA_DIR"], "scifact", "test")
        corpus = dict(list(scifact.corpus.items())[:n_docs])
        coll = Collection("scifact", corpus, dict(list(scifact.queries.items())[:50]), {})
        retriever = encoder_retriever(encoder, tokenizer, 64, "step0", Path(store), max_terms=max_terms)
        start = time.perf_counter()
        retriever.search(coll, 100, 32, 128, 200_000)
        seconds = time.perf_counter() - start
        disk = sum(p.stat().st_size for p in Path(store).glob("shard-*.npz"))
    return {"model": "smollm2_135m (real weights, untrained head)", "docs": n_docs, "max_terms": max_terms,
            "vocab": int(backbone.config.vocab_size), "seconds": round(seconds, 1),
            "peak_rss_gb": round(peak_rss_gb(), 3), "disk_bytes_per_doc": round(disk / n_docs, 1),
            "doc_nnz": round(retriever.nnz["doc_nnz"], 1), "query_nnz": round(retriever.nnz["query_nnz"], 1)}


def run_child(n_docs: int, max_terms: int | None, smollm2: bool = False) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(n_docs), str(max_terms or 0),
                           *(["--smollm2"] if smollm2 else [])], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: step-0 child ({n_docs} docs) failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, nargs="+", default=[4_000, 20_000])
    parser.add_argument("--whole-docs", type=int, default=1_000, help="the unpruned path, for contrast (0: skip)")
    parser.add_argument("--smollm2-docs", type=int, default=2_000, help="SciFact passages through SmolLM2-135M's "
                        "real head (0: skip; needs RS_DATA_DIR)")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--smollm2", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "step0.json")
    args = parser.parse_args()
    if args.child:
        run = smollm2_child if args.smollm2 else child
        print(json.dumps(run(args.child[0], args.child[1] or None)))
        return
    pruned = [run_child(n, MAX_TERMS) for n in args.docs]
    if args.smollm2_docs:
        pruned.append(run_child(args.smollm2_docs, MAX_TERMS, smollm2=True))
    whole = run_child(args.whole_docs, None) if args.whole_docs else None
    write_result(args.out, {
        "benchmark": "step0", "vocab": VOCAB, "max_terms": MAX_TERMS, "bound_bytes_per_doc": BOUND_BYTES,
        "pruned": pruned, "whole": whole,
        "rss_below_2_5_gb": all(r["peak_rss_gb"] < 2.5 for r in pruned),
        "disk_within_bound": all(r["disk_bytes_per_doc"] <= BOUND_BYTES + SHARD_BYTES / r["docs"] for r in pruned)})


if __name__ == "__main__":
    main()
