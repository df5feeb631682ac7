"""One step's batch: every query and its group of passages, as token ids, and the teacher's scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    passage_ids: torch.Tensor  # (B·G, L), positive first in each group
    passage_mask: torch.Tensor
    teacher: torch.Tensor  # (B, G)
