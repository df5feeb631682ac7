"""Micro-batches with the whole batch's loss: gradient caching (as Tevatron's GradCache).

A rank's share of a step is encoded `train.micro_batch` sequences at a time, first without a graph;
the loss and its gradient with respect to the representations are taken over all of them, so every
in-batch and gathered negative stays; then each micro-batch is encoded again with its graph and
back-propagated with its cached gradient, DeepSpeed accumulating over the step's backward passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .batch import Batch
from .distributed import gather_rows
from .errors import ConfigError


@dataclass(frozen=True)
class MicroBatches:
    """How a rank's share of a step is encoded: `size` sequences per forward (queries and passages
    alike), `whole` when the share goes through at once, and the backward passes an optimizer step takes."""

    size: int
    whole: bool
    backward_passes: int

    @classmethod
    def of(cls, micro_batch: int | None, queries: int, passages: int) -> MicroBatches:
        if micro_batch is None or int(micro_batch) >= max(queries, passages):
            return cls(queries, True, 1)
        size = int(micro_batch)
        if size < 1:
            raise ConfigError(f"train.micro_batch={micro_batch}: give a positive number of sequences per forward "
                              "pass, or null for the whole share of the step at once")
        return cls(size, False, -(-queries // size) + -(-passages // size))


LossOf = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]  # gathered (q, p) → (loss, parts)


def optimizer_step(engine, local: Batch, micro: MicroBatches, bf16: bool, loss_of: LossOf):
    """One optimizer step over this rank's share of the batch, whole or in micro-batches; the loss is
    over every rank's reps. Returns (q, p, loss, parts): the gathered reps and the loss, detached."""
    if not micro.whole:
        return gradient_cached_step(engine, local, micro.size, bf16, loss_of)
    device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        q = engine(local.query_ids, local.query_mask).float()
        p = engine(local.passage_ids, local.passage_mask).float()
    q, p = gather_rows(q), gather_rows(p)
    loss, parts = loss_of(q, p)
    engine.backward(loss)
    engine.step()
    return q.detach(), p.detach(), loss.detach(), {k: v.detach() for k, v in parts.items()}


def gradient_cached_step(engine, local: Batch, size: int, bf16: bool, loss_of: LossOf):
    """One optimizer step over micro-batches of `size` sequences with the whole batch's loss (gradient
    caching, as Tevatron's GradCache): every rep is encoded without a graph, the loss and its gradient
    with respect to the reps are taken over all of them (every in-batch and gathered negative), then
    each micro-batch is encoded again with its graph and back-propagated with its cached gradient.
    The RNG is replayed per micro-batch, so dropout masks match between the two encodings, and a
    sparse head's max-pooled logits are kept from the first: the second runs no head forward.
    Returns (q, p, loss, parts): the gathered reps and the loss, detached."""
    device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
    pieces = [(ids, mask) for ids_all, mask_all in ((local.query_ids, local.query_mask),
                                                     (local.passage_ids, local.passage_mask))
              for ids, mask in zip(ids_all.split(size), mask_all.split(size), strict=True)]
    engine.module.pooling_cache = []  # the first encoding's pooling, reused by the second
    try:
        return _encode_twice(engine, pieces, -(-local.query_ids.shape[0] // size), size, bf16, loss_of, device)
    finally:
        engine.module.pooling_cache = None


def _encode_twice(engine, pieces: list, n_queries: int, size: int, bf16: bool, loss_of: LossOf, device):
    """`gradient_cached_step`'s two encodings of `pieces` (the query micro-batches first)."""
    states, reps = [], []
    with torch.no_grad():
        for ids, mask in pieces:
            states.append(rng_state(device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                reps.append(engine(ids, mask).float())
    after = rng_state(device)
    q_local = torch.cat(reps[:n_queries]).requires_grad_()
    p_local = torch.cat(reps[n_queries:]).requires_grad_()
    del reps  # the pieces, copied whole: at 128k terms each rep is 0.5 MB, kept twice otherwise
    q, p = gather_rows(q_local), gather_rows(p_local)
    loss, parts = loss_of(q, p)
    loss.backward()  # the loss's gradient with respect to this rank's reps; no parameter is in its graph
    grads = [*q_local.grad.split(size), *p_local.grad.split(size)]
    for (ids, mask), state, grad in zip(pieces, states, grads, strict=True):
        set_rng_state(device, state)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            rep = engine(ids, mask).float()
        # d(rep · grad)/dθ = grad · d rep/dθ: this micro-batch's share of d loss/dθ, summed over the step
        engine.backward((rep * grad).sum(), scale_wrt_gas=False)
        engine.step()  # DeepSpeed steps the optimizer at the last backward pass of the step
    set_rng_state(device, after)
    return q.detach(), p.detach(), loss.detach(), {k: v.detach() for k, v in parts.items()}


def rng_state(device: torch.device) -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
