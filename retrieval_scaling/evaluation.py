"""Evaluation: rank each configured collection with a retriever, score the run with ir_measures.

Per collection (conf/eval/*): its measures (`<collection>/<metric>`), depth, lengths, and the BEIR
rule that drops a hit whose id equals the query id; collections of a `group` (BEIR-13) are also
averaged, unweighted, as `<group>/<metric>`. Runs are written as TREC run files. The `evaluate` verb
(retrieval_scaling/evaluate.py) runs this on a finished cell or a baseline.
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import sparse

from .data import Collection
from .encoders import Encoder, encode_inputs
from .errors import ConfigError
from .precision import weight_dtype
from .retrievers import EncoderRetriever, Retriever, Run

log = logging.getLogger(__name__)



def inference_encoder(encoder: Encoder, dtype: str = "auto", attn_implementation: str | None = None) -> Encoder:
    """The encoder as evaluation runs it, built on a copy so that training state is untouched: LoRA
    merged into the weights it adapts (no adapter matmuls, scale and add per layer and batch), every
    weight in `dtype` (bf16: no per-batch casts of weights, a half-width residual stream; `auto`: bf16
    where the encoder's device has it natively, see `precision`) and the inference attention kernel."""
    from peft import PeftModel

    torch_dtype = weight_dtype(dtype, next(encoder.parameters()).device, "eval.dtype")
    model = copy.deepcopy(encoder)
    if isinstance(model.backbone, PeftModel):
        model.backbone = model.backbone.merge_and_unload()
    if attn_implementation:
        model.backbone.set_attn_implementation(attn_implementation)
    return model.to(torch_dtype).eval().requires_grad_(False)


@torch.no_grad()
def encode_texts(encoder: Encoder, tokenizer, texts: list[str], max_len: int, batch_size: int,
                 desc: str, max_terms: int | None = None) -> torch.Tensor | sparse.csr_matrix:
    """Reps of `texts` in input order: fp32 for a dense encoder; for a sparse one CSR, each batch's
    reps made sparse as it comes, so no dense (texts, vocabulary) array exists beyond one batch's;
    with `max_terms`, each sparse rep keeps only its `max_terms` largest weights.
    Batches are formed over length-sorted texts so that padding is small, on the encoder's device,
    under bf16 autocast where its weights are bf16 (see `inference_encoder`)."""
    from tqdm import tqdm

    encoder.eval()
    weight = next(encoder.parameters())
    device, half = weight.device, weight.dtype == torch.bfloat16
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len - 1)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    chunks: list = []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, mininterval=10):
        rows = order[start:start + batch_size]
        input_ids, mask = encode_inputs([ids[i] for i in rows], tokenizer.bos_token_id,
                                        tokenizer.pad_token_id, max_len)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
            reps = encoder(input_ids.to(device), mask.to(device)).float()
        chunks.append(batch_csr(reps, max_terms) if encoder.sparse else reps.cpu())
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    if encoder.sparse:
        return sparse.vstack(chunks, format="csr")[inverse]
    return torch.cat(chunks)[torch.as_tensor(inverse)]


def pruned_names(metrics: Mapping[str, float], max_terms: int) -> dict[str, float]:
    """`scifact/ndcg_10` → `scifact:top256/ndcg_10`: metrics of vectors pruned to `max_terms` terms."""
    return {f"{where}:top{max_terms}/{what}": value
            for key, value in metrics.items() for where, what in [key.split("/", 1)]}


def batch_csr(reps: torch.Tensor, max_terms: int | None = None) -> sparse.csr_matrix:
    """A batch's sparse reps as CSR, made on their device: only the non-zeros cross to host memory (a
    (256, 128,256) fp32 batch is 131 MB dense, ~0.2 MB as CSR at 200 terms a document). With
    `max_terms`, each row keeps its `max_terms` largest weights (the rest set to zero) first."""
    if max_terms is not None and reps.shape[1] > max_terms:
        top = reps.topk(int(max_terms), dim=1)
        reps = torch.zeros_like(reps).scatter_(1, top.indices, top.values)
    m = reps.to_sparse_csr()
    return sparse.csr_matrix((m.values().cpu().numpy(), m.col_indices().cpu().numpy(), m.crow_indices().cpu().numpy()),
                             shape=tuple(reps.shape))


def encoder_retriever(encoder: Encoder, tokenizer, batch_size: int, name: str = "cell",
                      store_root: Path | None = None, rank: int = 0, world: int = 1,
                      entropy: Mapping[str, Any] | None = None, max_terms: int | None = None) -> EncoderRetriever:
    """An encoder (as `inference_encoder` prepares it) behind the retriever interface; its corpus
    encodings persist under `store_root` (see `EncoderRetriever`). `max_terms`: a sparse encoder's
    queries and documents pruned to their largest weights (`encode_texts`)."""
    def encode(texts: list[str], max_len: int, desc: str):
        reps = encode_texts(encoder, tokenizer, texts, max_len, batch_size, desc, max_terms)
        return reps if encoder.sparse else reps.numpy()

    return EncoderRetriever(name, encode, encoder.sparse, store_root, rank, world, entropy)


