"""Measure one real training step's FLOPs with torch.utils.flop_counter, to validate flops.py.

The step is the cell's: a randomly initialised backbone of the cell's architecture (FLOPs depend on
shapes, not weights), its LoRA and trainable embeddings, the paradigm's head, the loss and the FLOPS
term, forward and backward — everything but the optimizer update (element-wise, not counted).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class RandomStep:
    """One training step of a cell on a randomly initialised backbone of its architecture (FLOPs and
    time depend on shapes, not weights): encoder with its LoRA, trainable embeddings and head, the
    loss with the FLOPS term, and a fixed random batch at the given shapes (default: the cell's)."""

    def __init__(self, cfg: Mapping[str, Any], queries: int | None = None, passages_per_query: int | None = None,
                 query_len: int | None = None, passage_len: int | None = None, attn_implementation: str = "eager"):
        from hydra.utils import instantiate
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        from .backbone import (
            architecture,
            decoder_config,
            enable_gradient_checkpointing,
            lora_config,
            set_bidirectional,
        )
        from .paradigms import paradigm_of
        from .train import StepLoss

        model_cfg, train = cfg["model"], cfg["train"]
        self.arch = architecture(model_cfg)
        self.queries = queries or int(train["queries_per_step"])
        self.group = passages_per_query or int(train["passages_per_query"])
        self.query_len = query_len or int(cfg["data"]["query_max_len"])
        self.passage_len = passage_len or int(cfg["data"]["passage_max_len"])
        torch.manual_seed(0)
        backbone = AutoModelForCausalLM.from_config(decoder_config(self.arch, attn_implementation=attn_implementation))
        set_bidirectional(backbone, bool(model_cfg.get("bidirectional", False)))
        backbone = get_peft_model(backbone, lora_config(model_cfg))
        if model_cfg.get("train_embeddings"):
            backbone.get_input_embeddings().weight.requires_grad_(True)
        if train.get("gradient_checkpointing"):
            enable_gradient_checkpointing(backbone)
        self.encoder = paradigm_of(cfg["paradigm"]).encoder(backbone).train()
        # at its last step: the regulariser (if any) at full weight
        self.step_loss = StepLoss(instantiate({k: v for k, v in cfg["loss"].items() if k != "name"}), self.group,
                                  self.encoder.paradigm, steps=1)
        self.q_ids = torch.randint(2, self.arch.vocab_size, (self.queries, self.query_len))
        self.p_ids = torch.randint(2, self.arch.vocab_size, (self.queries * self.group, self.passage_len))
        self.teacher = torch.randn(self.queries, self.group)

    def loss(self, model=None) -> torch.Tensor:
        """Forward pass and loss through `model` (default: the encoder; e.g. a DeepSpeed engine)."""
        model = model or self.encoder
        q = model(self.q_ids, torch.ones_like(self.q_ids)).float()
        p = model(self.p_ids, torch.ones_like(self.p_ids)).float()
        return self.step_loss(q, p, self.teacher, step=1)[0]


def measured_step_flops(cfg: Mapping[str, Any], queries: int | None = None, passages_per_query: int | None = None,
                        query_len: int | None = None, passage_len: int | None = None) -> tuple[int, dict[str, int]]:
    """(FLOPs counted by torch for one step of this cell, per-op counts). The shapes default to the
    cell's; smaller ones keep a big model's check fast (the FLOP model takes the same shapes)."""
    from torch.utils.flop_counter import FlopCounterMode

    # eager attention: the counter does not see CPU sdpa kernels
    step = RandomStep(cfg, queries, passages_per_query, query_len, passage_len, attn_implementation="eager")
    counter = FlopCounterMode(display=False)
    with counter:
        step.loss().backward()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), per_op
