"""Training data preparation, a cached stage: BM25 hard negatives and teacher scores per query.

Teacher: BM25 (bm25s, English stop words, Snowball stemming) — a real lexical scorer that runs here
offline. Its raw scores are the teacher scores for KD (MarginMSE margins; the CL+KD teacher softmax
at T=1). Cross-encoder teachers are a later stage option (issue: evaluation and data preparation).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .data import Collection, load_collection
from .errors import ConfigError
from .identity import content_hash
from .stages import build_once

log = logging.getLogger(__name__)


class BM25Index:
    """bm25s over a collection's documents; scores for every document of the corpus per query."""

    def __init__(self, corpus: Mapping[str, str]):
        import bm25s
        import Stemmer
        from bm25s.tokenization import Tokenizer

        self.doc_ids = list(corpus)
        self.position = {d: i for i, d in enumerate(self.doc_ids)}
        self.tokenizer = Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer("english"))
        tokens = self.tokenizer.tokenize(list(corpus.values()), return_as="tuple", show_progress=False)
        self.retriever = bm25s.BM25()
        self.retriever.index(tokens, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        # Unknown terms are dropped; a query of unknown terms only becomes the empty token (score 0).
        tokens = self.tokenizer.tokenize([query], update_vocab=False, return_as="ids", show_progress=False)[0]
        if not tokens:
            return np.zeros(len(self.doc_ids), dtype=np.float32)
        return self.retriever.get_scores(tokens)


def training_data_dir(data_cfg: Mapping[str, Any], cache_root: Path) -> Path:
    key = content_hash({k: data_cfg[k] for k in ("name", "split", "negatives", "teacher")})
    return Path(cache_root) / "training" / f"{data_cfg['name']}-{data_cfg['split']}-{key}"


def ensure_training_data(data_cfg: Mapping[str, Any], cache_root: Path) -> Path:
    """`<dir>/examples.jsonl`: one query per line with positives, hard negatives and teacher scores."""
    if data_cfg["negatives"]["miner"] != "bm25" or data_cfg["teacher"] != "bm25":
        raise ConfigError(
            f"data: negatives.miner={data_cfg['negatives']['miner']!r}, teacher={data_cfg['teacher']!r}; "
            "this version prepares BM25 negatives and BM25 teacher scores only (set both to bm25)."
        )
    out = training_data_dir(data_cfg, cache_root)
    return build_once(out, lambda tmp: _prepare(data_cfg, tmp), f"prepare {data_cfg['name']}")


def _prepare(data_cfg: Mapping[str, Any], out: Path) -> None:
    from tqdm import tqdm

    coll: Collection = load_collection(data_cfg.get("root"), data_cfg["name"], data_cfg["split"])
    index = BM25Index(coll.corpus)
    depth, keep = int(data_cfg["negatives"]["depth"]), int(data_cfg["negatives"]["keep"])
    lines, short = [], 0
    for qid, query in tqdm(coll.queries.items(), desc="mine negatives (bm25)", mininterval=10):
        scores = index.scores(query)
        positives = [d for d, rel in coll.qrels[qid].items() if rel > 0]
        if not positives:
            continue
        top = np.argsort(-scores)[:depth]
        negatives = [index.doc_ids[i] for i in top if index.doc_ids[i] not in positives][:keep]
        short += len(negatives) < keep
        pos_scores = {d: float(scores[index.position[d]]) for d in positives}
        neg_scores = {index.doc_ids[i]: float(scores[i]) for i in top if index.doc_ids[i] in negatives}
        lines.append(json.dumps({
            "qid": qid, "query": query, "positives": positives, "negatives": negatives,
            "teacher": {**pos_scores, **neg_scores},
        }))
    (out / "examples.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"queries": len(lines), "queries_with_fewer_negatives": short, "depth": depth, "keep": keep,
            "teacher": "bm25", "collection": coll.name, "split": data_cfg["split"]}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("prepared %d training queries (%d with < %d negatives)", len(lines), short, keep)


def load_examples(path: Path) -> list[dict]:
    with (Path(path) / "examples.jsonl").open() as handle:
        return [json.loads(line) for line in handle if line.strip()]
