"""The multi-vector paradigm: MaxSim by hand, its store and search against brute force, its encoder, its
corpus bound, and its cells in the grid."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval_scaling.corpus_search import SearchRequest, search_corpus
from retrieval_scaling.encodings import EncodingStore
from retrieval_scaling.errors import ConfigError
from retrieval_scaling.paradigms.multivector import MultiVector, TokenVectors
from retrieval_scaling.topk import top_k_rows

ROOT = Path(__file__).resolve().parents[1]

# 3 queries and 4 passages of 2 tokens, 2 dims; a zero vector is padding (left, as the encoder pads)
Q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],
                  [[0.0, 0.0], [1.0, 0.0]],
                  [[-1.0, 0.0], [0.0, -1.0]]])
P = torch.tensor([[[0.0, 0.0], [1.0, 0.0]],
                  [[0.0, 1.0], [1.0, 0.0]],
                  [[0.0, 0.0], [0.6, 0.8]],
                  [[-1.0, 0.0], [0.0, -1.0]]])
# Σ over each query token of its best dot product with the passage's real tokens, by hand:
# q1·p3 = 0.6 + 0.8; q2's padding adds 0; q3·p1 = -1 + 0 (p1's padding is no match); q3·p4 = 1 + 1
BY_HAND = [[1.0, 2.0, 1.4, 0.0],
           [1.0, 1.0, 0.6, 0.0],
           [-1.0, 0.0, -1.4, 2.0]]


def host(reps: torch.Tensor) -> TokenVectors:
    return MultiVector(dim=2).to_host(reps)


def test_maxsim_scores_equal_a_hand_computation_in_training_and_in_search():
    paradigm = MultiVector(dim=2)
    torch.testing.assert_close(paradigm.scores(Q, P), torch.tensor(BY_HAND))
    # own passages: query 1 with passages 1-2, query 2 with 3-4 (the loss's grouping, positive first)
    torch.testing.assert_close(paradigm.own_scores(Q[:2], P, 2), torch.tensor([[1.0, 2.0], [0.6, 0.0]]))
    # on the host, padding dropped: the search's and the contrastive entropy's scores are the same
    queries, docs = host(Q), host(P)
    assert queries.shape == (3, 2) and list(np.diff(docs.offsets)) == [1, 2, 1, 2]
    np.testing.assert_allclose(paradigm.host_scores(queries, docs), BY_HAND, rtol=1e-6)


def test_host_vectors_keep_each_texts_tokens_through_take_join_and_a_float16_shard():
    paradigm = MultiVector(dim=2)
    docs = host(P)
    picked = paradigm.take(docs, np.array([2, 0, 3]))
    np.testing.assert_array_equal(picked.vectors, np.array([[0.6, 0.8], [1, 0], [-1, 0], [0, -1]], np.float32))
    assert list(picked.offsets) == [0, 1, 2, 4]
    joined = paradigm.join([host(P[:2]), host(P[2:])], np.array([3, 1, 0, 2]))
    np.testing.assert_array_equal(joined.vectors, paradigm.take(docs, np.array([3, 1, 0, 2])).vectors)
    back = paradigm.from_arrays(paradigm.shard_arrays(docs, "float16"))
    assert back.vectors.dtype == np.float16 and list(back.offsets) == list(docs.offsets)
    np.testing.assert_allclose(back.vectors.astype(np.float32), docs.vectors, atol=2e-4)


def stable_rng(*parts) -> np.random.Generator:
    """Seeded by `parts` the same in every process (Python's `hash` of a str is not)."""
    seed = int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed)


def fake_token_encoder(dim: int):
    """1 to 6 token vectors per text, a pure function of it, with values on a grid of 1/8 (every sum of
    products exact in float32 and float16: any kernel's scores are the same bit for bit)."""
    def encode(texts, max_len, desc):
        rows = [stable_rng(t, max_len).integers(-8, 9, (int(stable_rng(t).integers(1, 7)), dim)) / 8 for t in texts]
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        return TokenVectors(np.concatenate(rows).astype(np.float32), offsets)
    return encode


@pytest.mark.parametrize("where", ["host", "torch"])
def test_store_search_equals_brute_force_maxsim_with_repeated_texts_and_chunks(tmp_path, monkeypatch, where):
    """Over a float16 store in 5 shards, with the similarities cut in small chunks (queries and tokens
    alike): the hits of brute-force MaxSim over every document, ties broken by position."""
    monkeypatch.setattr("retrieval_scaling.paradigms.multivector.SIMILARITY_ELEMENTS", 64)
    paradigm = MultiVector(dim=4)
    encode = fake_token_encoder(4)
    texts = [f"doc {i}" for i in range(90)] + ["doc 3", "doc 50", "doc 3"]
    store = EncodingStore(tmp_path, encode, paradigm, shard_size=20, searcher=paradigm.searcher(where))
    view = store.ensure(texts, 64, "c")
    queries = encode([f"query {i}" for i in range(9)], 16, "q")
    ((scores, pos),) = search_corpus(store, view, [SearchRequest(queries, 15)], tmp_path / "partial")
    distinct, at = np.unique(np.array(texts, dtype=object), return_inverse=True)
    brute = paradigm.host_scores(queries, encode(list(distinct), 64, "all"))[:, at]
    want_s, want_p = top_k_rows(brute, 15)
    assert any(len(set(row)) < len(row) for row in want_s.tolist())  # ties, across shards too
    np.testing.assert_array_equal(pos, want_p)
    np.testing.assert_array_equal(scores, want_s)