def entropy_spec(eval_cfg: Mapping[str, Any], paradigm_cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the contrastive entropy of a cell's evaluation needs: the sample (`eval.contrastive_entropy`)
    and the paradigm's temperature; None when the evaluation turns it off."""
    spec = eval_cfg.get("contrastive_entropy")
    if not spec:
        return None
    return {"negatives": int(spec["negatives"]), "seed": int(spec["seed"]),
            "temperature": float(paradigm_cfg.get("temperature") or 1.0)}


def rank_collection(retriever: Retriever, coll: Collection, spec: Mapping[str, Any],
                    eval_cfg: Mapping[str, Any]) -> Run:
    """The run of `retriever` on `coll`: `depth` hits per query, best first, self hits dropped when
    the collection asks for it (one extra hit is fetched so that `depth` remain)."""
    depth, drop = int(spec["depth"]), bool(spec.get("drop_self_hits", False))
    doc_ids = list(coll.corpus)
    qids, scores, idx = retriever.search(
        coll, min(depth + drop, len(doc_ids)), int(spec.get("query_max_len") or eval_cfg["query_max_len"]),
        int(spec.get("passage_max_len") or eval_cfg["passage_max_len"]), int(eval_cfg.get("shard_size") or 200000))
    run: Run = {}
    if scores is None:  # a rank > 0 of a multi-rank search: rank 0 holds the run
        return run
    for row, qid in enumerate(qids):
        hits = [(doc_ids[j], float(s)) for s, j in zip(scores[row], idx[row], strict=True) if j >= 0]
        if drop:
            hits = [h for h in hits if h[0] != qid]
        run[qid] = dict(hits[:depth])
    return run


def parse_measures(measures: Mapping[str, str]) -> dict:
    import ir_measures

    parsed = {}
    for name, text in measures.items():
        try:
            parsed[name] = ir_measures.parse_measure(text)
        except (ValueError, NameError, SyntaxError) as exc:
            raise ConfigError(f"measure {name}: {text!r} is not an ir_measures measure ({exc}).") from None
    return parsed


def score_run(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]],
              measures: Mapping[str, str], prefix: str) -> dict[str, float]:
    """Mean of each measure over the judged queries (a query without hits scores 0)."""
    import ir_measures

    parsed = parse_measures(measures)
    full = {q: dict(run.get(q) or {}) for q in qrels}
    agg = ir_measures.calc_aggregate(list(parsed.values()), qrels, full)
    return {f"{prefix}/{name}": float(agg[m]) for name, m in parsed.items()}


def per_query_scores(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]],
                     measures: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """{measure name: {query id: value}} over every judged query (0 where a query has no hits): what
    `score_run` averages, kept so that intervals can resample queries."""
    import ir_measures

    parsed = parse_measures(measures)
    names = {m: name for name, m in parsed.items()}
    out: dict[str, dict[str, float]] = {name: dict.fromkeys(qrels, 0.0) for name in parsed}
    for row in ir_measures.iter_calc(list(parsed.values()), qrels, {q: dict(h) for q, h in run.items() if h}):
        if row.query_id in qrels:
            out[names[row.measure]][row.query_id] = float(row.value)
    return out


def write_run(run: Run, path: Path, tag: str) -> Path:
    """A TREC run file (`qid Q0 docid rank score tag`), gzipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as out:
        for qid, hits in run.items():
            for r, (doc, score) in enumerate(sorted(hits.items(), key=lambda kv: -kv[1]), start=1):
                out.write(f"{qid} Q0 {doc} {r} {score:.6g} {tag}\n")
    return path


def subset_collection(coll: Collection, queries: int, bm25_depth: int, seed: int) -> Collection:
    """A declared evaluation subset, for models too slow to encode a whole corpus here: `queries` test
    queries drawn with `seed`, searched over a pool of their judged documents plus each one's BM25 top
    `bm25_depth`. Its name says so (`scifact:q100-bm25_100`), so its metrics are never taken for the
    full-corpus numbers. Scores over a pool are optimistic: only the pool's documents compete."""
    from .bm25 import BM25Index

    qids = sorted(coll.queries)
    picked = sorted(np.random.default_rng(seed).choice(len(qids), size=min(queries, len(qids)), replace=False))
    chosen = [qids[i] for i in picked]
    index = BM25Index(coll.corpus)
    pool = {d for q in chosen for d in coll.qrels[q]}
    _, top = index.top_k([coll.queries[q] for q in chosen], bm25_depth)
    pool.update(index.doc_ids[i] for i in top.ravel())
    return Collection(name=f"{coll.name}:q{len(chosen)}-bm25_{bm25_depth}",
                      corpus={d: t for d, t in coll.corpus.items() if d in pool},
                      queries={q: coll.queries[q] for q in chosen}, qrels={q: coll.qrels[q] for q in chosen})


