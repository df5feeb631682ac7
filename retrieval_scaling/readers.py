"""Readers of the files collections come in: BEIR JSONL and qrels, TREC topics, qrels and runs, TSV
corpora. Each reads a UTF-8 file a line at a time and fails on a bad line with its file, line number
and problem (a DataError), never with a bare parser exception."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from .errors import DataError


def text_lines(path: Path, opener: Callable[..., IO[bytes]] = open) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, decoded a line at a time so that a bad byte is reported
    with its file and line."""
    with opener(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1}). "
                                "Re-encode the file as UTF-8 or fix that line.") from None


def read_jsonl(path: Path, fields: tuple[str, ...], non_empty: tuple[str, ...] = ()) -> dict[str, dict]:
    """Rows of a JSONL file keyed by `_id`; a broken line, a missing field, an empty one of `non_empty`
    or a duplicate id fails with the file and line number."""
    rows: dict[str, dict] = {}
    for lineno, line in text_lines(path):
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
        empty = [f for f in non_empty if not str(row[f] or "").strip()]
        if empty:
            raise DataError(f"{path}:{lineno}: '{doc_id}' has an empty {', '.join(empty)}: give it one, or remove "
                            "the line and its judgements.")
        if doc_id in rows:
            raise DataError(f"{path}:{lineno}: duplicate id '{doc_id}'.")
        rows[doc_id] = row
    if not rows:
        raise DataError(f"{path}: no rows.")
    return rows


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels: `query-id<TAB>corpus-id<TAB>score`, with or without the header."""
    return _read_judgements(path, "\t", (0, 1, 2), "3 tab-separated columns (query-id, corpus-id, score)")


def read_trec_qrels(path: Path) -> dict[str, dict[str, int]]:
    """TREC qrels: `qid iter docid relevance`, whitespace-separated."""
    return _read_judgements(path, None, (0, 2, 3), "4 columns (qid iter docid relevance)")


def _read_judgements(path: Path, sep: str | None, cols: tuple[int, int, int], shape: str) -> dict[str, dict[str, int]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Qrels file {path} does not exist: check the collection's split or qrels path.")
    qrels: dict[str, dict[str, int]] = {}
    width = max(cols) + 1
    for lineno, line in text_lines(path):
        parts = line.rstrip("\n").split(sep)
        if not line.strip() or (lineno == 1 and parts[0] == "query-id"):
            continue
        if len(parts) != width:
            raise DataError(f"{path}:{lineno}: expected {shape}, got {len(parts)} column(s).")
        qid, did, score = (parts[c] for c in cols)
        try:
            rel = int(float(score))
        except ValueError:
            raise DataError(f"{path}:{lineno}: relevance '{score}' is not a number.") from None
        judged = qrels.setdefault(qid, {})
        if did in judged:
            raise DataError(f"{path}:{lineno}: duplicate judgement of document '{did}' for query '{qid}'.")
        judged[did] = rel
    if not qrels:
        raise DataError(f"{path}: no judgements.")
    return qrels


def read_trec_topics(path: Path) -> dict[str, str]:
    """Topics as `qid<TAB>text` lines (the MS MARCO / TREC DL distribution format)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Topics file {path} does not exist.")
    topics: dict[str, str] = {}
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2:
            raise DataError(f"{path}:{lineno}: expected 'qid<TAB>text', got {len(parts)} tab-separated "
                            "field(s).")
        if parts[0] in topics:
            raise DataError(f"{path}:{lineno}: duplicate query id '{parts[0]}'.")
        if not parts[1].strip():
            raise DataError(f"{path}:{lineno}: query '{parts[0]}' has an empty text: give it one, or remove the "
                            "line and its judgements.")
        topics[parts[0]] = parts[1].strip()
    if not topics:
        raise DataError(f"{path}: no topics.")
    return topics


def read_corpus(path: Path) -> dict[str, str]:
    """A corpus as doc id → "title text": a BEIR directory, a `*.jsonl` file, or a `pid<TAB>text`
    (`pid<TAB>text<TAB>title`) TSV."""
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    if not path.is_file():
        raise DataError(f"Corpus {path} does not exist.")
    if path.suffix == ".jsonl":
        return {d: f"{r.get('title') or ''} {r['text']}".strip() for d, r in read_jsonl(path, ("text",)).items()}
    corpus: dict[str, str] = {}
    for lineno, line in text_lines(path):
        parts = line.rstrip("\n").split("\t")
        if len(parts) not in (2, 3):
            raise DataError(f"{path}:{lineno}: expected 'pid<TAB>text[<TAB>title]', got {len(parts)} field(s).")
        if parts[0] in corpus:
            raise DataError(f"{path}:{lineno}: duplicate id '{parts[0]}'.")
        corpus[parts[0]] = f"{parts[2] if len(parts) == 3 else ''} {parts[1]}".strip()
    if not corpus:
        raise DataError(f"{path}: no documents.")
    return corpus


def check_judgements(qrels: Mapping[str, Mapping[str, int]], queries: Mapping[str, Any], corpus: Mapping[str, Any],
                     where: str, qrels_path: Path | None = None, allow_missing_nonrelevant: bool = False) -> None:
    """Every judged query and document must exist. `allow_missing_nonrelevant` lets judgements of
    relevance ≤ 0 name absent documents (a corpus of the relevant passages only): they never count."""
    bad = [(q, None) for q in qrels if q not in queries]
    bad += [(q, d) for q, judged in qrels.items() for d, rel in judged.items()
            if d not in corpus and not (allow_missing_nonrelevant and rel <= 0)]
    if not bad:
        return
    unknown_q = sorted({q for q, d in bad if d is None})
    unknown_d = sorted({d for _, d in bad if d is not None})
    first = f"{qrels_path}:{_first_line(qrels_path, set(unknown_q), set(unknown_d))}" if qrels_path else where
    raise DataError(
        f"{first}: judgements name ids that do not exist — queries {unknown_q[:5]} ({len(unknown_q)} in all), "
        f"documents {unknown_d[:5]} ({len(unknown_d)} in all) [{where}]. Fix the qrels or the corpus/queries"
        + ("; a corpus of only the relevant passages needs allow_missing_nonrelevant=true." if unknown_d else ".")
    )


def _first_line(path: Path, queries: set[str], docs: set[str]) -> int:
    """The first line of a qrels file naming one of these ids (only read on the error path)."""
    with Path(path).open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            parts = line.split()
            if parts and (parts[0] in queries or any(p in docs for p in parts[1:3])):
                return lineno
    return 0


def read_trec_run(path: str | os.PathLike) -> dict[str, list[str]]:
    """A TREC run file (`qid Q0 docid rank score tag`, plain or .gz): each query's documents, best
    first (by score; rank breaks ties)."""
    import gzip

    path = Path(path)
    if not path.is_file():
        raise DataError(f"Run file {path} does not exist (data.negatives.run).")
    opener = gzip.open if path.suffix == ".gz" else open
    hits: dict[str, list[tuple[float, int, str]]] = {}
    for lineno, line in text_lines(path, opener):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 6:
            raise DataError(f"{path}:{lineno}: expected 6 columns (qid Q0 docid rank score tag), got {len(parts)}.")
        try:
            rank, score = int(parts[3]), float(parts[4])
        except ValueError:
            raise DataError(f"{path}:{lineno}: rank '{parts[3]}' or score '{parts[4]}' is not a number.") from None
        hits.setdefault(parts[0], []).append((-score, rank, parts[2]))
    return {q: [d for *_, d in sorted(h)] for q, h in hits.items()}
