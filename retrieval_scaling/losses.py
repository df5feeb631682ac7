"""The paper's training objectives as interchangeable strategies.

A loss reads the student's scores from `Scores`, which the cell's paradigm computes (`paradigms`):
every query against every passage of the batch (`in_batch`), or against its own G passages, the positive
first (`own`), both divided by the paradigm's temperature (the paper: 0.01 for dense, 1 for sparse).
`teacher` is (B, G) teacher scores of each query's own passages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    total: torch.Tensor
    parts: dict[str, torch.Tensor]


@dataclass
class Scores:
    """A step's student scores: `q` (B queries' reps) and `p` (B·G passages' reps, grouped per query) as
    `paradigm` scores them, over its temperature."""

    q: torch.Tensor
    p: torch.Tensor
    group: int
    paradigm: Any  # a paradigms.Paradigm

    @property
    def queries(self) -> int:
        return self.q.shape[0]

    def in_batch(self) -> torch.Tensor:
        """(B, B·G): every query against every passage of the batch."""
        return self.paradigm.scores(self.q, self.p) / self.paradigm.temperature

    def own(self) -> torch.Tensor:
        """(B, G): each query against its own G passages."""
        return self.paradigm.own_scores(self.q, self.p, self.group) / self.paradigm.temperature


def in_batch_cross_entropy(scores: Scores) -> torch.Tensor:
    """InfoNCE over every passage of the batch; the positive of query i sits at column i·G."""
    labels = torch.arange(scores.queries, device=scores.q.device) * scores.group
    return F.cross_entropy(scores.in_batch(), labels)


def teacher_kl(student: torch.Tensor, teacher: torch.Tensor, teacher_temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher/τ) ‖ softmax(student)) averaged over queries."""
    target = F.softmax(teacher / teacher_temperature, dim=-1)
    return F.kl_div(F.log_softmax(student, dim=-1), target, reduction="batchmean")


class ContrastiveLoss:
    """CL: cross-entropy over the positive, the query's hard negatives and all in-batch passages."""

    name = "cl"
    in_batch = True
    needs_teacher = False

    def __call__(self, scores: Scores, teacher) -> LossOutput:
        ce = in_batch_cross_entropy(scores)
        return LossOutput(ce, {"ce": ce})


class MarginMSELoss:
    """KD: MSE between the student's and the teacher's positive–negative margins (one negative)."""

    name = "kd"
    in_batch = False
    needs_teacher = True

    def __call__(self, scores: Scores, teacher) -> LossOutput:
        if scores.group != 2:
            raise ValueError(f"MarginMSE compares one positive with one negative (group 2), got {scores.group}")
        s = scores.own()
        mse = F.mse_loss(s[:, 0] - s[:, 1], teacher[:, 0] - teacher[:, 1])
        return LossOutput(mse, {"margin_mse": mse})


class KLDistillationLoss:
    """KD variant: KL between teacher and student distributions over the query's own passages."""

    name = "kl"
    in_batch = False
    needs_teacher = True

    def __init__(self, teacher_temperature: float = 1.0):
        self.teacher_temperature = teacher_temperature

    def __call__(self, scores: Scores, teacher) -> LossOutput:
        kl = teacher_kl(scores.own(), teacher, self.teacher_temperature)
        return LossOutput(kl, {"kl": kl})


class ContrastiveDistillationLoss:
    """CL+KD: w_ce·in-batch CE + w_kl·KL(teacher ‖ student) over the query's own passages."""

    name = "cl_kd"
    in_batch = True
    needs_teacher = True

    def __init__(self, ce_weight: float = 0.5, kl_weight: float = 0.5, teacher_temperature: float = 1.0):
        self.ce_weight, self.kl_weight = ce_weight, kl_weight
        self.teacher_temperature = teacher_temperature

    def __call__(self, scores: Scores, teacher) -> LossOutput:
        ce = in_batch_cross_entropy(scores)
        kl = teacher_kl(scores.own(), teacher, self.teacher_temperature)
        return LossOutput(self.ce_weight * ce + self.kl_weight * kl, {"ce": ce, "kl": kl})
