"""Evaluation at scale, rehearsed: encodings keyed by content and shared across collections, persisted
shards that a killed evaluation resumes from, several ranks with an exact merge, sparse reps that
never become a dense (documents, vocabulary) array."""

import gzip
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

from retrieval_scaling.corpus_search import SearchRequest, search_corpus
from retrieval_scaling.encodings import EncodingStore
from retrieval_scaling.paradigms import Shapes
from retrieval_scaling.paradigms.dense import Dense
from retrieval_scaling.paradigms.sparse import Sparse
from retrieval_scaling.topk import merge_top_k, top_k_rows

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "eval_ranks.py"


# ---- the store on synthetic reps ---------------------------------------------------------------------

def stable_seed(*parts: object) -> int:
    """A seed that is the same in every process (Python's `hash` of a str changes with PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def paradigm(sparse_reps: bool):
    """The paradigm whose host form the fake reps take: CSR for sparse, an array for dense."""
    return Sparse() if sparse_reps else Dense()


def fake_encoder(dim: int, sparse_reps: bool, calls: list):
    """Reps as a pure function of the text (seeded stably by it), recording each call's size. Weights are
    multiples of 1/8 in [0, 1): every product and every sum of them is exact in float32, so any kernel,
    blocking or summation order gives the same scores, bit for bit, on any CPU."""
    def encode(texts, max_len, desc):
        calls.append(len(texts))
        rows = []
        for t in texts:
            rng = np.random.default_rng(stable_seed(t, max_len))
            v = rng.integers(0, 8, dim).astype(np.float32) / 8
            if sparse_reps:
                v[rng.random(dim) < 0.9] = 0  # ~10 % non-zero
            rows.append(v)
        reps = np.stack(rows)
        return sparse.csr_matrix(reps) if sparse_reps else reps
    return encode


def score_distinct_then_expand(queries, texts: list[str], encode, max_len: int) -> np.ndarray:
    """The reference scores as the store computes them: each distinct text encoded and scored once, its
    score then repeated at each of its positions (exact ties by construction, whatever the kernel)."""
    distinct, where = np.unique(np.array(texts, dtype=object), return_inverse=True)
    docs = encode(list(distinct), max_len, "distinct")
    scores = queries @ docs.T
    scores = scores.toarray() if sparse.issparse(scores) else np.asarray(scores)
    return scores[:, where]


@pytest.mark.parametrize("searcher", ["host", "torch"])
@pytest.mark.parametrize("sparse_reps", [False, True])
def test_store_search_equals_brute_force_with_repeated_texts_and_ties(tmp_path, sparse_reps, searcher):
    """Both searches, the host's and torch's (what a GPU cell runs, here on the CPU device), over a
    float16 store: the hits of brute force, ties included."""
    from retrieval_scaling.shard_search import shard_search

    calls = []
    encode = fake_encoder(24, sparse_reps, calls)
    texts = [f"doc {i}" for i in range(90)] + ["doc 3", "doc 50", "doc 3"]  # repeats at 90, 91, 92
    store = EncodingStore(tmp_path, encode, paradigm(sparse_reps), shard_size=20, searcher=shard_search(searcher))
    view = store.ensure(texts, 64, "c")
    # each distinct text once, in 5 shards of at most 20 as equal as can be (ranks split them evenly)
    assert store.encoded_docs == 90 and sorted(calls) == [18, 18, 18, 18, 18]
    queries = encode([f"query {i}" for i in range(7)], 16, "q")
    if sparse_reps:  # a query sharing no term with most documents: many exact ties at 0
        queries = sparse.vstack([queries, sparse.csr_matrix(([1.0], ([0], [0])), shape=(1, 24))])
    ((scores, pos),) = search_corpus(store, view, [SearchRequest(queries, 15)], tmp_path / "partial")
    want_s, want_p = top_k_rows(score_distinct_then_expand(queries, texts, encode, 64), 15)
    # Distinct documents tie too (weights on a grid of 1/8): ties across shards break by position.
    assert any(len(set(row)) < len(row) for row in want_s.tolist())
    np.testing.assert_array_equal(pos, want_p)  # exact: every score is exact in float32 (fake_encoder)
    np.testing.assert_array_equal(scores, want_s)


def test_overlapping_corpora_share_encodings_and_a_new_length_is_a_new_encoding(tmp_path):
    calls = []
    store = EncodingStore(tmp_path, fake_encoder(8, False, calls), Dense(), shard_size=1000)
    store.ensure([f"d{i}" for i in range(100)], 64, "fever")
    store.ensure([f"d{i}" for i in range(10, 105)], 64, "climate-fever")  # 90 shared, 5 new
    assert store.encoded_docs == 105 and store.reused_shards == 1
    store.ensure([f"d{i}" for i in range(5)], 128, "longer")  # same texts, another truncation
    assert store.encoded_docs == 110


def test_merge_keeps_the_best_by_score_then_position_and_empty_slots_last():
    a_s, a_p = np.array([[3.0, 1.0, -np.inf]]), np.array([[7, 2, -1]])
    b_s, b_p = np.array([[3.0, 2.0]]), np.array([[4, 9]])
    s, p = merge_top_k(a_s, a_p, b_s, b_p, 4)
    assert p.tolist() == [[4, 7, 9, 2]] and s.tolist() == [[3.0, 3.0, 2.0, 1.0]]


def test_sparse_encoding_never_builds_a_dense_corpus_array(monkeypatch):
    """encode_texts turns each batch's reps to CSR as it comes, on their device: no float array bigger
    than one batch's (batch × vocabulary) is ever made from the reps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from retrieval_scaling.inference import encode_texts
    from retrieval_scaling.paradigms import paradigm_of

    class Tok:
        bos_token_id, pad_token_id = 1, 0

        def __call__(self, texts, **_):
            return {"input_ids": [[2 + (ord(c) % 90) for c in t][:15] for t in texts]}

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=5000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    encoder = paradigm_of({"name": "sparse"}).encoder(model).eval()
    widest = []
    real_batch_csr = __import__("retrieval_scaling.paradigms.sparse", fromlist=["batch_csr"]).batch_csr

    def spy(reps, max_terms=None):
        widest.append(reps.shape[0])
        return real_batch_csr(reps, max_terms)

    monkeypatch.setattr("retrieval_scaling.paradigms.sparse.batch_csr", spy)
    texts = [f"text number {i} " * (1 + i % 3) for i in range(50)]
    out = encode_texts(encoder, Tok(), texts, 16, 8, "docs")
    assert sparse.issparse(out) and out.shape == (50, 5000) and max(widest) == 8 and len(widest) == 7
    # rows in input order: each equals its text encoded alone
    alone = encode_texts(encoder, Tok(), texts[13:14], 16, 8, "one")
    np.testing.assert_allclose(out[13].toarray(), alone.toarray(), rtol=1e-5, atol=1e-6)


