"""Collections: real SciFact loads; malformed files fail with file, line and problem."""

import json
import shutil

import pytest

from retrieval_scaling import data
from retrieval_scaling.data import load_collection, resolve_data_root
from retrieval_scaling.errors import DataError


def test_scifact_test_split_loads(data_root):
    coll = load_collection(data_root, "scifact", "test")
    assert len(coll.corpus) == 5183 and len(coll.queries) == 300
    assert sum(len(v) for v in coll.qrels.values()) == 339


def small_collection(tmp_path, corpus_lines, qrels_rows=(("q1", "d1", 1),)):
    base = tmp_path / "mini"
    (base / "qrels").mkdir(parents=True)
    (base / "corpus.jsonl").write_text("\n".join(corpus_lines) + "\n")
    (base / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "what"}) + "\n")
    rows = ["query-id\tcorpus-id\tscore", *("\t".join(map(str, r)) for r in qrels_rows)]
    (base / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_broken_json_line_names_file_and_line(tmp_path):
    root = small_collection(tmp_path, [json.dumps({"_id": "d1", "title": "", "text": "ok"}), '{"_id": "d2", "te'])
    with pytest.raises(DataError, match=r"corpus\.jsonl:2: broken JSON line"):
        load_collection(root, "mini", "test")


def test_duplicate_ids_are_refused(tmp_path):
    line = json.dumps({"_id": "d1", "text": "x"})
    with pytest.raises(DataError, match=r"corpus\.jsonl:2: duplicate id 'd1'"):
        load_collection(small_collection(tmp_path, [line, line]), "mini", "test")


def test_qrels_naming_missing_ids_are_refused(tmp_path):
    root = small_collection(tmp_path, [json.dumps({"_id": "d1", "text": "x"})], [("q1", "d9", 1)])
    with pytest.raises(DataError, match=r"test\.tsv:2: judgements name ids that do not exist.*\['d9'\]"):
        load_collection(root, "mini", "test")


def test_missing_collection_and_root_say_what_to_set(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="RS_DATA_DIR"):
        load_collection(tmp_path, "nowhere", "test")
    monkeypatch.delenv("RS_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "beside_checkout", lambda: None)
    with pytest.raises(DataError, match="set RS_DATA_DIR"):
        resolve_data_root(None)


def test_unset_the_data_root_is_shared_data_beside_the_checkout_or_one_level_up(tmp_path, monkeypatch):
    monkeypatch.delenv("RS_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "__file__", str(tmp_path / "work" / "main" / "retrieval_scaling" / "data.py"))
    assert data.beside_checkout() is None
    (tmp_path / "shared" / "data").mkdir(parents=True)  # one level up: beside the directory that holds the checkout
    assert resolve_data_root(None) == tmp_path / "shared" / "data"
    (tmp_path / "work" / "shared" / "data").mkdir(parents=True)  # beside the checkout: the nearer one wins
    assert resolve_data_root(None) == tmp_path / "work" / "shared" / "data"
    assert resolve_data_root(tmp_path) == tmp_path  # a configured root still comes first


def test_a_corrupted_copy_of_real_scifact_is_caught(data_root, tmp_path):
    copy = tmp_path / "scifact"
    shutil.copytree(data_root / "scifact", copy)
    lines = (copy / "corpus.jsonl").read_text().splitlines()
    lines[99] = lines[99][:40]
    (copy / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"corpus\.jsonl:100: broken JSON line"):
        load_collection(tmp_path, "scifact", "test")


def test_evaluation_subset_is_declared_seeded_and_keeps_judged_documents(data_root):
    from retrieval_scaling.data import load_collection
    from retrieval_scaling.evaluation import subset_collection

    full = load_collection(data_root, "scifact", "test")
    sub = subset_collection(full, queries=10, bm25_depth=5, seed=0)
    assert sub.name == "scifact:q10-bm25_5" and len(sub.queries) == 10
    judged = {d for q in sub.queries for d in full.qrels[q]}
    assert judged <= set(sub.corpus) and len(sub.corpus) <= len(judged) + 10 * 5
    assert set(sub.qrels) == set(sub.queries) and all(sub.corpus[d] == full.corpus[d] for d in sub.corpus)
    assert subset_collection(full, 10, 5, seed=0).queries == sub.queries  # same seed, same subset
    assert subset_collection(full, 10, 5, seed=1).queries != sub.queries


def test_ir_datasets_files_are_fetched_one_process_at_a_time(tmp_path, monkeypatch):
    """ir_datasets downloads a file whole on its first read, through `<file>.tmp` and with no lock between
    processes: the first read of each part happens under a lock another process would wait on."""
    import fcntl
    from types import SimpleNamespace

    import ir_datasets

    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path))
    lock = tmp_path / "locks" / ".msmarco-passage.lock"  # the family's: its ids share collection.tsv
    held = []

    def first_read(items):
        with open(lock) as other:  # another open file: blocked while the loader holds the lock
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return iter(items)

    doc = SimpleNamespace(doc_id="d1", title="", text="a passage")
    ds = SimpleNamespace(has_docs=lambda: True, has_queries=lambda: True, has_qrels=lambda: True,
                         docs_count=lambda: 1, docs_iter=lambda: first_read([doc]),
                         queries_iter=lambda: first_read([SimpleNamespace(query_id="q1", text="a query")]),
                         qrels_iter=lambda: first_read([SimpleNamespace(query_id="q1", doc_id="d1", relevance=1)]))
    monkeypatch.setattr(ir_datasets, "load", lambda dataset_id: ds)
    coll = data.load_ir_datasets("dev", "msmarco-passage/dev/small")
    assert coll.corpus == {"d1": "a passage"} and coll.qrels == {"q1": {"d1": 1}}
    assert held[:3] == [True, True, True] and held[3:] == [False, False, False]  # the full reads: no lock


def test_passage_store_maps_ids_to_texts_in_corpus_order(tmp_path):
    from retrieval_scaling.passages import PassageStore, write_store

    docs = [("p10", "ten"), ("p2", ""), ("b", "café ünïcode"), ("a", "first by id")]
    write_store(tmp_path, iter(docs), "test corpus")  # streamed: a generator, read once
    store = PassageStore(tmp_path)
    assert list(store) == ["p10", "p2", "b", "a"] and len(store) == 4  # the corpus's order, not the ids'
    assert dict(store.items()) == dict(docs) and list(store.values()) == [t for _, t in docs]
    assert store.values()[1:3] == ["", "café ünïcode"] and store.values()[-1] == "first by id"
    assert [store.position(d) for d in ("a", "b", "p10", "p2", "p1", "")] == [3, 2, 0, 1, None, None]
    assert "b" in store and "c" not in store and 3 not in store
    with pytest.raises(KeyError):
        store["p1"]


def test_a_passage_store_with_a_repeated_id_is_refused(tmp_path):
    from retrieval_scaling.passages import write_store

    with pytest.raises(DataError, match="dup corpus: duplicate document id 'x'"):
        write_store(tmp_path, iter([("x", "1"), ("y", "2"), ("x", "3")]), "dup corpus")


def test_collections_over_one_corpus_share_its_key_and_others_do_not(tmp_path):
    from retrieval_scaling.data import corpus_key

    def beir(name, docs):
        (tmp_path / name / "qrels").mkdir(parents=True)
        (tmp_path / name / "corpus.jsonl").write_text("".join(f'{{"_id": "{d}", "text": "t {d}"}}\n' for d in docs))
        return {"name": name, "source": "beir", "split": "test"}

    dev, dl19, other = beir("dev", ["a", "b"]), beir("dl19", ["a", "b"]), beir("other", ["a", "c"])
    trec = {"name": "dl20", "source": "trec", "topics": "t", "qrels": "q", "corpus": str(tmp_path / "dev")}
    keys = {spec["name"]: corpus_key(spec, tmp_path) for spec in (dev, dl19, other, trec)}
    assert keys["dev"] == keys["dl19"] == keys["dl20"] != keys["other"]
    assert corpus_key({"name": "x", "source": "beir", "split": "test", "path": str(tmp_path / "none")},
                      tmp_path) == "own:x"


def test_a_query_with_an_empty_text_is_refused_at_load_with_its_file_and_line(tmp_path):
    from retrieval_scaling.data import load_collection
    from retrieval_scaling.errors import DataError
    from retrieval_scaling.readers import read_trec_topics

    base = tmp_path / "c"
    (base / "qrels").mkdir(parents=True)
    (base / "corpus.jsonl").write_text('{"_id": "d1", "text": "a passage"}\n')
    (base / "queries.jsonl").write_text('{"_id": "q1", "text": "a query"}\n{"_id": "q2", "text": "  "}\n')
    (base / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td1\t1\n")
    with pytest.raises(DataError, match=rf"{base}/queries.jsonl:2: 'q2' has an empty text: give it one"):
        load_collection(tmp_path, "c", "test")
    (tmp_path / "topics.tsv").write_text("q1\ta query\nq2\t\n")
    with pytest.raises(DataError, match=r"topics.tsv:2: query 'q2' has an empty text"):
        read_trec_topics(tmp_path / "topics.tsv")
