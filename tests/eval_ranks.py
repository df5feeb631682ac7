"""One rank of an evaluation with a real (random-weight) tiny encoder, as a cell's ranks run it:
`python tests/eval_ranks.py <beir root> <store dir> <runs dir> <paradigm> [--die-after-shards N]`, with
torch.distributed's rendezvous in the environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) for
several ranks. Prints one JSON line: this rank's metrics and encoding counts."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch

COLLECTIONS = ("dev", "dl19", "dl20", "other")


def tiny_encoder(paradigm: str, texts: list[str]):
    from transformers import LlamaConfig, LlamaForCausalLM

    from retrieval_scaling.backbone import set_bidirectional, train_bpe_tokenizer
    from retrieval_scaling.paradigms import paradigm_of

    tokenizer = train_bpe_tokenizer(texts, 512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa"))
    set_bidirectional(model, True)
    return paradigm_of({"name": paradigm}).encoder(model).eval().requires_grad_(False), tokenizer


def eval_cfg(root: Path, shard_size: int) -> dict:
    spec = {"source": "beir", "split": "test", "depth": 50, "drop_self_hits": False,
            "measures": {"ndcg_10": "nDCG@10", "recall_50": "R@50"}}
    return {"root": str(root), "query_max_len": 32, "passage_max_len": 64, "batch_size": 16,
            "contrastive_entropy": {"negatives": 100, "seed": 0},
            "shard_size": shard_size, "collections": {c: {**spec, "name": c} for c in COLLECTIONS}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("store", type=Path)
    parser.add_argument("runs", type=Path)
    parser.add_argument("paradigm")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--die-after-shards", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    from retrieval_scaling.distributed import configure_threads, init_distributed
    from retrieval_scaling.evaluation import evaluate_all
    from retrieval_scaling.inference import encoder_retriever

    configure_threads(1)
    rank, world = init_distributed()
    texts = [json.loads(line)["text"] for line in (args.root / "dev" / "corpus.jsonl").open()]
    encoder, tokenizer = tiny_encoder(args.paradigm, texts)
    retriever = encoder_retriever(encoder, tokenizer, 16, "tiny", args.store, rank, world,
                                  {"negatives": 100, "seed": 0, "temperature": 0.05})
    if args.die_after_shards:  # SIGKILL once this many shards are on disk: what an OOM kill or node loss does
        encode, calls = retriever.encode, [0]

        def encode_then_die(texts, max_len, desc):
            if "shard" in desc:
                if calls[0] == args.die_after_shards:
                    os.kill(os.getpid(), signal.SIGKILL)
                calls[0] += 1
            return encode(texts, max_len, desc)

        retriever.encode = encode_then_die
    metrics = evaluate_all(retriever, None, eval_cfg(args.root, args.shard_size), args.runs, rank,
                           args.store / "collections")  # as a cell keeps them: a requeue skips finished ones
    store = retriever.store
    print(json.dumps({"rank": rank, "metrics": metrics, "encoded_docs": store.encoded_docs,
                      "reused_shards": store.reused_shards}))


if __name__ == "__main__":
    main()
