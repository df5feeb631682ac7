"""The paper's training objectives as interchangeable strategies.

Shapes: `q` is (B, D) query reps, `p` is (B·G, D) passage reps grouped per query with the positive
first, `teacher` is (B, G) teacher scores of each query's own passages. `temperature` divides student
scores (the paper: 0.01 for dense, 1 for sparse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    total: torch.Tensor
    parts: dict[str, torch.Tensor]


def own_scores(q: torch.Tensor, p: torch.Tensor, group: int) -> torch.Tensor:
    """(B, G): each query against its own G passages."""
    return torch.einsum("bd,bgd->bg", q, p.view(q.shape[0], group, -1))


def in_batch_cross_entropy(q: torch.Tensor, p: torch.Tensor, group: int, temperature: float) -> torch.Tensor:
    """InfoNCE over every passage of the batch; the positive of query i sits at column i·G."""
    scores = q @ p.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) * group
    return F.cross_entropy(scores, labels)


def teacher_kl(student: torch.Tensor, teacher: torch.Tensor, teacher_temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher/τ) ‖ softmax(student)) averaged over queries."""
    target = F.softmax(teacher / teacher_temperature, dim=-1)
    return F.kl_div(F.log_softmax(student, dim=-1), target, reduction="batchmean")


class ContrastiveLoss:
    """CL: cross-entropy over the positive, the query's hard negatives and all in-batch passages."""

    name = "cl"
    in_batch = True
    needs_teacher = False

    def __call__(self, q, p, teacher, group: int, temperature: float) -> LossOutput:
        ce = in_batch_cross_entropy(q, p, group, temperature)
        return LossOutput(ce, {"ce": ce})


class MarginMSELoss:
    """KD: MSE between the student's and the teacher's positive–negative margins (one negative)."""

    name = "kd"
    in_batch = False
    needs_teacher = True

    def __call__(self, q, p, teacher, group: int, temperature: float) -> LossOutput:
        if group != 2:
            raise ValueError(f"MarginMSE compares one positive with one negative (group 2), got {group}")
        s = own_scores(q, p, group) / temperature
        mse = F.mse_loss(s[:, 0] - s[:, 1], teacher[:, 0] - teacher[:, 1])
        return LossOutput(mse, {"margin_mse": mse})


class KLDistillationLoss:
    """KD variant: KL between teacher and student distributions over the query's own passages."""

    name = "kl"
    in_batch = False
    needs_teacher = True

    def __init__(self, teacher_temperature: float = 1.0):
        self.teacher_temperature = teacher_temperature

    def __call__(self, q, p, teacher, group: int, temperature: float) -> LossOutput:
        kl = teacher_kl(own_scores(q, p, group) / temperature, teacher, self.teacher_temperature)
        return LossOutput(kl, {"kl": kl})


class ContrastiveDistillationLoss:
    """CL+KD: w_ce·in-batch CE + w_kl·KL(teacher ‖ student) over the query's own passages."""

    name = "cl_kd"
    in_batch = True
    needs_teacher = True

    def __init__(self, ce_weight: float = 0.5, kl_weight: float = 0.5, teacher_temperature: float = 1.0):
        self.ce_weight, self.kl_weight = ce_weight, kl_weight
        self.teacher_temperature = teacher_temperature

    def __call__(self, q, p, teacher, group: int, temperature: float) -> LossOutput:
        ce = in_batch_cross_entropy(q, p, group, temperature)
        kl = teacher_kl(own_scores(q, p, group) / temperature, teacher, self.teacher_temperature)
        return LossOutput(self.ce_weight * ce + self.kl_weight * kl, {"ce": ce, "kl": kl})
