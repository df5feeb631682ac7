"""Lion-DS: one vector per text, the mean of its L2-normalised token states, scored by a dot product."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Paradigm

if TYPE_CHECKING:
    from torch import nn

    from ..encoders import DenseEncoder


class Dense(Paradigm):
    """The base class's single vector, pooled by `encoders.DenseEncoder`."""

    name = "dense"

    def encoder(self, backbone: nn.Module) -> DenseEncoder:
        from ..encoders import DenseEncoder  # torch

        return DenseEncoder(backbone, self)
