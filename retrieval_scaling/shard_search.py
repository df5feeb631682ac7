"""Exact top-k of one corpus shard, on the host or on the cell's device: the two ways `encodings` searches.

- `HostSearch`: dense reps by a BLAS matrix product (`topk.dense_top_k`), sparse ones by the numba
  inverted index (`search.InvertedIndex`). What a CPU cell uses.
- `TorchSearch`: torch on a device (a GPU a cell holds anyway): dense scores by a matrix product of
  the shard moved to the device, sparse ones by a sparse CSR × dense product (queries densified a block
  at a time), then `torch_top_k`. It runs on a CPU device too, which is how it is tested here.

Both give brute force's hits: by score, ties by lower index, at the k-th place too. Stored vectors may
be 16-bit (`encodings`); both score them exactly as stored, in float32 against float32 queries.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import sparse

from .config_checks import CHOICES, check_choice
from .search import InvertedIndex, to_csr
from .topk import dense_top_k

QUERY_BLOCK = 256  # queries scored at once: a (block, shard documents) score matrix, ~0.2 GB at 200k


def torch_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row, best first, ties by lower column, on the scores' device. torch.topk finds
    each row's k-th score; every candidate at or above it is then ordered by (score, column) with two
    stable sorts, which torch.topk alone does not promise among tied scores."""
    n, k = scores.shape[0], min(k, scores.shape[1])
    if n == 0 or k == 0:
        return scores[:, :0], torch.zeros((n, 0), dtype=torch.int64, device=scores.device)
    kth = scores.topk(k, dim=1).values[:, -1:]
    rows, cols = (scores >= kth).nonzero(as_tuple=True)  # row-major: columns ascending within a row
    values = scores[rows, cols]
    order = torch.argsort(0.0 - values, stable=True)  # 0 - v: -0.0 and 0.0 sort as the equals they are
    order = order[torch.argsort(rows[order], stable=True)]
    counts = torch.bincount(rows, minlength=n)
    take = (torch.cumsum(counts, 0) - counts).unsqueeze(1) + torch.arange(k, device=scores.device)
    picked = order[take]
    return values[picked], cols[picked]


def full_precision_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 proper: never TF32's 10-bit inputs, which a process may have allowed for training
    and which would move scores enough to reorder near ties."""
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return a @ b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


class HostSearch:
    """Shards searched on the host: BLAS for dense reps, the inverted index for sparse ones. A shard is
    indexed once (`index`) for every query set searched over it (`top_k`)."""

    def prepare(self, queries):
        return to_csr(queries) if sparse.issparse(queries) else np.ascontiguousarray(queries, dtype=np.float32)

    def index(self, reps) -> InvertedIndex | np.ndarray:
        return InvertedIndex(reps) if sparse.issparse(reps) else np.asarray(reps, dtype=np.float32)

    def top_k(self, queries, docs: InvertedIndex | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(docs, InvertedIndex):
            return docs.search(queries, k)
        return dense_top_k(queries, docs, k)


class TorchSearch:
    """Shards searched with torch on `device`: a shard's reps moved there once (`index`) for every query
    set searched over it, its scores made there and cut to the top k there; only (queries, k) hits come
    back."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def prepare(self, queries):
        """Dense queries as one float32 tensor on the device; sparse ones stay CSR on the host and are
        densified a block at a time (at Llama-3's vocabulary a block is 0.13 GB, all of MS MARCO dev's
        queries 3.6 GB)."""
        if sparse.issparse(queries):
            return to_csr(queries)
        return torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)

    def top_k(self, queries, docs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        n_q = queries.shape[0]
        k = min(k, docs.shape[0])
        out_s = np.empty((n_q, k), dtype=np.float32)
        out_i = np.empty((n_q, k), dtype=np.int64)
        sparse_docs = docs.layout == torch.sparse_csr
        for lo in range(0, n_q, QUERY_BLOCK):
            block = queries[lo:lo + QUERY_BLOCK]
            if sparse_docs:
                dense_block = torch.as_tensor(block.toarray(), dtype=torch.float32).to(self.device)
                scores = torch.sparse.mm(docs, dense_block.T).T
            else:
                scores = full_precision_matmul(block, docs.T)
            s, i = torch_top_k(scores, k)
            out_s[lo:lo + QUERY_BLOCK], out_i[lo:lo + QUERY_BLOCK] = s.cpu().numpy(), i.cpu().numpy()
        return out_s, out_i

    def index(self, reps) -> torch.Tensor:
        """A shard's reps on the device in float32 (16-bit stores widened there: half the bytes cross)."""
        if sparse.issparse(reps):
            m = to_csr(reps)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": its product is what we use
                warnings.simplefilter("ignore", UserWarning)
                return torch.sparse_csr_tensor(torch.as_tensor(m.indptr.astype(np.int64)),
                                               torch.as_tensor(m.indices.astype(np.int64)), torch.as_tensor(m.data),
                                               size=m.shape, check_invariants=False).to(self.device)
        return torch.as_tensor(np.ascontiguousarray(reps)).to(self.device).float()


def shard_search(where: str, encoder_device: torch.device | str | None = None) -> HostSearch | TorchSearch:
    """`eval.search`: `auto` (torch on the encoder's device when that is an accelerator, else the host),
    `host`, or `torch` (torch on the encoder's device, a CPU too)."""
    device = torch.device(encoder_device or "cpu")
    check_choice("eval.search", where, CHOICES["eval.search"])
    if where == "host" or (where == "auto" and device.type == "cpu"):
        return HostSearch()
    return TorchSearch(device)
