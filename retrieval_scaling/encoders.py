"""Lion-DS (dense), Lion-SP (sparse) and multi-vector encoders over a decoder-only backbone.

One base class owns input handling (left padding, position ids); subclasses override only `pool`,
how a sequence of hidden states becomes its representation.
"""

from __future__ import annotations

import torch
from torch import nn


def encode_inputs(token_ids: list[list[int]], bos_id: int, pad_id: int, max_len: int,
                  pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + tokens (truncated to max_len in all), left-padded with `pad_id` to `pad_to` (default:
    the longest sequence). Returns (input_ids, attention_mask), both (N, L) int64."""
    seqs = [[bos_id, *ids[: max_len - 1]] for ids in token_ids]
    width = pad_to if pad_to is not None else max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return input_ids, mask


def position_ids_for(mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token, so left padding does not shift them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class Encoder(nn.Module):
    """A backbone (`*ForCausalLM`, possibly LoRA-wrapped) plus a pooling head; `paradigm` (a
    `paradigms.Paradigm`) says what its representations are and how they are kept and searched."""

    # A gradient-cached step's pooling results, kept from its first encoding for its second (a list,
    # filled then consumed in order; None outside such a step). Only pooling that can reuse them does.
    pooling_cache: list | None = None

    def __init__(self, backbone: nn.Module, paradigm=None):
        super().__init__()
        self.backbone, self.paradigm = backbone, paradigm

    def hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        decoder = self.backbone.get_decoder()
        out = decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_for(mask))
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.pool(self.hidden_states(input_ids, mask), mask)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DenseEncoder(Encoder):
    """Lion-DS: L2-normalise every token's hidden state, then mean over non-pad tokens (BOS
    included), without re-normalising the mean."""

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return dense_pool(hidden, mask)


class SparseEncoder(Encoder):
    """Lion-SP: LM-head logits scaled by d^-1/4, max over non-pad positions, then log(1 + ReLU)."""

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        head = self.backbone.get_output_embeddings()
        if torch.is_grad_enabled() or self.training:  # training: also a gradient-cached step's first encoding
            if weight_usable_directly(head):
                cache = self.pooling_cache
                if cache is not None and not torch.is_grad_enabled():  # a gradient-cached step's first encoding
                    pooled, argmax = max_pool_logits(hidden, head.weight, mask)
                    cache.append((pooled, argmax))
                else:  # its second encoding reuses the first's logits' max: the head's forward is not run again
                    pooled = MaxPooledLogits.apply(hidden, head.weight, mask, cache.pop(0) if cache else None)
                return sparse_activation(pooled if head.bias is None else pooled + head.bias, hidden.shape[-1])
            return sparse_pool(head(hidden), mask, hidden.shape[-1])  # keeps the logits for autograd
        # Inference: one sequence's real tokens at a time, so the (N, L, V) logits are never built
        # (8.6 GB in bf16 for 256 × 128 tokens over Llama-3's vocabulary) and each (L, V) block stays
        # in cache (tiny_s's head + pooling 2.9× faster on one core). Every sequence has its BOS.
        if not weight_usable_directly(head):
            pooled = torch.stack([head(h[m.bool()]).amax(dim=0) for h, m in zip(hidden, mask, strict=True)])
            return sparse_activation(pooled, hidden.shape[-1])
        return sparse_activation(pooled_logits_inference(hidden, mask, head.weight, head.bias), hidden.shape[-1])


class MultiVectorEncoder(Encoder):
    """Every token's hidden state through a trained projection to `dim` values, L2-normalised; padding
    positions zero (ColBERT's token vectors)."""

    def __init__(self, backbone: nn.Module, dim: int, paradigm=None):
        super().__init__(backbone, paradigm)
        self.projection = nn.Linear(backbone.config.hidden_size, dim, bias=False)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        projected = self.projection(hidden.to(self.projection.weight.dtype))  # bf16 backbones, fp32 projection
        vectors = nn.functional.normalize(projected.float(), p=2, dim=-1)
        return vectors * mask.unsqueeze(-1).to(vectors.dtype)


@torch.no_grad()
def pooled_logits_inference(hidden: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """max over each sequence's real positions of `hidden @ weight.T (+ bias)`: (N, L, d) → (N, V), one
    sequence at a time into one (L, V) buffer per batch: a fresh (L, V) block per sequence (tens of MB at
    Llama-3's vocabulary) leaves a CPU allocator holding gigabytes it has freed, growing with the corpus."""
    dtype = weight.dtype
    buf = torch.empty((hidden.shape[1], weight.shape[0]), dtype=dtype, device=hidden.device)
    pooled = torch.empty((hidden.shape[0], weight.shape[0]), dtype=dtype, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for row, (h, m) in enumerate(zip(hidden, mask, strict=True)):
            x = h[m.bool()].to(dtype)
            out = buf[:len(x)]
            if bias is None:
                torch.matmul(x, weight.T, out=out)
            else:
                torch.addmm(bias.to(dtype), x, weight.T, out=out)
            torch.amax(out, dim=0, out=pooled[row])
    return pooled


def weight_usable_directly(head: nn.Module) -> bool:
    """Whether a head's `weight` may be used outside the module's own forward: a plain linear, not one
    ZeRO-3 partitions (its weight is gathered only inside that forward) nor a wrapped one."""
    return type(head) is nn.Linear and not hasattr(head.weight, "ds_id")


POOL_CHUNK_ELEMENTS = 2**26  # logits built at once by the training pooling: ~128 MB in bf16, whatever the batch


def pool_chunk_rows(length: int, vocab: int) -> int:
    """Sequences whose (L, V) logits the training pooling builds at once."""
    return max(1, POOL_CHUNK_ELEMENTS // max(1, length * vocab))


class MaxPooledLogits(torch.autograd.Function):
    """max over non-pad positions of `hidden @ weight.T`: (N, L, d), (V, d), (N, L) → (N, V).

    The same values and gradients as `sparse_pool(head(hidden), mask, …)`'s max, without keeping the
    (N, L, V) logits for autograd or differentiating `masked_fill` and `amax` through them (five passes
    over a tensor of N·L·V; tiny_s's sparse CL step spends 70 % of its time there). The logits are
    built in chunks of sequences (`pool_chunk_rows`: no (N, L, V) tensor is ever whole, forward or
    backward), under the caller's autocast as `head` would compute them, and the argmax positions
    kept; the backward routes each term's gradient to its argmax position in a zero chunk of logits
    and multiplies it out. On an exact tie between positions the gradient goes to one of them (`amax`
    splits it), another subgradient of the same max."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                cached: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        # `cached`: (pooled, argmax) that `max_pool_logits` gave for these same hidden states
        pooled, argmax = max_pool_logits(hidden, weight, mask) if cached is None else (cached[0].clone(), cached[1])
        ctx.compute_dtype = pooled.dtype
        ctx.save_for_backward(hidden, weight, argmax)
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled: torch.Tensor):
        hidden, weight, argmax = ctx.saved_tensors
        dtype = ctx.compute_dtype
        length, vocab = hidden.shape[1], weight.shape[0]
        rows = pool_chunk_rows(length, vocab)
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=dtype) if ctx.needs_input_grad[1] else None
        grad_logits = torch.zeros((min(rows, hidden.shape[0]), length, vocab), dtype=dtype, device=hidden.device)
        for lo in range(0, hidden.shape[0], rows):
            h, top, g = hidden[lo:lo + rows], argmax[lo:lo + rows], grad_pooled[lo:lo + rows]
            n = h.shape[0]
            chunk = grad_logits[:n]
            chunk.zero_()
            # Flat positions (row, argmax, term) written directly: `scatter_` along dim 1 copies the whole
            # chunk twice on CPU (4× slower here).
            flat = (torch.arange(n, device=h.device).unsqueeze(1) * length + top) * vocab + torch.arange(
                vocab, device=h.device)
            chunk.view(-1)[flat.view(-1)] = g.reshape(-1).to(dtype)
            if grad_hidden is not None:
                grad_hidden[lo:lo + n] = (chunk @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += chunk.flatten(0, 1).T @ h.flatten(0, 1).to(dtype)
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def max_pool_logits(hidden: torch.Tensor, weight: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max over non-pad positions of `hidden @ weight.T`, its positions): (N, V) each, the logits built a
    chunk of sequences at a time, under the caller's autocast."""
    rows = pool_chunk_rows(hidden.shape[1], weight.shape[0])
    pooled, argmax = [], []
    for h, m in zip(hidden.split(rows), mask.split(rows), strict=True):
        logits = nn.functional.linear(h, weight)
        if not bool(m.all()):
            logits.masked_fill_(m.unsqueeze(-1) == 0, torch.finfo(logits.dtype).min)
        values, positions = logits.max(dim=1)
        pooled.append(values)
        argmax.append(positions.to(torch.int32))  # positions within a sequence: int32 halves what is kept
        del logits
    return torch.cat(pooled), torch.cat(argmax)


def dense_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    normed = nn.functional.normalize(hidden, p=2, dim=-1)
    return (normed * m).sum(1) / m.sum(1).clamp(min=1)


def sparse_pool(logits: torch.Tensor, mask: torch.Tensor, hidden_size: int) -> torch.Tensor:
    # log1p∘relu is monotone and the d^-1/4 scale positive, so max-pooling the raw logits first and
    # transforming only the (N, V) result is exact, and touches the (N, L, V) logits twice, not five times.
    if bool(mask.all()):  # no padding: skip the mask pass
        pooled = logits.amax(dim=1)
    else:
        floor = torch.finfo(logits.dtype).min
        pooled = logits.masked_fill(mask.unsqueeze(-1) == 0, floor).amax(dim=1)
    return sparse_activation(pooled, hidden_size)


def sparse_activation(pooled_logits: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """Term weights from max-pooled logits: log(1 + ReLU(logit · d^-1/4)), in fp32."""
    return torch.log1p(torch.relu(pooled_logits.float() * hidden_size**-0.25))

