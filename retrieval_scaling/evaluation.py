"""Evaluation: rank each configured collection with a retriever (the collections over one corpus in one
pass over it), score each run with ir_measures (`scoring`), and keep each finished collection's scores so
that a requeued evaluation skips it.

Per collection (conf/eval/*): its measures (`<collection>/<metric>`), depth, lengths, and the BEIR
rule that drops a hit whose id equals the query id; collections of a `group` (BEIR-13) are also
averaged, unweighted, as `<group>/<metric>`. Runs are written as TREC run files. The `evaluate` verb
(retrieval_scaling/evaluate.py) runs this on a finished cell or a baseline.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import Collection
from .errors import ConfigError
from .layout import PER_QUERY, write_via
from .retrievers import QuerySet, Ranked, Retriever, Run
from .scoring import per_query_scores, score_run, write_run

log = logging.getLogger(__name__)


def entropy_spec(eval_cfg: Mapping[str, Any], temperature: float) -> dict[str, Any] | None:
    """What the contrastive entropy of a cell's evaluation needs: the sample (`eval.contrastive_entropy`)
    and the paradigm's temperature; None when the evaluation turns it off."""
    spec = eval_cfg.get("contrastive_entropy")
    if not spec:
        return None
    return {"negatives": int(spec["negatives"]), "seed": int(spec["seed"]),
            "temperature": float(temperature)}


def query_set(coll: Collection, spec: Mapping[str, Any], eval_cfg: Mapping[str, Any]) -> QuerySet:
    """A collection's queries as its search needs them: one extra hit fetched when self hits are dropped."""
    depth = int(spec["depth"]) + bool(spec.get("drop_self_hits", False))
    return QuerySet(coll.name, coll.queries, coll.qrels, min(depth, len(coll.corpus)),
                    int(spec.get("query_max_len") or eval_cfg["query_max_len"]))


def passage_max_len(spec: Mapping[str, Any], eval_cfg: Mapping[str, Any]) -> int:
    return int(spec.get("passage_max_len") or eval_cfg["passage_max_len"])


def to_run(ranked: Ranked, coll: Collection, spec: Mapping[str, Any]) -> Run:
    """A search's hits as a run: `depth` hits per query, best first, self hits dropped when the
    collection asks for it."""
    depth, drop = int(spec["depth"]), bool(spec.get("drop_self_hits", False))
    doc_ids = list(coll.corpus)
    run: Run = {}
    if ranked.scores is None:  # a rank > 0 of a multi-rank search: rank 0 holds the run
        return run
    for row, qid in enumerate(ranked.qids):
        hits = [(doc_ids[j], float(s)) for s, j in zip(ranked.scores[row], ranked.positions[row], strict=True)
                if j >= 0]
        if drop:
            hits = [h for h in hits if h[0] != qid]
        run[qid] = dict(hits[:depth])
    return run


def rank_collection(retriever: Retriever, coll: Collection, spec: Mapping[str, Any],
                    eval_cfg: Mapping[str, Any]) -> Run:
    """The run of `retriever` on one collection."""
    (ranked,) = retriever.search_sets(coll.corpus, [query_set(coll, spec, eval_cfg)], passage_max_len(spec, eval_cfg),
                                      int(eval_cfg.get("shard_size") or 200000))
    return to_run(ranked, coll, spec)


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


def load_eval_collection(spec: Mapping[str, Any], eval_cfg: Mapping[str, Any],
                         docs: Mapping[str, str] | None = None) -> Collection:
    """One evaluation collection, subset when `eval.subset` asks for it; `docs`: its corpus, loaded
    already for another collection over it."""
    from .data import load_source

    coll = load_source(spec, eval_cfg["root"], docs)
    sub = eval_cfg.get("subset")
    if sub:
        coll = subset_collection(coll, int(sub["queries"]), int(sub["bm25_depth"]), int(sub["seed"]))
    return coll


def corpus_groups(specs: Mapping[str, Mapping[str, Any]], eval_cfg: Mapping[str, Any]) -> list[list[str]]:
    """The collections (by config key, in config order of each group's first) searched in one pass:
    those over the same corpus at the same passage length (MS MARCO dev, DL19 and DL20). A subset
    evaluation draws each collection's own pool, so there every collection is its own group."""
    from .data import corpus_key

    groups: dict[Any, list[str]] = {}
    for key, spec in specs.items():
        shared = (("own", key) if eval_cfg.get("subset")
                  else (corpus_key(spec, eval_cfg["root"]), passage_max_len(spec, eval_cfg)))
        groups.setdefault(shared, []).append(key)
    return list(groups.values())


def iter_eval_groups(eval_cfg: Mapping[str, Any], skip: Iterable[str] = ()) -> Iterator[list[tuple[str, Collection]]]:
    """The evaluation collections a corpus at a time, each group loaded when the previous one is done
    with (BEIR-13 + MS MARCO are ~34M documents), its corpus read once for all its collections;
    collections in `skip` (by key) are left out, and a group of none of them is never loaded."""
    specs = eval_cfg["collections"]
    skip = set(skip)
    for keys in corpus_groups(specs, eval_cfg):
        todo = [k for k in keys if k not in skip]
        if not todo:
            continue
        first = load_eval_collection(specs[todo[0]], eval_cfg)
        yield [(todo[0], first)] + [(k, load_eval_collection(specs[k], eval_cfg, first.corpus)) for k in todo[1:]]


