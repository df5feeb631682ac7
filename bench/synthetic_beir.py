"""A small BEIR-format collection made from nothing, so that checks need only the repository.

Passages are `scale.synthetic_corpus`'s (MS MARCO-like lengths, Zipfian words). Each query is five of
its passage's words, drawn from the rarer half of them, so that lexical and learned retrieval have
something to find; the first three quarters of the queries are judged in `train`, the rest in `test`.

    python bench/synthetic_beir.py <data root> [--name scifact] [--docs 3000] [--queries 400]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scale import synthetic_corpus


def write_collection(root: Path, name: str = "scifact", docs: int = 3000, queries: int = 400, seed: int = 0) -> Path:
    """`<root>/<name>/` with corpus.jsonl, queries.jsonl and qrels/{train,test}.tsv; returns it."""
    rng = np.random.default_rng(seed)
    passages = synthetic_corpus(docs, seed)
    base = Path(root) / name
    (base / "qrels").mkdir(parents=True, exist_ok=True)
    with (base / "corpus.jsonl").open("w") as f:
        for i, text in enumerate(passages):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    targets = rng.choice(docs, size=queries, replace=False)
    rows = []
    with (base / "queries.jsonl").open("w") as f:
        for q, d in enumerate(targets):
            words = sorted(set(passages[d].split()), key=lambda w: -int(w[1:]))  # rarer (higher rank) first
            picked = rng.choice(words[:max(5, len(words) // 2)], size=min(5, len(words)), replace=False)
            f.write(json.dumps({"_id": f"q{q}", "text": " ".join(picked)}) + "\n")
            rows.append((f"q{q}", f"d{d}"))
    cut = queries * 3 // 4
    for split, part in (("train", rows[:cut]), ("test", rows[cut:])):
        (base / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in part))
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--name", default="scifact")
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--queries", type=int, default=400)
    args = parser.parse_args()
    print(write_collection(args.root, args.name, args.docs, args.queries))


if __name__ == "__main__":
    main()
