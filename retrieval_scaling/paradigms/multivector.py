"""Multi-vector late interaction (ColBERT-style): every token's hidden state projected to `dim` values and
L2-normalised; a query scores a passage by the sum, over its tokens, of each one's best match among the
passage's tokens (MaxSim). Stored as one vector per token; searched exactly, by brute force, for corpora
within `max_corpus_gb`. Torch is imported where it is used: the planner prices this class without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..store_format import KEY_BYTES, narrowed, store_dtype
from .base import FP32, HeadMemory, Paradigm, on_device_bytes

if TYPE_CHECKING:
    from torch import nn

    from ..encoders import MultiVectorEncoder

SIMILARITY_ELEMENTS = 2**26  # token similarities a search builds at once: 256 MB in float32


class MultiVector(Paradigm):
    """`dim`: each token vector's width after the projection; `max_corpus_gb`: the largest corpus, as stored
    token vectors, that the exact search takes (beyond it, one error says so)."""

    name = "multivector"

    def __init__(self, name: str | None = None, temperature: float = 1.0, dim: int = 128,
                 max_corpus_gb: float = 64.0):
        super().__init__(name, temperature)
        self.dim, self.max_corpus_gb = int(dim), float(max_corpus_gb)

    def encoder(self, backbone: nn.Module) -> MultiVectorEncoder:
        from ..encoders import MultiVectorEncoder  # torch

        return MultiVectorEncoder(backbone, self.dim, self)

    def scores(self, q, p):
        """(queries, passages): Σ over each query token of its best dot product among the passage's real
        tokens. Padding tokens are zero vectors: a query's add nothing; a passage's are never a match, as
        the search, which stores real tokens only, scores them."""
        sim = (q.flatten(0, 1) @ p.flatten(0, 1).T).view(q.shape[0], q.shape[1], p.shape[0], p.shape[1])
        return sim.masked_fill(padding(p), float("-inf")).amax(-1).sum(1)

    def own_scores(self, q, p, group):
        import torch  # here: the planner imports paradigms without torch

        grouped = p.view(q.shape[0], group, p.shape[1], p.shape[2])
        sim = torch.einsum("bid,bgjd->bgij", q, grouped)
        return sim.masked_fill(padding(grouped).unsqueeze(2), float("-inf")).amax(-1).sum(-1)

    # ---- what it costs ----

    def head_flops(self, arch, tokens, train_embeddings):
        """The projection over every position: forward, activation gradient and weight gradient."""
        return {**super().head_flops(arch, tokens, train_embeddings),
                "projection": 6 * tokens * arch.hidden_size * self.dim}

    def pair_width(self, arch, query_len, passage_len):
        return query_len * passage_len * self.dim

    def encoding_flops_per_token(self, arch):
        return 2 * arch.hidden_size * self.dim

    def rep_width(self, arch, length):
        return length * self.dim

    def training_head(self, arch, shape, prec, head_trainable):
        """The token similarities the loss builds over the gathered batch (every query against every passage
        for an in-batch loss, else against its own), their copy with padding masked (kept by the max for its
        backward), and their gradient."""
        queries, passages = shape.queries * shape.world, shape.passages * shape.world
        pairs = queries * passages if shape.in_batch else passages
        return HeadMemory(scores=3.0 * FP32 * pairs * shape.query_len * shape.passage_len)

    def encoding_buffers(self, arch, batch, length, compute_bytes):
        """The projected tokens and their normalised copy, in float32."""
        return {"token_vectors": float(2 * FP32 * batch * length * self.dim)}

    def search_buffers(self, arch, eval_cfg, shard, block):
        """The shard's token vectors (stored, and widened to float32), one chunk of token similarities and
        its per-document maxima, and a block of queries' scores against the shard."""
        tokens = shard * int(eval_cfg.get("passage_max_len") or 0)
        return {"search_shard": float(tokens * self.dim * on_device_bytes(eval_cfg)),
                "search_scores": float(2 * FP32 * SIMILARITY_ELEMENTS + FP32 * block * shard)}

    # ---- stored and searched ----

    def check_corpus(self, label, documents, tokens):
        size = documents * tokens * self.dim * 2  # float16 token vectors
        if size > self.max_corpus_gb * 1e9:
            raise ConfigError(
                f"{label}: {documents} documents × {tokens:.0f} tokens × {self.dim} dims take {size / 1e9:.1f} GB "
                f"as token vectors, beyond paradigm.max_corpus_gb={self.max_corpus_gb:g}: the multivector "
                "paradigm searches exactly, by brute force, only within that bound; evaluate on smaller "
                "collections or raise paradigm.max_corpus_gb")

    def doc_bytes(self, arch, eval_cfg, mean_tokens, step0=False):
        """Its key, its token vectors in `eval.store_dtype`, and its offset."""
        return int(KEY_BYTES + mean_tokens * self.dim * np.dtype(store_dtype(eval_cfg)).itemsize + 8)

    def to_host(self, reps, max_terms=None):
        """The real tokens' vectors (`padding`)."""
        real = ~padding(reps)
        offsets = np.concatenate([[0], np.cumsum(real.sum(1).cpu().numpy())])
        return TokenVectors(reps[real].float().cpu().numpy(), offsets.astype(np.int64))

    def join(self, chunks: Sequence[TokenVectors], order: np.ndarray) -> TokenVectors:
        ends = np.cumsum([0, *(c.vectors.shape[0] for c in chunks)])[:-1]
        offsets = np.concatenate([[0], *(c.offsets[1:] + end for c, end in zip(chunks, ends, strict=True))])
        return self.take(TokenVectors(np.concatenate([c.vectors for c in chunks]), offsets), order)

    def take(self, reps: TokenVectors, rows: np.ndarray) -> TokenVectors:
        lengths = np.diff(reps.offsets)[rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        index = np.repeat(reps.offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return TokenVectors(reps.vectors[index], offsets)

    def shard_arrays(self, reps, dtype):
        return {"vectors": np.ascontiguousarray(narrowed(reps.vectors, dtype)), "offsets": reps.offsets}

    def from_arrays(self, arrays):
        return TokenVectors(arrays["vectors"], arrays["offsets"])

    def searcher(self, where, device="cpu"):
        """Brute-force MaxSim with torch: on the host's CPU, or on the cell's device (`eval.search`)."""
        chosen = super().searcher(where, device)
        return MaxSimSearch(getattr(chosen, "device", "cpu"))

    def host_scores(self, queries: TokenVectors, docs: TokenVectors) -> np.ndarray:
        out = np.empty((queries.shape[0], docs.shape[0]))
        vectors = docs.vectors.astype(np.float64)
        for i in range(queries.shape[0]):
            sim = queries.vectors[queries.offsets[i]:queries.offsets[i + 1]].astype(np.float64) @ vectors.T
            out[i] = np.maximum.reduceat(sim, docs.offsets[:-1], axis=1).sum(0)
        return out


def padding(reps):
    """Which token positions of (texts, tokens, dim) representations are padding: their vectors are exactly
    zero, a normalised real token's never is."""
    return reps.abs().amax(-1) == 0


@dataclass
class TokenVectors:
    """Texts as token vectors on the host: text i's are `vectors[offsets[i]:offsets[i + 1]]`."""

    vectors: np.ndarray  # (tokens, dim)
    offsets: np.ndarray  # (texts + 1,), int64

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.offsets) - 1, self.vectors.shape[1]


class MaxSimSearch:
    """Exact MaxSim top-k of one shard with torch on `device`: a shard's token vectors moved there once
    (`index`), queries' tokens against them a chunk at a time, each document's best match per query
    token taken by a scatter, summed over the query's tokens, then `torch_top_k` (ties by lower index)."""

    def __init__(self, device: Any):
        import torch

        self.device = torch.device(device)

    def prepare(self, queries: TokenVectors):
        """Queries as one (queries, longest, dim) float32 tensor, zero-padded: a zero token adds 0."""
        import torch

        lengths = np.diff(queries.offsets)
        padded = np.zeros((queries.shape[0], max(int(lengths.max(initial=0)), 1), queries.shape[1]), np.float32)
        rows = np.repeat(np.arange(len(lengths)), lengths)
        padded[rows, np.arange(len(rows)) - queries.offsets[rows]] = queries.vectors
        return torch.as_tensor(padded).to(self.device)

    def index(self, reps: TokenVectors):
        import torch

        owner = np.repeat(np.arange(reps.shape[0]), np.diff(reps.offsets))
        return (torch.as_tensor(np.ascontiguousarray(reps.vectors)).to(self.device).float(),
                torch.as_tensor(owner).to(self.device), reps.shape[0])

    def top_k(self, queries, docs, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from ..shard_search import full_precision_matmul, torch_top_k

        vectors, owner, n_docs = docs
        n_q, length = queries.shape[0], queries.shape[1]
        block = max(1, SIMILARITY_ELEMENTS // max(1, length * n_docs))  # queries whose (tokens, docs) maxima fit
        out_s, out_i = np.empty((n_q, min(k, n_docs)), np.float32), np.empty((n_q, min(k, n_docs)), np.int64)
        for lo in range(0, n_q, block):
            q = queries[lo:lo + block].flatten(0, 1)
            best = torch.full((q.shape[0], n_docs), -torch.inf, device=self.device)
            step = max(1, SIMILARITY_ELEMENTS // q.shape[0])  # the shard's tokens a chunk at a time
            for t in range(0, vectors.shape[0], step):
                sim = full_precision_matmul(q, vectors[t:t + step].T)
                best.scatter_reduce_(1, owner[t:t + step].expand(q.shape[0], -1), sim, reduce="amax")
            s, i = torch_top_k(best.view(-1, length, n_docs).sum(1), k)
            out_s[lo:lo + block], out_i[lo:lo + block] = s.cpu().numpy(), i.cpu().numpy()
        return out_s, out_i