def test_pruned_sparse_reps_keep_each_rows_largest_weights_and_name_their_metrics():
    """An untrained sparse head at Llama-3's vocabulary weighs most terms; pruned to k per row, each
    row keeps exactly its k largest weights (all of them when it has fewer), in CSR of k entries."""
    import torch

    from retrieval_scaling.inference import pruned_names
    from retrieval_scaling.paradigms.sparse import batch_csr

    gen = torch.Generator().manual_seed(3)
    reps = torch.relu(torch.randn(6, 128_256, generator=gen))  # about half the vocabulary non-zero
    reps[5] = 0
    reps[5, [7, 70_000, 128_255]] = torch.tensor([0.5, 2.0, 1.0])  # a row with fewer than k terms
    whole, pruned = batch_csr(reps), batch_csr(reps, 256)
    assert whole.nnz > 5 * 60_000
    assert np.diff(pruned.indptr).tolist() == [256] * 5 + [3]
    for row in range(5):
        top = torch.topk(reps[row], 256)
        assert sorted(pruned[row].indices.tolist()) == sorted(top.indices.tolist())
        np.testing.assert_array_equal(np.sort(pruned[row].data), np.sort(top.values.numpy()))
    assert pruned[5].toarray().ravel()[[7, 70_000, 128_255]].tolist() == [0.5, 2.0, 1.0]
    assert (batch_csr(reps[:, :200], 256) != batch_csr(reps[:, :200])).nnz == 0  # narrower than k: unchanged
    assert pruned_names({"scifact/ndcg_10": 0.5, "beir/recall_100": 0.25, "scifact:q50-bm25_10/ndcg_10": 0.1},
                        256) == {"scifact:top256/ndcg_10": 0.5, "beir:top256/recall_100": 0.25,
                                 "scifact:q50-bm25_10:top256/ndcg_10": 0.1}