def test_the_encoder_gives_unit_token_vectors_and_zero_padding_and_encodes_in_input_order():
    from transformers import LlamaConfig, LlamaForCausalLM

    from retrieval_scaling.encoders import encode_inputs
    from retrieval_scaling.inference import encode_texts

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    encoder = MultiVector(dim=8).encoder(model).eval()
    ids, mask = encode_inputs([[5, 6, 7, 8], [9], [10, 11]], bos_id=1, pad_id=2, max_len=8)
    with torch.no_grad():
        reps = encoder(ids, mask)
    assert reps.shape == (3, 5, 8)
    norms = reps.norm(dim=-1)
    torch.testing.assert_close(norms[mask.bool()], torch.ones(int(mask.sum())))
    assert (norms[~mask.bool()] == 0).all()

    class Tok:
        bos_token_id, pad_token_id = 1, 2

        def __call__(self, texts, **kwargs):
            return {"input_ids": [[3 + len(w) % 30 for w in t.split()] for t in texts]}

    texts = ["a bb ccc", "dddd", "e ff ggg hhhh iiiii", "jj"]
    out = encode_texts(encoder, Tok(), texts, 16, 2, "docs")
    assert list(np.diff(out.offsets)) == [4, 2, 6, 2]  # BOS and each word, in input order
    alone = encode_texts(encoder, Tok(), texts[2:3], 16, 2, "one")
    np.testing.assert_allclose(out.vectors[6:12], alone.vectors, atol=1e-5)


def test_a_corpus_beyond_the_declared_bound_is_refused_in_one_line_before_anything_runs(tmp_path, data_root):
    with pytest.raises(ConfigError, match=r"^big: 8841823 documents × 77 tokens × 128 dims take 174\.3 GB as token "
                                          r"vectors, beyond paradigm\.max_corpus_gb=64: .*brute force"):
        MultiVector().check_corpus("big", 8_841_823, 77)
    MultiVector().check_corpus("scifact", 5183, 300)  # 0.4 GB: fine
    env = {**os.environ, "RS_SWEEPS_DIR": str(tmp_path / "sweeps"), "RS_DATA_DIR": str(data_root)}
    proc = subprocess.run([sys.executable, "-m", "retrieval_scaling.sweep", "+grid=full", "paradigm=multivector",
                           "sweep.dry_run=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: msmarco_dev: ") and "max_corpus_gb=64" in lines[0]
    assert not (tmp_path / "sweeps").exists() or not any((tmp_path / "sweeps").rglob("plan.json"))


def test_the_tiny_grid_with_a_third_paradigm_plans_27_distinct_cells(tmp_path, data_root):
    env = {**os.environ, "RS_SWEEPS_DIR": str(tmp_path), "RS_DATA_DIR": str(data_root)}
    proc = subprocess.run([sys.executable, "-m", "retrieval_scaling.sweep", "+grid=tiny",
                           "paradigm=sparse,dense,multivector", "sweep.dry_run=true"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "tiny" / "plan.json").read_text())
    assert len({c["cell_id"] for c in plan}) == 27
    multi = [c for c in plan if c["paradigm"] == "multivector"]
    assert len(multi) == 9 and all(c["steps"] >= 1 for c in multi)
    # MaxSim over 32 × 128 token pairs of 128 dims per (query, passage) pair, all 8 × 64 pairs of a CL step
    cl = next(c for c in multi if (c["model"], c["loss"]) == ("tiny_s", "cl"))
    assert cl["flops_terms"]["similarity"] == 6 * 8 * 64 * 32 * 128 * 128
    assert cl["flops_terms"]["projection"] == 6 * cl["tokens_per_step"] * 64 * 128


@pytest.mark.slow
def test_a_tiny_multivector_cell_runs_end_to_end_and_improves_on_its_step_0(tmp_path, data_root):
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "RS_SWEEPS_DIR": str(tmp_path), "RS_DATA_DIR": str(data_root), "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.run([sys.executable, "-m", "retrieval_scaling.sweep", "+grid=tiny", "model=tiny_s",
                           "paradigm=multivector", "loss=cl", "sweep.name=mv", "model.pretrain.steps=60",
                           "model.mntp.steps=20", "eval.subset={queries:100,bm25_depth:20,seed:0}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (plan,) = json.loads((tmp_path / "mv" / "plan.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mv").experiment_id], "tags.run_kind = 'cell'")
    assert run.data.tags["paradigm"] == "multivector"
    name = "scifact:q100-bm25_20"
    ndcg = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"{name}/ndcg_10")}
    entropy = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                   f"{name}/contrastive_entropy_k1000_seed0")}
    assert set(ndcg) == set(entropy) == {0, plan["steps"]}
    assert ndcg[plan["steps"]] > ndcg[0] and entropy[plan["steps"]] < entropy[0]
    # the trained projection is saved with the LoRA weights
    from safetensors.torch import load_file

    final = load_file(str(tmp_path / "mv" / "cells" / plan["cell_id"] / "final" / "trainable.safetensors"))
    assert final["projection.weight"].shape == (128, 64)
