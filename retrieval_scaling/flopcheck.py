"""Measure one real training step's FLOPs with torch.utils.flop_counter, to validate flops.py.

The step is the cell's: a randomly initialised backbone of the cell's architecture (FLOPs depend on
shapes, not weights), its LoRA and trainable embeddings, the paradigm's head, the loss and the FLOPS
term, forward and backward — everything but the optimizer update (element-wise, not counted).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def measured_step_flops(cfg: Mapping[str, Any], queries: int | None = None, passages_per_query: int | None = None,
                        query_len: int | None = None, passage_len: int | None = None) -> tuple[int, dict[str, int]]:
    """(FLOPs counted by torch for one step of this cell, per-op counts). The shapes default to the
    cell's; smaller ones keep a big model's check fast (the FLOP model takes the same shapes)."""
    from hydra.utils import instantiate
    from peft import get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaForCausalLM

    from .backbone import architecture, enable_gradient_checkpointing, llama_config, lora_config, set_bidirectional
    from .encoders import build_encoder
    from .regularizers import flops_regularizer

    model_cfg, train = cfg["model"], cfg["train"]
    arch = architecture(model_cfg)
    b = queries or int(train["queries_per_step"])
    g = passages_per_query or int(train["passages_per_query"])
    lq = query_len or int(cfg["data"]["query_max_len"])
    lp = passage_len or int(cfg["data"]["passage_max_len"])
    torch.manual_seed(0)
    config = llama_config(arch, attn_implementation="eager")  # the counter does not see CPU sdpa kernels
    backbone = LlamaForCausalLM(config)
    set_bidirectional(backbone, bool(model_cfg.get("bidirectional", False)))
    backbone = get_peft_model(backbone, lora_config(model_cfg))
    if model_cfg.get("train_embeddings"):
        backbone.get_input_embeddings().weight.requires_grad_(True)
    if train.get("gradient_checkpointing"):
        enable_gradient_checkpointing(backbone)
    encoder = build_encoder(cfg["paradigm"]["name"], backbone).train()
    loss_fn = instantiate({k: v for k, v in cfg["loss"].items() if k != "name"})
    q_ids = torch.randint(2, arch.vocab_size, (b, lq))
    p_ids = torch.randint(2, arch.vocab_size, (b * g, lp))
    teacher = torch.randn(b, g)
    reg = cfg["paradigm"].get("flops")
    counter = FlopCounterMode(display=False)
    with counter:
        q = encoder(q_ids, torch.ones_like(q_ids))
        p = encoder(p_ids, torch.ones_like(p_ids))
        out = loss_fn(q, p, teacher, g, float(cfg["paradigm"]["temperature"]))
        loss = out.total
        if reg:
            loss = loss + float(reg["lambda_q"]) * flops_regularizer(q) + float(reg["lambda_d"]) * flops_regularizer(p)
        loss.backward()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), per_op
