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
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import DataError
from .readers import check_judgements, read_corpus, read_jsonl, read_qrels, read_trec_qrels, read_trec_topics

DATA_ROOT_ENV = "RS_DATA_DIR"


@dataclass(frozen=True)
class Collection:
    name: str
    corpus: dict[str, str]  # doc id -> "title text"
    queries: dict[str, str]  # query id -> text (only queries judged in the split)
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}


def beside_checkout() -> Path | None:
    """`shared/data` next to the checkout (or one level up), as the Makefile finds it; None if absent."""
    checkout = Path(__file__).resolve().parent.parent
    return next((d for d in (checkout.parent / "shared" / "data", checkout.parent.parent / "shared" / "data")
                 if d.is_dir()), None)


def resolve_data_root(root: str | os.PathLike | None) -> Path:
    """The data root from config, else $RS_DATA_DIR, else `shared/data` beside the checkout; a clear
    error when none points anywhere."""
    value = root or os.environ.get(DATA_ROOT_ENV) or beside_checkout()
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


def load_collection(root: str | os.PathLike | None, name: str, split: str, path: str | os.PathLike | None = None,
                    allow_missing_nonrelevant: bool = False, corpus: Mapping[str, str] | None = None) -> Collection:
    """Load and validate one split of a BEIR directory (`path`, else `<root>/<name>`); `corpus`: its
    documents, read already (a memory-mapped store), instead of reading them here."""
    base = Path(path) if path else collection_dir(root, name)
    if path and not (base / "corpus.jsonl").is_file():
        raise DataError(f"Collection '{name}': {base}/corpus.jsonl does not exist (a BEIR-format directory).")
    docs = read_corpus(base) if corpus is None else corpus
    queries = read_jsonl(base / "queries.jsonl", ("text",), non_empty=("text",))
    qrels_path = base / "qrels" / f"{split}.tsv"
    qrels = read_qrels(qrels_path)
    check_judgements(qrels, queries, docs, f"collection {name}", qrels_path, allow_missing_nonrelevant)
    return Collection(name=name, corpus=docs, queries={q: str(queries[q]["text"]) for q in qrels}, qrels=qrels)


def load_trec(name: str, topics: str | os.PathLike, qrels: str | os.PathLike, corpus: str | os.PathLike,
              allow_missing_nonrelevant: bool = False, docs: Mapping[str, str] | None = None) -> Collection:
    """A collection from TREC-format topics and qrels over a corpus file or BEIR directory."""
    docs = read_corpus(Path(corpus)) if docs is None else docs
    queries = read_trec_topics(Path(topics))
    judged = read_trec_qrels(Path(qrels))
    check_judgements(judged, queries, docs, f"collection {name}", Path(qrels), allow_missing_nonrelevant)
    return Collection(name=name, corpus=docs, queries={q: queries[q] for q in judged}, qrels=judged)


def load_ir_datasets(name: str, dataset_id: str, allow_missing_nonrelevant: bool = False,
                     docs: Mapping[str, str] | None = None) -> Collection:
    """A collection through ir_datasets (downloads on first use, into $IR_DATASETS_HOME)."""
    ds = open_ir_dataset(name, dataset_id)
    corpus: Mapping[str, str] = {} if docs is None else docs
    if docs is None:
        for doc_id, text in ir_dataset_docs(ds, dataset_id):
            if doc_id in corpus:
                raise DataError(f"ir_datasets '{dataset_id}': duplicate document id '{doc_id}'.")
            corpus[doc_id] = text
    queries = {q.query_id: q.text for q in ds.queries_iter()}
    qrels: dict[str, dict[str, int]] = {}
    for row in ds.qrels_iter():
        qrels.setdefault(row.query_id, {})[row.doc_id] = int(row.relevance)
    check_judgements(qrels, queries, corpus, f"ir_datasets '{dataset_id}' (collection {name})",
                     allow_missing_nonrelevant=allow_missing_nonrelevant)
    empty = sorted(q for q in qrels if not str(queries[q] or "").strip())
    if empty:
        raise DataError(f"ir_datasets '{dataset_id}' (collection {name}): judged queries with an empty text: "
                        f"{', '.join(empty[:5])}{' …' if len(empty) > 5 else ''}.")
    return Collection(name=name, corpus=corpus, queries={q: queries[q] for q in qrels}, qrels=qrels)


def open_ir_dataset(name: str, dataset_id: str):
    """The ir_datasets dataset of an id, checked to have documents, queries and judgements, its files fetched."""
    import ir_datasets

    try:
        ds = ir_datasets.load(dataset_id)
    except KeyError:
        raise DataError(f"ir_datasets has no dataset '{dataset_id}' (collection {name}).") from None
    for part in ("docs", "queries", "qrels"):
        if not getattr(ds, f"has_{part}")():
            raise DataError(f"ir_datasets '{dataset_id}' has no {part} (collection {name}): pick a split id "
                            "with queries and judgements, e.g. beir/fiqa/test.")
    fetch_ir_dataset(ds, dataset_id)
    return ds


