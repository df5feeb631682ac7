"""What a cell costs, from its config alone (no weights, no network): parameters, FLOPs, steps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .backbone import architecture
from .errors import ConfigError
from .flops import CONVENTION, StepShape, step_flops
from .identity import cell_id


def loss_in_batch(loss_cfg: Mapping[str, Any]) -> bool:
    from hydra.utils import get_class

    try:
        return bool(get_class(loss_cfg["_target_"]).in_batch)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"loss '{loss_cfg.get('name')}': cannot load {loss_cfg.get('_target_')} ({exc})") from None


def step_shape(cfg: Mapping[str, Any]) -> StepShape:
    train, data = cfg["train"], cfg["data"]
    return StepShape(
        queries=int(train["queries_per_step"]), passages_per_query=int(train["passages_per_query"]),
        query_len=int(data["query_max_len"]), passage_len=int(data["passage_max_len"]),
        sparse=cfg["paradigm"]["name"] == "sparse", in_batch=loss_in_batch(cfg["loss"]),
    )


def plan_cell(cfg: Mapping[str, Any]) -> dict[str, Any]:
    model = cfg["model"]
    arch = architecture(model)
    lora = model["lora"]
    targets = tuple(lora["targets"])
    shape = step_shape(cfg)
    train_emb = bool(model.get("train_embeddings", False))
    terms = step_flops(arch, shape, int(lora["r"]), targets, train_emb)
    per_step = terms["total"]
    budget = float(cfg["budget"]["flops"])
    steps = math.floor(budget / per_step)
    lora_params = arch.num_hidden_layers * arch.lora_params_per_layer(int(lora["r"]), targets)
    trainable = lora_params + (arch.vocab_size * arch.hidden_size if train_emb else 0)
    return {
        "cell_id": cell_id(cfg), "model": model["name"], "paradigm": cfg["paradigm"]["name"],
        "loss": cfg["loss"]["name"], "params_total": arch.params_total() + lora_params,
        "params_trainable": trainable, "params_non_embedding": arch.params_non_embedding(),
        "queries_per_step": shape.queries, "passages_per_query": shape.passages_per_query,
        "query_len": shape.query_len, "passage_len": shape.passage_len,
        "tokens_per_step": shape.tokens, "flops_per_step": per_step, "steps": steps,
        "tokens": steps * shape.tokens, "flops_total": steps * per_step, "flops_budget": budget,
        "flops_terms": terms, "flops_convention": CONVENTION,
    }


def check_budget(plans: Sequence[Mapping[str, Any]]) -> None:
    """Every cell must afford at least one optimizer step."""
    short = [p for p in plans if p["steps"] < 1]
    if short:
        worst = max(p["flops_per_step"] for p in short)
        names = ", ".join(f"{p['model']}/{p['paradigm']}/{p['loss']} ({p['flops_per_step']:.3g})" for p in short)
        raise ConfigError(
            f"budget.flops={short[0]['flops_budget']:.3g} is smaller than one optimizer step of: {names} "
            f"FLOPs per step. Raise budget.flops to at least {worst:.3g}."
        )