def test_the_step0_key_follows_the_pruning_of_sparse_cells_only(compose):
    from retrieval_scaling.identity import cell_id
    from retrieval_scaling.layout import step0_key
    from retrieval_scaling.paradigms import paradigm_of

    def key(cfg):
        return step0_key(cfg, paradigm_of(cfg["paradigm"]).step0_max_terms(cfg["eval"]))

    for paradigm in ("sparse", "dense"):
        base, other = (compose("model=tiny_s", f"paradigm={paradigm}", f"eval.step0_max_terms={k}") for k in (256, 64))
        assert cell_id(base) == cell_id(other)  # the trained cell is evaluated whole either way
        assert (key(base) != key(other)) == (paradigm == "sparse")


# ---- an eval=paper-shaped rehearsal with a real tiny encoder, 1 and 2 ranks -------------------------

def write_beir(root: Path, name: str, corpus: dict, queries: dict, qrels: dict) -> None:
    d = root / name
    (d / "qrels").mkdir(parents=True)
    with (d / "corpus.jsonl").open("w") as f:
        for i, t in corpus.items():
            f.write(json.dumps({"_id": i, "title": "", "text": t}) + "\n")
    with (d / "queries.jsonl").open("w") as f:
        for q, t in queries.items():
            f.write(json.dumps({"_id": q, "text": t}) + "\n")
    with (d / "qrels" / "test.tsv").open("w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, judged in qrels.items():
            for doc, rel in judged.items():
                f.write(f"{q}\t{doc}\t{rel}\n")


@pytest.fixture(scope="module")
def paper_shaped(data_root, tmp_path_factory):
    """Three collections over one corpus (as MS MARCO dev, DL19, DL20) and one over a corpus of its own
    that overlaps it (as Climate-FEVER and FEVER), cut from SciFact."""
    from retrieval_scaling.data import load_collection

    sci = load_collection(data_root, "scifact", "test")
    root = tmp_path_factory.mktemp("paper_shaped")
    qids = sorted(sci.queries)
    judged = sorted({d for q in qids for d in sci.qrels[q]})
    others = [d for d in sci.corpus if d not in set(judged)]
    shared = {d: sci.corpus[d] for d in judged[:200] + others[:400]}
    shared["dup-of-first"] = shared[judged[0]]  # one text twice under two ids
    covered = [q for q in qids if all(d in shared for d in sci.qrels[q])]
    for name, picks in (("dev", covered[0::3]), ("dl19", covered[1::3]), ("dl20", covered[2::3])):
        write_beir(root, name, shared, {q: sci.queries[q] for q in picks}, {q: sci.qrels[q] for q in picks})
    own = {d: sci.corpus[d] for d in judged[200:] + others[400:550] + others[:50]}  # 50 shared with the above
    picks = [q for q in qids if all(d in own for d in sci.qrels[q])]
    write_beir(root, "other", own, {q: sci.queries[q] for q in picks}, {q: sci.qrels[q] for q in picks})
    distinct = len(set(shared.values()) | set(own.values()))
    return root, distinct


def run_ranks(root: Path, store: Path, runs: Path, paradigm: str, world: int, *extra: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("RANK", None)
        if world > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                       WORLD_SIZE=str(world))
        procs.append(subprocess.Popen([sys.executable, str(HELPER), str(root), str(store), str(runs), paradigm,
                                       *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        out.append({"returncode": p.returncode, "stderr": stderr,
                    "result": json.loads(stdout.strip().splitlines()[-1]) if p.returncode == 0 else None})
    return out


def read_runs(runs: Path) -> dict[str, bytes]:
    return {p.name: gzip.decompress(p.read_bytes()) for p in sorted(runs.glob("*.trec.gz"))}


def parse_run(text: bytes) -> dict[str, list[tuple[str, float]]]:
    run: dict[str, list[tuple[str, float]]] = {}
    for line in text.decode().splitlines():
        qid, _, doc, _, score, _ = line.split()
        run.setdefault(qid, []).append((doc, float(score)))
    return run


def assert_runs_agree(got: dict[str, bytes], want: dict[str, bytes], rtol: float = 2e-5) -> list[str]:
    """Run files of the same encoder computed in other processes: the CPU's matrix kernels are not bitwise
    reproducible from one process to the next (docs/evaluation.md), so a document's score may move in its
    last bits and swap it with a nearly tied neighbour. Each query must rank the same documents with the
    same scores (to `rtol` of the query's best, beyond the runs' 6 printed digits); a document may change
    places only among scores within that tolerance, or leave the list only from its tail. Returns the
    files that differ at all (byte-identical ones are the common case)."""
    assert got.keys() == want.keys()
    for name in got:
        a, b = parse_run(got[name]), parse_run(want[name])
        assert a.keys() == b.keys(), name
        for qid, hits in a.items():
            other = b[qid]
            assert len(hits) == len(other), (name, qid)
            tol = rtol * max(1.0, abs(hits[0][1]), abs(other[0][1]))
            for mine, theirs in ((hits, other), (other, hits)):
                score_of = dict(theirs)
                for (doc, score), (_, score_there) in zip(mine, theirs, strict=True):
                    assert abs(score - score_there) <= tol, (name, qid, "scores at a rank differ")
                    if doc in score_of:
                        assert abs(score_of[doc] - score) <= tol, (name, qid, doc, "its score moved")
                    else:
                        assert score <= theirs[-1][1] + tol, (name, qid, doc, "missing, above the other's cut")
    return [name for name in got if got[name] != want[name]]


def assert_metrics_agree(got: dict[str, float], want: dict[str, float], differing_runs: list[str]) -> None:
    """Metrics of collections whose run files are identical are equal exactly (computed from the same
    run by the same code); elsewhere near-tie swaps move them a little, and the entropy moves in its late
    digits with the scores."""
    assert got.keys() == want.keys()
    changed = {name.removesuffix(".trec.gz") for name in differing_runs}
    for key, value in want.items():
        collection, measure = key.split("/", 1)
        if collection in changed:
            assert got[key] == pytest.approx(value, abs=0.02), key
        elif measure.startswith("contrastive_entropy"):
            assert got[key] == pytest.approx(value, rel=1e-4), key
        else:
            assert got[key] == value, key


def test_runs_agree_allows_only_near_tie_swaps():
    def run(*hits):
        return {"c.trec.gz": "".join(f"q Q0 {d} {r} {s:.6g} t\n" for r, (d, s) in enumerate(hits, 1)).encode()}

    want = run(("a", 9.0), ("b", 5.000001), ("c", 5.0), ("d", 1.0))
    assert assert_runs_agree(want, want) == []
    assert assert_runs_agree(run(("a", 9.0), ("c", 5.0), ("b", 5.000001), ("d", 1.0)), want) == ["c.trec.gz"]
    assert assert_runs_agree(run(("a", 9.0), ("b", 5.0), ("c", 5.0), ("e", 1.0000001)), want) == ["c.trec.gz"]
    for wrong in (run(("b", 9.0), ("a", 5.0), ("c", 5.0), ("d", 1.0)),   # a real reorder
                  run(("a", 9.0), ("b", 5.1), ("c", 5.0), ("d", 1.0)),    # a score that moved
                  run(("a", 9.0), ("b", 5.0), ("e", 5.0), ("d", 1.0))):   # a document lost above the cut
        with pytest.raises(AssertionError):
            assert_runs_agree(wrong, want)


@pytest.mark.slow
@pytest.mark.parametrize("paradigm", ["dense", "sparse"])
def test_paper_shaped_evaluation_encodes_each_document_once_on_one_or_two_ranks(paper_shaped, tmp_path, paradigm):
    root, distinct = paper_shaped
    (one,) = run_ranks(root, tmp_path / "store1", tmp_path / "runs1", paradigm, 1)
    assert one["returncode"] == 0, one["stderr"][-3000:]
    # Counted, not inferred: the shared corpus once for dev, DL19 and DL20, the other one's new texts once.
    assert one["result"]["encoded_docs"] == distinct
    metrics = one["result"]["metrics"]
    assert {f"{c}/{m}" for c in ("dev", "dl19", "dl20", "other")
            for m in ("ndcg_10", "contrastive_entropy_k100_seed0")} <= set(metrics)

    two = run_ranks(root, tmp_path / "store2", tmp_path / "runs2", paradigm, 2)
    assert all(r["returncode"] == 0 for r in two), [r["stderr"][-3000:] for r in two]
    shares = [r["result"]["encoded_docs"] for r in two]
    assert sum(shares) == distinct and min(shares) > 0  # each rank encoded its share, no document twice
    assert two[1]["result"]["metrics"] == {}
    # Rank 0's merge of both ranks' lists is exact; the encodings come from other processes (see above).
    differing = assert_runs_agree(read_runs(tmp_path / "runs2"), read_runs(tmp_path / "runs1"))
    assert_metrics_agree(two[0]["result"]["metrics"], metrics, differing)
    assert len(read_runs(tmp_path / "runs1")) == 4


@pytest.mark.slow
def test_an_evaluation_killed_mid_corpus_resumes_from_its_shards(paper_shaped, tmp_path):
    root, distinct = paper_shaped
    (whole,) = run_ranks(root, tmp_path / "store-whole", tmp_path / "runs-whole", "dense", 1)
    (killed,) = run_ranks(root, tmp_path / "store", tmp_path / "runs", "dense", 1, "--die-after-shards", "3")
    assert killed["returncode"] == -9  # SIGKILL, after three shards were written
    assert len(list((tmp_path / "store").glob("shard-*.npz"))) == 3
    (again,) = run_ranks(root, tmp_path / "store", tmp_path / "runs", "dense", 1)
    assert again["returncode"] == 0, again["stderr"][-3000:]
    # the log counts what was reused: the dev corpus's first three shards (600 distinct texts in 5 shards
    # of at most 128, as equal as can be: 120 each)
    assert re.search(r"dev\+dl19\+dl20 corpus: \d+ documents, 600 distinct; 360 already encoded", again["stderr"])
    assert re.search(r"dev\+dl19\+dl20 corpus: \d+ shard\(s\) hold its documents, 3 of them reused",
                     again["stderr"])
    assert again["result"]["reused_shards"] >= 3 and again["result"]["encoded_docs"] == distinct - 3 * 120
    differing = assert_runs_agree(read_runs(tmp_path / "runs"), read_runs(tmp_path / "runs-whole"))
    assert_metrics_agree(again["result"]["metrics"], whole["result"]["metrics"], differing)


@pytest.mark.parametrize("with_bias", [False, True])
def test_inference_pooling_equals_the_masked_max_of_the_whole_logits(with_bias):
    import torch

    from retrieval_scaling.encoders import pooled_logits_inference

    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 5, 4), torch.randn(11, 4)
    bias = torch.randn(11) if with_bias else None
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])  # left padding
    logits = hidden @ weight.T + (bias if with_bias else 0)
    want = logits.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).amax(dim=1)
    torch.testing.assert_close(pooled_logits_inference(hidden, mask, weight, bias), want)


