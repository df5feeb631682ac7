"""Scoring a run: ir_measures' measures over a collection's judgements, aggregated and per query, and the
run written as a TREC run file."""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError
from .retrievers import Run


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
