"""Collections — corpus, queries, graded judgements — from three sources, validated before anything runs.

- BEIR directories under a configurable data root: `<root>/<name>/corpus.jsonl` ({"_id","title","text"}),
  `queries.jsonl` ({"_id","text"}), `qrels/<split>.tsv` (header `query-id<TAB>corpus-id<TAB>score`).
- TREC files: topics (`qid<TAB>text`), qrels (`qid iter docid rel`), and a corpus given as a BEIR
  directory, a `corpus.jsonl`, or an MS MARCO-style `collection.tsv` (`pid<TAB>text`).
- ir_datasets ids (`msmarco-passage/dev/small`, `beir/fiqa/test`, ...), downloaded and cached by
  ir_datasets under $IR_DATASETS_HOME.

Documents are `title + " " + text`. Only judged queries are kept. A broken line, a duplicate id or
judgement, or a judgement naming an unknown query or document fails with the file, line and problem.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

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


def read_jsonl(path: Path, fields: tuple[str, ...]) -> dict[str, dict]:
    """Rows of a JSONL file keyed by `_id`; a broken line, a missing field or a duplicate id fails
    with the file and line number."""
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


def load_collection(root: str | os.PathLike | None, name: str, split: str, path: str | os.PathLike | None = None,
                    allow_missing_nonrelevant: bool = False) -> Collection:
    """Load and validate one split of a BEIR directory (`path`, else `<root>/<name>`)."""
    base = Path(path) if path else collection_dir(root, name)
    if path and not (base / "corpus.jsonl").is_file():
        raise DataError(f"Collection '{name}': {base}/corpus.jsonl does not exist (a BEIR-format directory).")
    docs = read_corpus(base)
    queries = read_jsonl(base / "queries.jsonl", ("text",))
    qrels_path = base / "qrels" / f"{split}.tsv"
    qrels = read_qrels(qrels_path)
    check_judgements(qrels, queries, docs, f"collection {name}", qrels_path, allow_missing_nonrelevant)
    return Collection(name=name, corpus=docs, queries={q: str(queries[q]["text"]) for q in qrels}, qrels=qrels)


def load_trec(name: str, topics: str | os.PathLike, qrels: str | os.PathLike, corpus: str | os.PathLike,
              allow_missing_nonrelevant: bool = False) -> Collection:
    """A collection from TREC-format topics and qrels over a corpus file or BEIR directory."""
    docs = read_corpus(Path(corpus))
    queries = read_trec_topics(Path(topics))
    judged = read_trec_qrels(Path(qrels))
    check_judgements(judged, queries, docs, f"collection {name}", Path(qrels), allow_missing_nonrelevant)
    return Collection(name=name, corpus=docs, queries={q: queries[q] for q in judged}, qrels=judged)


def load_ir_datasets(name: str, dataset_id: str, allow_missing_nonrelevant: bool = False) -> Collection:
    """A collection through ir_datasets (downloads on first use, into $IR_DATASETS_HOME)."""
    import ir_datasets

    try:
        ds = ir_datasets.load(dataset_id)
    except KeyError:
        raise DataError(f"ir_datasets has no dataset '{dataset_id}' (collection {name}).") from None
    for part in ("docs", "queries", "qrels"):
        if not getattr(ds, f"has_{part}")():
            raise DataError(f"ir_datasets '{dataset_id}' has no {part} (collection {name}): pick a split id "
                            "with queries and judgements, e.g. beir/fiqa/test.")
    corpus: dict[str, str] = {}
    for doc in _progress(ds.docs_iter(), f"{dataset_id} docs", ds.docs_count()):
        if doc.doc_id in corpus:
            raise DataError(f"ir_datasets '{dataset_id}': duplicate document id '{doc.doc_id}'.")
        corpus[doc.doc_id] = f"{getattr(doc, 'title', '') or ''} {doc.text}".strip()
    queries = {q.query_id: q.text for q in ds.queries_iter()}
    qrels: dict[str, dict[str, int]] = {}
    for row in ds.qrels_iter():
        qrels.setdefault(row.query_id, {})[row.doc_id] = int(row.relevance)
    check_judgements(qrels, queries, corpus, f"ir_datasets '{dataset_id}' (collection {name})",
                     allow_missing_nonrelevant=allow_missing_nonrelevant)
    return Collection(name=name, corpus=corpus, queries={q: queries[q] for q in qrels}, qrels=qrels)


def _progress(items: Iterable, desc: str, total: int | None) -> Iterable:
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, mininterval=10)


SOURCES = ("beir", "trec", "ir_datasets")


def load_source(spec: Mapping[str, Any], root: str | os.PathLike | None) -> Collection:
    """One evaluation collection from its config (`conf/eval/*`: source beir | trec | ir_datasets)."""
    source, name = spec.get("source", "beir"), spec["name"]
    allow = bool(spec.get("allow_missing_nonrelevant", False))
    if source == "beir":
        coll = load_collection(root, spec.get("dir") or name, spec["split"], spec.get("path"), allow)
        return replace(coll, name=name)
    if source == "trec":
        missing = [k for k in ("topics", "qrels", "corpus") if not spec.get(k)]
        if missing:
            raise DataError(f"collection {name}: source=trec needs {missing} (file paths).")
        return load_trec(name, spec["topics"], spec["qrels"], spec["corpus"], allow)
    if source == "ir_datasets":
        if not spec.get("id"):
            raise DataError(f"collection {name}: source=ir_datasets needs an id (e.g. msmarco-passage/dev/small).")
        return load_ir_datasets(name, spec["id"], allow)
    raise DataError(f"collection {name}: unknown source {source!r}; one of {list(SOURCES)}.")


def training_spec(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The training collection of `data` (conf/data/*) as a collection spec for `load_source`."""
    return {"name": data_cfg["name"], "source": data_cfg.get("source", "beir"), "split": data_cfg.get("split"),
            "id": data_cfg.get("id"), "dir": data_cfg.get("dir")}