def test_shards_split_evenly_over_the_ranks():
    from retrieval_scaling.encodings import balanced_shards

    sizes = lambda n, size, world: [s.stop - s.start for s in balanced_shards(n, size, world)]  # noqa: E731
    assert sizes(10, 4, 2) == [2, 3, 2, 3]  # 3 shards of ≤ 4 → 4 (a multiple of 2 ranks): 10·j//4 bounds
    assert sizes(90, 20, 1) == [18] * 5
    assert sizes(3, 100, 4) == [1, 1, 1]  # fewer documents than ranks: no empty shard
    assert balanced_shards(0, 100, 4) == []
    # MS MARCO over 4 ranks: 45 shards of 200k split 12/11/11/11; now 48 of ~184k, 12 per rank
    msmarco = sizes(8_841_823, 200_000, 4)
    assert len(msmarco) == 48 and max(msmarco) - min(msmarco) <= 1 and max(msmarco) <= 200_000
    per_rank = [sum(msmarco[r::4]) for r in range(4)]
    assert sum(per_rank) == 8_841_823 and max(per_rank) - min(per_rank) <= 12


# ---- one read per corpus, free space, 16-bit stores, resumable collections ---------------------------

def shared_corpus_collections(n_docs: int = 90):
    """Three collections over one corpus object (as MS MARCO dev, DL19 and DL20), each judging others."""
    from retrieval_scaling.data import Collection

    corpus = {f"d{i}": f"doc {i}" for i in range(n_docs)}
    colls = []
    for c, name in enumerate(("dev", "dl19", "dl20")):
        queries = {f"{name}-q{i}": f"query {name} {i}" for i in range(5)}
        qrels = {q: {f"d{(7 * i + 3 * c) % n_docs}": 1, f"d{(11 * i + c) % n_docs}": 0}
                 for i, q in enumerate(queries)}
        colls.append(Collection(name, corpus, queries, qrels))
    return colls


