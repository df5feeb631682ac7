"""The training data, a cached stage built by the stages job: hard negatives and teacher scores per query.

Positives: the query's judged documents with relevance > 0. Negatives (`data.negatives.miner`): the
BM25 (bm25s, English stop words, Snowball stemming) top `depth`, or the top `depth` of a given TREC run
file (`miner=run data.negatives.run=<file>`; e.g. MS MARCO's distributed BM25 top-1000), minus the
positives, best `keep` kept. Teacher (`teacher=` config group, see teachers.py): BM25 itself — a real
lexical scorer that runs offline here, the default — an HF cross-encoder, or a sentence-transformers
bi-encoder. Its raw scores are what the KD losses read (MarginMSE margins; the CL+KD teacher softmax
at T=1). Written once per (collection, split, miner, teacher), with progress bars.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .bm25 import BM25Index
from .data import Collection
from .errors import ConfigError, DataError
from .layout import write_atomic
from .passages import training_collection
from .readers import read_trec_run
from .stages import build_once, build_resumable
from .teachers import build_teacher

log = logging.getLogger(__name__)


def ensure_training_data(data_cfg: Mapping[str, Any], cache_root: Path) -> Path:
    """`<dir>/examples.jsonl`: one query per line with positives, hard negatives and teacher scores."""
    miner = data_cfg["negatives"]["miner"]
    if miner not in ("bm25", "run"):
        raise ConfigError(f"data.negatives.miner={miner!r}: negatives are mined with bm25 or taken from a run "
                          "file (data.negatives.miner=run data.negatives.run=<TREC run file>).")
    if miner == "run" and not data_cfg["negatives"].get("run"):
        raise ConfigError("data.negatives.miner=run needs data.negatives.run=<TREC run file>.")
    from .layout import training_data_dir

    out = training_data_dir(data_cfg, cache_root)
    return build_resumable(out, lambda tmp, parts: _mine_and_score(data_cfg, tmp, parts, cache_root),
                           f"training data {data_cfg['name']}")


# Training queries mined and scored per part: a part is the unit ranks share and a resumed stage skips.
QUERIES_PER_PART = 10_000


def _mine_and_score(data_cfg: Mapping[str, Any], out: Path, parts_dir: Path, cache_root: Path) -> None:
    """Mine negatives and score them with the teacher, at most `QUERIES_PER_PART` queries at a time: part
    j on rank j mod W (every rank as many queries), each part written atomically into `parts_dir`, so a
    requeued or resubmitted stage scores only the parts it had not finished (MS MARCO train: ~500k
    queries, ~9M teacher pairs)."""
    from tqdm import tqdm

    from .distributed import balanced_shards, launched_ranks, wait_for_ranks

    rank, world = launched_ranks()
    coll: Collection = training_collection(data_cfg, cache_root)  # passages memory-mapped, shared by the ranks
    neg = data_cfg["negatives"]
    qids = list(coll.queries)
    parts = balanced_shards(len(qids), QUERIES_PER_PART, world)  # as many per rank, as equal as can be
    parts_dir.mkdir(parents=True, exist_ok=True)
    mine = parts[rank::world]
    todo = [p for p in mine if not part_file(parts_dir, p).is_file()]
    if len(todo) < len(mine):
        log.info("training data: %d of this rank's %d part(s) done by an earlier attempt", len(mine) - len(todo),
                 len(mine))
    miner = Miner(data_cfg, coll, cache_root) if todo else None
    desc = f"mine negatives ({neg['miner']}), teacher {data_cfg['teacher']['name']}"
    for part in tqdm(todo, desc=desc, mininterval=10):
        rows = miner.examples(qids[part])
        write_atomic(part_file(parts_dir, part), "".join(f"{r}\n" for r in rows))
    wait_for_ranks(parts_dir, "parts")  # every part is on disk before rank 0 joins them, however uneven the split
    if rank == 0:
        _join_parts(data_cfg, coll, out, parts_dir, parts)


class Miner:
    """A training query's example: its positives, hard negatives (bm25s or a run file) and the teacher's
    scores of all of them. The BM25 index is built once per (corpus, settings) and memory-mapped."""

    def __init__(self, data_cfg: Mapping[str, Any], coll: Collection, cache_root: Path):
        neg = data_cfg["negatives"]
        self.coll, self.depth, self.keep = coll, int(neg["depth"]), int(neg["keep"])
        bm25_teacher = data_cfg["teacher"]["name"] == "bm25"
        self.index = mining_index(data_cfg, coll, cache_root) if neg["miner"] == "bm25" or bm25_teacher else None
        # corpus id → index position, where BM25 scores judged documents that it may not have ranked
        self.position = coll.corpus.position
        self.run = read_trec_run(neg["run"]) if neg["miner"] == "run" else None
        self.teacher = build_teacher(data_cfg["teacher"], coll.corpus)

    def examples(self, qids: list[str]) -> list[str]:
        """The examples of `qids` as JSON lines, queries without a positive judgement left out; BM25
        negatives mined for all of them at once."""
        coll, index, run = self.coll, self.index, self.run
        qids = [q for q in qids if any(rel > 0 for rel in coll.qrels[q].values())]
        if run is None and qids:
            _, top = index.top_k([coll.queries[q] for q in qids], self.depth)
        rows = []
        for row, qid in enumerate(qids):
            query = coll.queries[qid]
            positives = [d for d, rel in coll.qrels[qid].items() if rel > 0]
            if run is not None:
                ranked = [d for d in run.get(qid, [])[:self.depth] if d in coll.corpus]
            else:
                ranked = [index.corpus_id(int(i)) for i in top[row]]
            negatives = [d for d in ranked if d not in positives][:self.keep]
            judged = [*positives, *negatives]
            teacher_scores = ([float(x) for x in index.scores_of(query, [self.position(d) for d in judged])]
                              if self.teacher is None else self.teacher(query, judged))
            rows.append(json.dumps({"qid": qid, "query": query, "positives": positives, "negatives": negatives,
                                    "teacher": dict(zip(judged, teacher_scores, strict=True)),
                                    "in_run": run is None or qid in run}))
        return rows


BM25_K1, BM25_B = 1.5, 0.75  # bm25s's defaults, as the BM25 baseline's


def mining_index(data_cfg: Mapping[str, Any], coll: Collection, cache_root: Path) -> BM25Index:
    """The training corpus's BM25 index: built by the first process to ask (the others wait on its lock,
    not in a collective), saved, and memory-mapped by every process that mines."""
    from .layout import bm25_index_dir

    path = build_once(bm25_index_dir(data_cfg, cache_root, BM25_K1, BM25_B),
                      lambda tmp: BM25Index(coll.corpus, k1=BM25_K1, b=BM25_B).save(tmp), f"BM25 index of {coll.name}")
    index = BM25Index.load(path)
    if index.n_docs != len(coll.corpus):
        raise DataError(f"{path}: the BM25 index holds {index.n_docs} documents, {coll.name} has {len(coll.corpus)}. "
                        "Delete the index directory to rebuild it.")
    return index


def part_file(parts_dir: Path, part: slice) -> Path:
    """A part's file, named by its queries' range: a part of another split (another rank count) is
    never taken for it."""
    return parts_dir / f"part-{part.start:09d}-{part.stop:09d}.jsonl"


def _join_parts(data_cfg: Mapping[str, Any], coll: Collection, out: Path, parts_dir: Path,
                parts: list[slice]) -> None:
    """Rank 0: the parts joined into `examples.jsonl`, the passages they name, and `meta.json`."""
    neg = data_cfg["negatives"]
    keep = int(neg["keep"])
    lines, used, short, unranked = [], {}, 0, 0  # used: the passages examples name, in first-use order
    for part in parts:
        for line in part_file(parts_dir, part).read_text().splitlines():
            ex = json.loads(line)
            unranked += not ex.pop("in_run")
            short += len(ex["negatives"]) < keep
            used.update(dict.fromkeys([*ex["positives"], *ex["negatives"]]))
            lines.append(json.dumps(ex))
    if not lines:
        raise ConfigError(f"no training query of {coll.name} has a positive judgement: check data.split.")
    (out / "examples.jsonl").write_text("\n".join(lines) + "\n")
    # The passages the examples name, so that cells read these instead of the whole corpus (8.8M for MS MARCO).
    with (out / PASSAGES).open("w", encoding="utf-8") as handle:
        for d in used:
            handle.write(json.dumps({"_id": d, "text": coll.corpus[d]}) + "\n")
    meta = {"queries": len(lines), "queries_with_fewer_negatives": short, "queries_missing_from_run": unranked,
            "depth": int(neg["depth"]), "keep": keep, "miner": neg["miner"], "teacher": dict(data_cfg["teacher"]),
            "collection": coll.name, "split": data_cfg["split"]}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("prepared %d training queries (%d with < %d negatives, %d not in the run)", len(lines), short, keep,
             unranked)


PASSAGES = "passages.jsonl"


def load_passages(path: Path) -> dict[str, str] | None:
    """id → text of the passages the examples name; None for data prepared before this file existed."""
    file = Path(path) / PASSAGES
    if not file.is_file():
        return None
    with file.open(encoding="utf-8") as handle:
        return {row["_id"]: row["text"] for row in map(json.loads, handle)}


def load_examples(path: Path) -> list[dict]:
    return list(iter_examples(path))


def iter_examples(path: Path) -> Iterator[dict]:
    """The examples one at a time, as `examples.jsonl` holds them."""
    with (Path(path) / "examples.jsonl").open() as handle:
        yield from (json.loads(line) for line in handle if line.strip())
