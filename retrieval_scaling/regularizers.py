"""The FLOPS regulariser of sparse retrievers (Paria et al. 2020), with the paper's quadratic warm-up."""

from __future__ import annotations

import torch


def flops_regularizer(reps: torch.Tensor) -> torch.Tensor:
    """Σ_v (mean over the batch of |w_v|)²: penalises terms that are active across many vectors.

    Averaging over the *local* batch keeps the term's scale independent of the world size (the
    paper's code applied it to rank-gathered reps, so its strength grew with the number of GPUs).
    """
    return (reps.abs().mean(dim=0) ** 2).sum()


def quadratic_warmup(weight: float, step: int, warmup_steps: int) -> float:
    """λ·(t/T)² for the first T optimizer steps, then λ. `step` counts optimizer steps (not micro-
    batches, which made the authors' ramp end early under gradient accumulation)."""
    if warmup_steps <= 0:
        return weight
    return weight * min(1.0, step / warmup_steps) ** 2