def eval_settings(colls, shard_size: int) -> dict:
    spec = {"depth": 10, "measures": {"ndcg_10": "nDCG@10"}}
    return {"query_max_len": 16, "passage_max_len": 64, "shard_size": shard_size,
            "contrastive_entropy": {"negatives": 20, "seed": 0},
            "collections": {c.name: {**spec, "name": c.name} for c in colls}}


@pytest.mark.parametrize("sparse_reps", [False, True])
def test_collections_sharing_a_corpus_and_their_entropy_read_each_shard_once(tmp_path, sparse_reps):
    from retrieval_scaling.evaluation import evaluate_all
    from retrieval_scaling.retrievers import EncoderRetriever

    colls = shared_corpus_collections()
    cfg = eval_settings(colls, 20)
    entropy = {"negatives": 20, "seed": 0, "temperature": 0.5}
    kind = paradigm(sparse_reps)
    together = EncoderRetriever("t", fake_encoder(16, sparse_reps, []), kind, tmp_path / "one", entropy=entropy)
    metrics = evaluate_all(together, colls, cfg)
    shards = len(list((tmp_path / "one").glob("shard-*.npz")))
    assert shards == 5 and together.store.shard_reads == shards  # 3 searches + 3 entropies: one read a shard
    # the same numbers as each collection searched on its own (which reads the store once per collection)
    alone = EncoderRetriever("a", fake_encoder(16, sparse_reps, []), kind, tmp_path / "two", entropy=entropy)
    separate = {}
    for coll in colls:
        one = {**cfg, "collections": {coll.name: cfg["collections"][coll.name]}}
        separate.update(evaluate_all(alone, [coll], one))
    assert alone.store.shard_reads == 3 * shards
    assert set(metrics) == set(separate) and len(metrics) == 6 + 3 * sparse_reps * 2
    for key, value in separate.items():
        assert metrics[key] == pytest.approx(value, rel=1e-12), key


