"""Lion-SP: a weight per vocabulary term (the LM head's logits, max-pooled), scored by a dot product, kept
as CSR on the host, searched by an inverted index, and held sparse by the FLOPS regulariser. Torch and
numba are imported where they are used: the planner prices this class without them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from ..store_format import KEY_BYTES, planned_doc_terms
from .base import FP32, HeadMemory, Paradigm

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..encoders import SparseEncoder


class Sparse(Paradigm):
    """`flops`: the FLOPS regulariser's {lambda_q, lambda_d, warmup_fraction} (None: none)."""

    name = "sparse"

    def __init__(self, name: str | None = None, temperature: float = 1.0,
                 flops: Mapping[str, float] | None = None):
        super().__init__(name, temperature)
        self.flops = dict(flops) if flops else None

    def encoder(self, backbone: nn.Module) -> SparseEncoder:
        from ..encoders import SparseEncoder  # torch

        return SparseEncoder(backbone, self)

    def regularizer(self, q, p, step, steps):
        """λ·FLOPS of the queries and of the passages, each λ warmed up quadratically over the first
        `warmup_fraction` of the optimizer steps."""
        from ..regularizers import flops_regularizer, quadratic_warmup  # torch

        if not self.flops:
            return 0.0, {}
        warmup = math.ceil(steps * float(self.flops["warmup_fraction"]))
        lam_q = quadratic_warmup(float(self.flops["lambda_q"]), step, warmup)
        lam_d = quadratic_warmup(float(self.flops["lambda_d"]), step, warmup)
        parts = {"flops_q": flops_regularizer(q), "flops_d": flops_regularizer(p)}
        return lam_q * parts["flops_q"] + lam_d * parts["flops_d"], parts

    def train_metrics(self, q, p):
        return {"train/query_nnz": nonzeros(q), "train/doc_nnz": nonzeros(p)}

    # ---- what it costs ----

    def head_flops(self, arch, tokens, train_embeddings):
        """The LM head over every position, forward and activation gradient, plus its weight gradient when
        the (tied) embeddings train."""
        d, vocab = arch.hidden_size, arch.vocab_size
        return {"lm_head": (2 + 2) * tokens * d * vocab,
                "lm_head_weight_grad": 2 * tokens * d * vocab if train_embeddings else 0}

    def pair_width(self, arch, query_len, passage_len):
        return arch.vocab_size

    def encoding_flops_per_token(self, arch):
        return 2 * arch.hidden_size * arch.vocab_size

    def rep_width(self, arch, length):
        return arch.vocab_size

    def training_head(self, arch, shape, prec, head_trainable):
        """The pooling's max logits (compute dtype) and argmax per row, kept for the head's backward (or by
        gradient caching from the first encoding to the second); the head's chunked backward
        (`MaxPooledLogits`); a micro-batch's term weights (input, output, mask); and the loss's second copy
        of the representations, the FLOPS regulariser's |x|."""
        from ..encoders import pool_chunk_rows  # torch: imported by a plan, not by the planner's modules

        vocab, rows, length = arch.vocab_size, shape.backward_rows, shape.passage_len
        chunk = min(rows, pool_chunk_rows(length, vocab)) * length * vocab * prec.compute_bytes
        weight = vocab * arch.hidden_size * prec.compute_bytes
        cast = weight if prec.autocast and prec.weight_bytes == FP32 else 0
        return HeadMemory(kept=(prec.compute_bytes + 4) * vocab * shape.texts,
                          backward=float(chunk + cast + (weight if head_trainable else 0)),
                          graph=3 * FP32 * vocab * rows, loss_copies=2)

    def encoding_buffers(self, arch, batch, length, compute_bytes):
        """One (L, V) buffer, the (N, V) pooled logits and the weights (`encoders.pooled_logits_inference`)."""
        return {"vocabulary_scores": float(arch.vocab_size * (length * compute_bytes + batch * (compute_bytes
                                                                                               + 2 * FP32)))}

    def search_buffers(self, arch, eval_cfg, shard, block):
        """The shard as torch CSR with 64-bit indices, and the block's queries densified."""
        return {**super().search_buffers(arch, eval_cfg, shard, block),
                "search_shard": float(shard * planned_doc_terms(eval_cfg) * (8 + 8 + FP32)),
                "search_queries": float(block * arch.vocab_size * FP32)}

    # ---- stored and searched ----

    def step0_max_terms(self, eval_cfg):
        """`eval.step0_max_terms`: an untrained head weighs most of the vocabulary."""
        pruned = eval_cfg.get("step0_max_terms")
        return int(pruned) if pruned else None

    def doc_bytes(self, arch, eval_cfg, mean_tokens, step0=False):
        """Its non-zeros, each a float32 weight (16 bits moved SciFact's nDCG@10, docs/evaluation.md) and a
        32-bit term id, and its row pointer; a trained document's non-zeros as `eval.planned_doc_terms`
        plans, a step-0 one's as it is pruned (or the whole vocabulary)."""
        terms = (self.step0_max_terms(eval_cfg) or arch.vocab_size) if step0 else planned_doc_terms(eval_cfg)
        return KEY_BYTES + terms * (4 + 4) + 4

    def to_host(self, reps, max_terms=None):
        return batch_csr(reps, max_terms)

    def join(self, chunks: Sequence[sparse.csr_matrix], order: np.ndarray) -> sparse.csr_matrix:
        return sparse.vstack(chunks, format="csr")[order]

    def shard_arrays(self, reps, dtype):
        from ..search import to_csr  # numba

        m = to_csr(reps)
        return {"data": m.data, "indices": m.indices, "indptr": m.indptr, "shape": np.array(m.shape)}

    def from_arrays(self, arrays):
        return sparse.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=tuple(arrays["shape"]))

    def stored_values(self, reps):
        from ..search import to_csr  # numba

        return np.diff(to_csr(reps).indptr)

    def query_stats(self, queries) -> dict[str, float]:
        from ..search import to_csr  # numba

        m = to_csr(queries)
        return {"query_nnz": m.nnz / max(m.shape[0], 1)}

    def host_scores(self, queries: Any, docs: Any) -> np.ndarray:
        product = queries @ docs.T
        return np.asarray(product.toarray() if sparse.issparse(product) else product, dtype=np.float64)


def nonzeros(reps: torch.Tensor) -> float:
    """Mean non-zero terms a representation has."""
    return float((reps > 0).sum(dim=-1).float().mean())


def batch_csr(reps: torch.Tensor, max_terms: int | None = None) -> sparse.csr_matrix:
    """A batch's sparse reps as CSR, made on their device: only the non-zeros cross to host memory (a
    (256, 128,256) fp32 batch is 131 MB dense, ~0.2 MB as CSR at 200 terms a document). With
    `max_terms`, each row keeps its `max_terms` largest weights (the rest set to zero) first."""
    import torch

    if max_terms is not None and reps.shape[1] > max_terms:
        top = reps.topk(int(max_terms), dim=1)
        reps = torch.zeros_like(reps).scatter_(1, top.indices, top.values)
    m = reps.to_sparse_csr()
    return sparse.csr_matrix((m.values().cpu().numpy(), m.col_indices().cpu().numpy(), m.crow_indices().cpu().numpy()),
                             shape=tuple(reps.shape))