def collection_specs(eval_cfg: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    specs = list(eval_cfg["collections"].values())
    if not specs:
        raise ConfigError("eval.collections is empty: pick an evaluation (eval=scifact, eval=paper, ...).")
    return specs


def load_eval_collection(spec: Mapping[str, Any], eval_cfg: Mapping[str, Any]) -> Collection:
    """One evaluation collection, subset when `eval.subset` asks for it."""
    from .data import load_source

    coll = load_source(spec, eval_cfg["root"])
    sub = eval_cfg.get("subset")
    if sub:
        coll = subset_collection(coll, int(sub["queries"]), int(sub["bm25_depth"]), int(sub["seed"]))
    return coll


def iter_eval_collections(eval_cfg: Mapping[str, Any]) -> Iterator[Collection]:
    """The evaluation collections in config order, each loaded when the previous one is done with:
    one collection's corpus in memory at a time (BEIR-13 + MS MARCO are ~34M documents)."""
    for spec in collection_specs(eval_cfg):
        yield load_eval_collection(spec, eval_cfg)


def group_means(metrics: Mapping[str, float], specs: Sequence[Mapping[str, Any]],
                names: Sequence[str]) -> dict[str, float]:
    """`<group>/<metric>`: the unweighted mean over a group's collections (BEIR-13's average);
    `names`: each spec's collection name as its metrics are prefixed."""
    out = {}
    for group, members in group_members(specs, names).items():
        shared = set.intersection(*({k[len(c) + 1:] for k in metrics if k.startswith(f"{c}/")}
                                    - {"doc_nnz", "query_nnz"} for c in members))
        for measure in sorted(shared):
            out[f"{group}/{measure}"] = float(np.mean([metrics[f"{c}/{measure}"] for c in members]))
    return out


def group_members(specs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, list[str]]:
    """Each group's collections, by their metric names."""
    groups: dict[str, list[str]] = {}
    for spec, name in zip(specs, names, strict=True):
        if spec.get("group"):
            groups.setdefault(spec["group"], []).append(name)
    return groups


def evaluate_all(retriever: Retriever, collections: Iterable[Collection] | None, eval_cfg: Mapping[str, Any],
                 runs_dir: Path | None = None, rank: int = 0) -> dict[str, float]:
    """Metrics of `retriever` on every collection (+ group means); run files into `runs_dir`.
    `collections`: in the order of `eval.collections`; None loads them one at a time. Every rank of
    a multi-rank retriever calls it; rank 0 scores and returns the metrics, the others {}."""
    import gc

    specs = collection_specs(eval_cfg)
    metrics: dict[str, float] = {}
    names: list[str] = []
    per_query: dict[str, dict[str, dict[str, float]]] = {}
    entropy = eval_cfg.get("contrastive_entropy")
    source = iter_eval_collections(eval_cfg) if collections is None else iter(collections)
    for spec in specs:
        coll = next(source)
        names.append(coll.name)
        run = rank_collection(retriever, coll, spec, eval_cfg)
        if rank != 0:
            continue
        metrics.update(score_run(run, coll.qrels, spec["measures"], coll.name))
        per_query[coll.name] = per_query_scores(run, coll.qrels, spec["measures"])
        if entropy and getattr(retriever, "per_query_entropy", None):
            from .contrastive_entropy import metric_name

            per_query[coll.name][metric_name(entropy)] = retriever.per_query_entropy
            metrics[f"{coll.name}/{metric_name(entropy)}"] = float(np.mean(list(retriever.per_query_entropy.values())))
        nnz = getattr(retriever, "nnz", None) if retriever.sparse else None
        if nnz:
            metrics.update({f"{coll.name}/{k}": float(v) for k, v in nnz.items()})
        if runs_dir is not None:
            write_run(run, Path(runs_dir) / f"{coll.name.replace('/', '_')}.trec.gz", retriever.name)
        del coll, run
        gc.collect()
    if rank != 0:
        return {}
    metrics.update(group_means(metrics, specs, names))
    if runs_dir is not None:
        from .layout import PER_QUERY, write_via

        payload = json.dumps({"collections": per_query, "groups": group_members(specs, names)})
        write_via(Path(runs_dir) / PER_QUERY, lambda tmp: tmp.write_bytes(gzip.compress(payload.encode())))
    return metrics


# ---- the verb -----------------------------------------------------------------------------------------