def test_a_store_short_of_space_stops_before_encoding_with_one_line(tmp_path, monkeypatch):
    import shutil as shutil_module

    from retrieval_scaling.disk import human_size
    from retrieval_scaling.errors import UserError

    calls = []
    store = EncodingStore(tmp_path / "store", fake_encoder(1024, False, calls), Dense(), shard_size=20,
                          planned_doc_bytes=Dense().doc_bytes(Shapes(1024), {}, 0))
    store.ensure([f"doc {i}" for i in range(20)], 64, "first")  # fits
    kept = sorted(p.name for p in (tmp_path / "store").iterdir())
    free = shutil_module.disk_usage(tmp_path).free
    monkeypatch.setattr("retrieval_scaling.encodings.shutil.disk_usage",
                        lambda path: shutil_module._ntuple_diskusage(free, free - 100_000, 100_000))
    calls.clear()
    with pytest.raises(UserError) as err:
        store.ensure([f"doc {i}" for i in range(200)], 64, "big")  # 180 new documents × 2,064 bytes
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "store") in message
    assert f"need {human_size(180 * 2064)} more (180 documents × 2064 bytes)" in message
    assert f"and {human_size(100_000)} is free" in message
    # nothing encoded, nothing lost
    assert calls == [] and sorted(p.name for p in (tmp_path / "store").iterdir()) == kept


def test_a_float16_store_is_half_the_size_and_keeps_float32_where_float16_would_overflow(tmp_path):
    keys = np.frombuffer(np.arange(32, dtype=np.uint8).tobytes() * 4, dtype="V16")[:8]
    reps = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    sizes = {}
    for dtype in ("float32", "float16"):
        store = EncodingStore(tmp_path / dtype, None, Dense(), shard_size=8, store_dtype=dtype)
        store.write_shard("shard-x", keys, reps)
        sizes[dtype] = store.shard_path("shard-x").stat().st_size
        back = store.read_reps("shard-x")
        assert back.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(back, reps.astype(dtype))
    assert (sizes["float16"] - 8 * 16) / (sizes["float32"] - 8 * 16) == pytest.approx(0.5, abs=0.02)
    store.write_shard("shard-big", keys, reps * 1e5)  # beyond float16's 65,504
    big = store.read_reps("shard-big")
    assert big.dtype == np.float32 and np.array_equal(big, reps * 1e5)