def iter_eval_collections(eval_cfg: Mapping[str, Any]) -> Iterator[Collection]:
    """The evaluation collections, a corpus at a time."""
    for group in iter_eval_groups(eval_cfg):
        for _, coll in group:
            yield coll


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
                 runs_dir: Path | None = None, rank: int = 0, progress: Path | None = None) -> dict[str, float]:
    """Metrics of `retriever` on every collection (+ group means); run files into `runs_dir`.
    `collections`: in the order of `eval.collections` (those sharing one corpus object are searched
    together); None loads them a corpus at a time. `progress`: where each finished collection's metrics
    are kept, so that a requeued evaluation skips it (kept with the encodings it came from). Every rank
    of a multi-rank retriever calls it; rank 0 scores and returns the metrics, the others {}."""
    import gc

    specs = dict(eval_cfg["collections"])
    collection_specs(eval_cfg)
    finished = finished_collections(progress, list(specs), rank)
    if collections is None:
        groups = iter_eval_groups(eval_cfg, finished)
    else:
        given = [(k, c) for k, c in zip(specs, collections, strict=True) if k not in finished]
        by_corpus: dict[int, list[tuple[str, Collection]]] = {}
        for key, coll in given:
            by_corpus.setdefault(id(coll.corpus), []).append((key, coll))
        groups = iter(by_corpus.values())
    shard_size = int(eval_cfg.get("shard_size") or 200000)
    for group in groups:
        colls = [coll for _, coll in group]
        sets = [query_set(coll, specs[key], eval_cfg) for key, coll in group]
        ranked = retriever.search_sets(colls[0].corpus, sets, passage_max_len(specs[group[0][0]], eval_cfg),
                                       shard_size)
        if rank == 0:
            for (key, coll), found in zip(group, ranked, strict=True):
                done = score_collection(retriever, coll, specs[key], found, eval_cfg, runs_dir)
                if progress is not None:
                    write_via(progress / f"{key}.json", lambda tmp, d=done: tmp.write_text(json.dumps(d)))
                finished[key] = done
        del group, colls, ranked
        gc.collect()
    if rank != 0:
        return {}
    metrics: dict[str, float] = {}
    for key in specs:
        metrics.update(finished[key]["metrics"])
    names = [finished[key]["name"] for key in specs]
    metrics.update(group_means(metrics, list(specs.values()), names))
    if runs_dir is not None:
        payload = json.dumps({"collections": {finished[k]["name"]: finished[k]["per_query"] for k in specs},
                              "groups": group_members(list(specs.values()), names)})
        write_via(Path(runs_dir) / PER_QUERY, lambda tmp: tmp.write_bytes(gzip.compress(payload.encode())))
    return metrics


def finished_collections(progress: Path | None, keys: Sequence[str], rank: int) -> dict[str, dict]:
    """The collections an earlier attempt finished, by key: {name, metrics, per_query}; rank 0 holds
    them, the other ranks only which keys to skip."""
    if progress is None:
        return {}
    from .distributed import from_rank0

    progress.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}

    def readable() -> list[str]:
        for key in keys:
            path = progress / f"{key}.json"
            if path.is_file():
                try:
                    records[key] = json.loads(path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
                    log.warning("%s is damaged (%s): collection %s is evaluated again", path, exc, key)
        return list(records)

    done = from_rank0(progress, "finished-collections", readable)
    if done:
        log.info("collections finished by an earlier attempt, skipped: %s", ", ".join(done))
    return {k: records[k] if rank == 0 else {} for k in done}


def score_collection(retriever: Retriever, coll: Collection, spec: Mapping[str, Any], ranked: Ranked,
                     eval_cfg: Mapping[str, Any], runs_dir: Path | None) -> dict[str, Any]:
    """One collection's metrics and per-query values from its search; its run file into `runs_dir`."""
    run = to_run(ranked, coll, spec)
    metrics = score_run(run, coll.qrels, spec["measures"], coll.name)
    per_query = per_query_scores(run, coll.qrels, spec["measures"])
    entropy = eval_cfg.get("contrastive_entropy")
    if entropy and ranked.entropy:
        from .contrastive_entropy import metric_name

        per_query[metric_name(entropy)] = ranked.entropy
        metrics[f"{coll.name}/{metric_name(entropy)}"] = float(np.mean(list(ranked.entropy.values())))
    if ranked.nnz:
        metrics.update({f"{coll.name}/{k}": float(v) for k, v in ranked.nnz.items()})
    if runs_dir is not None:
        write_run(run, Path(runs_dir) / f"{coll.name.replace('/', '_')}.trec.gz", retriever.name)
    return {"name": coll.name, "metrics": metrics, "per_query": per_query}


# ---- the verb -----------------------------------------------------------------------------------------
