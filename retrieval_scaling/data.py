"""BEIR-format collections read from a configurable data root, validated before anything runs.

Layout (BEIR): `<root>/<name>/corpus.jsonl` ({"_id","title","text"}), `queries.jsonl` ({"_id","text"}),
`qrels/<split>.tsv` (header `query-id<TAB>corpus-id<TAB>score`). Documents are `title + " " + text`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

DATA_ROOT_ENV = "RS_DATA_DIR"


@dataclass(frozen=True)
class Collection:
    name: str
    corpus: dict[str, str]  # doc id -> "title text"
    queries: dict[str, str]  # query id -> text (only queries judged in the split)
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}


def resolve_data_root(root: str | os.PathLike | None) -> Path:
    """The data root from config, else $RS_DATA_DIR; a clear error when neither points anywhere."""
    value = root or os.environ.get(DATA_ROOT_ENV)
    if not value:
        raise DataError(
            f"No data root: set {DATA_ROOT_ENV}=<directory of BEIR-format collections> "
            "(e.g. ../shared/data) or pass data.root=<dir>."
        )
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"Data root {path} is not a directory: fix {DATA_ROOT_ENV} or data.root.")
    return path


def collection_dir(root: str | os.PathLike | None, name: str) -> Path:
    path = resolve_data_root(root) / name
    if not (path / "corpus.jsonl").is_file():
        raise DataError(
            f"Collection '{name}' not found: {path}/corpus.jsonl does not exist. Put the BEIR-format "
            f"collection there or point {DATA_ROOT_ENV} / data.root at the directory that holds it."
        )
    return path


def read_jsonl(path: Path, fields: tuple[str, ...]) -> dict[str, dict]:
    """Rows of a JSONL file keyed by `_id`; a broken line, a missing field or a duplicate id fails
    with the file and line number."""
    rows: dict[str, dict] = {}
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: broken JSON line ({exc.msg}). Fix or remove it.") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}.")
            missing = [f for f in ("_id", *fields) if f not in row]
            if missing:
                raise DataError(f"{path}:{lineno}: missing field(s) {missing}.")
            doc_id = str(row["_id"])
            if doc_id in rows:
                raise DataError(f"{path}:{lineno}: duplicate id '{doc_id}'.")
            rows[doc_id] = row
    if not rows:
        raise DataError(f"{path}: no rows.")
    return rows


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    if not path.is_file():
        raise DataError(f"Qrels file {path} does not exist: check data.split / eval.split.")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            parts = line.rstrip("\n").split("\t")
            if lineno == 1 and parts[0] == "query-id":
                continue
            if not line.strip():
                continue
            if len(parts) != 3:
                raise DataError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(parts)}.")
            qid, did, score = parts
            try:
                qrels.setdefault(qid, {})[did] = int(float(score))
            except ValueError:
                raise DataError(f"{path}:{lineno}: relevance '{score}' is not a number.") from None
    return qrels


def load_collection(root: str | os.PathLike | None, name: str, split: str) -> Collection:
    """Load and validate one collection split: every qrels id must exist in corpus and queries."""
    base = collection_dir(root, name)
    docs = read_jsonl(base / "corpus.jsonl", ("text",))
    queries = read_jsonl(base / "queries.jsonl", ("text",))
    qrels_path = base / "qrels" / f"{split}.tsv"
    qrels = read_qrels(qrels_path)
    unknown_q = sorted(q for q in qrels if q not in queries)
    unknown_d = sorted({d for judged in qrels.values() for d in judged if d not in docs})
    if unknown_q or unknown_d:
        raise DataError(
            f"{qrels_path}: names ids that do not exist — queries {unknown_q[:5]} "
            f"({len(unknown_q)} in all), documents {unknown_d[:5]} ({len(unknown_d)} in all). "
            "Fix the qrels or the corpus/queries files."
        )
    corpus = {d: f"{r.get('title') or ''} {r['text']}".strip() for d, r in docs.items()}
    return Collection(
        name=name,
        corpus=corpus,
        queries={q: str(queries[q]["text"]) for q in qrels},
        qrels=qrels,
    )