def test_a_requeued_evaluation_skips_the_collections_it_finished(tmp_path):
    from retrieval_scaling.data import Collection
    from retrieval_scaling.evaluation import evaluate_all
    from retrieval_scaling.retrievers import EncoderRetriever

    dev, _, _ = shared_corpus_collections()
    other = Collection("other", {f"o{i}": f"other doc {i}" for i in range(40)}, {"q": "query other"}, {"q": {"o3": 1}})
    cfg = eval_settings([dev, other], 20)
    encode, seen = fake_encoder(16, False, []), []

    def dies_on_other(texts, max_len, desc):
        seen.extend(texts)
        if any(t.startswith("other") for t in texts) and fail[0]:
            raise RuntimeError("node lost")
        return encode(texts, max_len, desc)

    fail = [True]
    retriever = EncoderRetriever("r", dies_on_other, Dense(), tmp_path / "store", entropy={**cfg["contrastive_entropy"],
                                                                                        "temperature": 0.5})
    with pytest.raises(RuntimeError, match="node lost"):
        evaluate_all(retriever, [dev, other], cfg, tmp_path / "runs", progress=tmp_path / "store" / "collections")
    assert (tmp_path / "store" / "collections" / "dev.json").is_file() and (tmp_path / "runs" / "dev.trec.gz").is_file()
    fail[0], seen[:] = False, []
    again = evaluate_all(retriever, [dev, other], cfg, tmp_path / "runs", progress=tmp_path / "store" / "collections")
    assert seen and not any(t.startswith("doc") or t.startswith("query dev") for t in seen)  # dev not redone
    fresh = EncoderRetriever("f", encode, Dense(), tmp_path / "fresh", entropy=retriever.entropy)
    assert again == evaluate_all(fresh, [dev, other], cfg, tmp_path / "runs-fresh")


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # bytes flipped inside the stored reps: the zip's CRC no longer matches
        at = len(data) // 2
        data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_shard_left_by_an_earlier_attempt_is_encoded_again_with_one_warning(tmp_path, caplog, how):
    calls = []
    encode = fake_encoder(24, False, calls)
    texts = [f"doc {i}" for i in range(60)]
    EncodingStore(tmp_path, encode, Dense(), shard_size=20).ensure(texts, 64, "c")
    shards = sorted(tmp_path.glob("shard-*.npz"))
    damage(shards[1], how)
    again = EncodingStore(tmp_path, encode, Dense(), shard_size=20)
    with caplog.at_level("WARNING", logger="retrieval_scaling.encodings"):
        view = again.ensure(texts, 64, "c")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(shards[1]) in warnings[0] and "encoded again" in warnings[0]
    assert again.encoded_docs == 20  # that shard's documents, no more
    queries = encode([f"query {i}" for i in range(4)], 16, "q")
    ((scores, pos),) = search_corpus(again, view, [SearchRequest(queries, 10)], tmp_path / "partial")
    want_s, want_p = top_k_rows(score_distinct_then_expand(queries, texts, encode, 64), 10)
    np.testing.assert_array_equal(pos, want_p)


def test_a_shard_damaged_during_an_evaluation_stops_it_with_one_line_naming_it(tmp_path):
    from retrieval_scaling.errors import UserError

    encode = fake_encoder(24, False, [])
    store = EncodingStore(tmp_path, encode, Dense(), shard_size=20)
    view = store.ensure([f"doc {i}" for i in range(40)], 64, "c")
    victim = sorted(tmp_path.glob("shard-*.npz"))[0]
    damage(victim, "flipped")
    with pytest.raises(UserError) as err:
        search_corpus(store, view, [SearchRequest(encode(["q"], 16, "q"), 5)], tmp_path / "partial")
    assert "\n" not in str(err.value) and str(victim) in str(err.value) and "run the evaluation again" in str(err.value)
    assert not victim.exists()  # a cache: the next attempt encodes its documents again