def load_training_collection(data_cfg: Mapping[str, Any]) -> Collection:
    """The training collection: a BEIR directory under the data root, or an ir_datasets id (MS MARCO
    passage train on a cluster)."""
    return load_source(training_spec(data_cfg), data_cfg.get("root"))


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


FINGERPRINT_SPAN = 1 << 20


def file_fingerprint(path: Path) -> str:
    """A file's size and a hash of its first and last MiB: changes when the file is replaced or edited
    (a new split, more queries), read in two seeks however big the corpus is."""
    stat = path.stat()
    return _fingerprint(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:  # noqa: ARG001 — mtime: a changed file is read again
    import hashlib

    digest = hashlib.blake2b(str(size).encode(), digest_size=8)
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_SPAN))
        if size > FINGERPRINT_SPAN:
            f.seek(max(FINGERPRINT_SPAN, size - FINGERPRINT_SPAN))
            digest.update(f.read(FINGERPRINT_SPAN))
    return digest.hexdigest()


def source_files(spec: Mapping[str, Any], root: str | os.PathLike | None) -> dict[str, Path]:
    """role → file, for the files a collection spec reads from disk (none for an ir_datasets id: the id
    names its data, which ir_datasets verifies)."""
    source = spec.get("source", "beir")
    if source == "beir":
        base = Path(spec["path"]) if spec.get("path") else collection_dir(root, spec.get("dir") or spec["name"])
        return {"corpus": base / "corpus.jsonl", "queries": base / "queries.jsonl",
                "qrels": base / "qrels" / f"{spec['split']}.tsv"}
    if source == "trec":
        return {k: Path(spec[k]) for k in ("topics", "qrels", "corpus") if spec.get(k)}
    return {}


def data_fingerprint(spec: Mapping[str, Any], root: str | os.PathLike | None) -> dict[str, str]:
    """role → fingerprint of the files a collection spec reads: for the cache keys of work done on them."""
    return {role: file_fingerprint(p) for role, p in source_files(spec, root).items() if p.is_file()}