def ir_dataset_docs(ds, dataset_id: str) -> Iterable[tuple[str, str]]:
    """(id, "title text") of every document, streamed."""
    for doc in _progress(ds.docs_iter(), f"{dataset_id} docs", ds.docs_count()):
        yield doc.doc_id, f"{getattr(doc, 'title', '') or ''} {doc.text}".strip()


def fetch_ir_dataset(ds, dataset_id: str) -> None:
    """Make ir_datasets fetch a dataset's files (it downloads a file whole on first read), one process at a
    time: ir_datasets writes `<file>.tmp` without a lock between processes, so ranks or jobs reading the
    same new dataset at once would write over each other. The lock is the dataset family's (ids of one
    family share files: every `msmarco-passage/…` id reads `collection.tsv`). Reading, afterwards, needs
    no lock."""
    from ir_datasets.util import home_path

    from .stages import holding_lock

    family = ir_datasets_dir(dataset_id, Path("."))
    with holding_lock(Path(home_path()) / "locks" / "__".join(family.parts)):
        for part in ("docs", "queries", "qrels"):
            next(iter(getattr(ds, f"{part}_iter")()), None)


def ir_datasets_dir(dataset_id: str, home: Path) -> Path:
    """The directory ir_datasets keeps a dataset's files in: its first path component, or the first two
    for BEIR, whose datasets each have their own (`beir/fiqa/test` → `<home>/beir/fiqa`)."""
    parts = dataset_id.split("/")
    return Path(home).joinpath(*parts[:2 if parts[0] == "beir" else 1])


def _progress(items: Iterable, desc: str, total: int | None) -> Iterable:
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, mininterval=10)


SOURCES = ("beir", "trec", "ir_datasets")


def load_source(spec: Mapping[str, Any], root: str | os.PathLike | None,
                docs: Mapping[str, str] | None = None) -> Collection:
    """One collection from its config (`conf/eval/*`: source beir | trec | ir_datasets); `docs`: its
    documents, read already (see `load_training_collection`)."""
    source, name = spec.get("source", "beir"), spec["name"]
    allow = bool(spec.get("allow_missing_nonrelevant", False))
    if source == "beir":
        coll = load_collection(root, spec.get("dir") or name, spec["split"], spec.get("path"), allow, docs)
        return replace(coll, name=name)
    if source == "trec":
        missing = [k for k in ("topics", "qrels", "corpus") if not spec.get(k)]
        if missing:
            raise DataError(f"collection {name}: source=trec needs {missing} (file paths).")
        return load_trec(name, spec["topics"], spec["qrels"], spec["corpus"], allow, docs)
    if source == "ir_datasets":
        if not spec.get("id"):
            raise DataError(f"collection {name}: source=ir_datasets needs an id (e.g. msmarco-passage/dev/small).")
        return load_ir_datasets(name, spec["id"], allow, docs)
    raise DataError(f"collection {name}: unknown source {source!r}; one of {list(SOURCES)}.")


def corpus_key(spec: Mapping[str, Any], root: str | os.PathLike | None) -> str:
    """What names a collection's corpus, without reading it: collections with the same key have the same
    documents under the same ids (MS MARCO dev, DL19 and DL20), so one read serves them all. A corpus
    file is known by its fingerprint, so copies of one corpus in several BEIR directories are one."""
    source = spec.get("source", "beir")
    if source == "ir_datasets" and spec.get("id"):
        import ir_datasets

        try:  # ids over one collection share its docs object (every msmarco-passage/… id)
            return f"ir_datasets:{id(ir_datasets.load(spec['id']).docs_handler())}"
        except KeyError:
            return f"own:{spec['name']}"  # load_source reports the unknown id
    corpus = source_files(spec, root).get("corpus")
    if corpus is not None and corpus.is_dir():
        corpus = corpus / "corpus.jsonl"
    if corpus is None or not corpus.is_file():
        return f"own:{spec['name']}"  # load_source reports what is missing
    return f"file:{file_fingerprint(corpus)}"


def training_spec(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The training collection of `data` (conf/data/*) as a collection spec for `load_source`."""
    return {"name": data_cfg["name"], "source": data_cfg.get("source", "beir"), "split": data_cfg.get("split"),
            "id": data_cfg.get("id"), "dir": data_cfg.get("dir")}


def load_training_collection(data_cfg: Mapping[str, Any]) -> Collection:
    """The training collection: a BEIR directory under the data root, or an ir_datasets id (MS MARCO
    passage train on a cluster). Jobs read it through `passages.training_collection` instead."""
    return load_source(training_spec(data_cfg), data_cfg.get("root"))


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
