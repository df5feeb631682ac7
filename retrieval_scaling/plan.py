"""What a cell costs, from its config alone (no weights, no network): parameters, FLOPs, steps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .backbone import architecture
from .errors import ConfigError
from .flops import CONVENTION, StepShape, step_flops
from .identity import cell_id
from .precision import check_settings


def loss_class(loss_cfg: Mapping[str, Any]) -> type:
    from hydra.utils import get_class

    try:
        return get_class(loss_cfg["_target_"])
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"loss '{loss_cfg.get('name')}': cannot load {loss_cfg.get('_target_')} ({exc})") from None


def taught_by(cfg: Mapping[str, Any]) -> str:
    """The teacher a cell's loss learns from; "none" for a loss that reads no teacher."""
    return cfg["data"]["teacher"]["name"] if loss_class(cfg["loss"]).needs_teacher else "none"


def step_shape(cfg: Mapping[str, Any]) -> StepShape:
    train, data = cfg["train"], cfg["data"]
    loss = loss_class(cfg["loss"])
    return StepShape(
        queries=int(train["queries_per_step"]), passages_per_query=int(train["passages_per_query"]),
        query_len=int(data["query_max_len"]), passage_len=int(data["passage_max_len"]),
        sparse=cfg["paradigm"]["name"] == "sparse", in_batch=bool(loss.in_batch),
        own_group=bool(loss.needs_teacher),
    )


def step_cost(cfg: Mapping[str, Any]) -> dict[str, int]:
    """The named FLOP terms of one optimizer step of this cell (flops.step_flops on its shapes)."""
    model = cfg["model"]
    lora = model["lora"]
    return step_flops(architecture(model), step_shape(cfg), int(lora["r"]), tuple(lora["targets"]),
                      bool(model.get("train_embeddings", False)),
                      bool(cfg["train"].get("gradient_checkpointing", False)))


def accelerators(cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(nodes, GPUs) a cell runs on: the SLURM launcher's resources for its model when they name GPUs,
    else the planner's assumption."""
    launcher, planner = cfg["launcher"], cfg["planner"]
    if launcher.get("name") == "slurm":
        from .slurm import resources_for

        res = resources_for(launcher, cfg["model"]["name"])
        if int(res.get("gpus_per_node") or 0) > 0:
            return int(res["nodes"]), int(res["nodes"]) * int(res["gpus_per_node"])
    gpus = int(planner["gpus_per_cell"])
    return max(1, math.ceil(gpus / int(planner["gpus_per_node"]))), gpus


def plan_cell(cfg: Mapping[str, Any]) -> dict[str, Any]:
    check_settings(cfg)  # precision: resolved where the cell runs, but a typo fails here
    model = cfg["model"]
    arch = architecture(model)
    lora = model["lora"]
    targets = tuple(lora["targets"])
    shape = step_shape(cfg)
    train_emb = bool(model.get("train_embeddings", False))
    terms = step_cost(cfg)
    per_step = terms["total"]
    budget = float(cfg["budget"]["flops"])
    steps = math.floor(budget / per_step)
    lora_params = arch.num_hidden_layers * arch.lora_params_per_layer(int(lora["r"]), targets)
    trainable = lora_params + (arch.vocab_size * arch.hidden_size if train_emb else 0)
    planner = cfg["planner"]
    nodes, gpus = accelerators(cfg)
    hardware_total = steps * terms["hardware_total"]
    gpu_hours = hardware_total / (float(planner["peak_flops"]) * float(planner["utilization"])) / 3600
    return {
        "cell_id": cell_id(cfg), "model": model["name"], "paradigm": cfg["paradigm"]["name"],
        "loss": cfg["loss"]["name"], "teacher": taught_by(cfg), "params_total": arch.params_total() + lora_params,
        "params_trainable": trainable, "params_non_embedding": arch.params_non_embedding(),
        "queries_per_step": shape.queries, "passages_per_query": shape.passages_per_query,
        "query_len": shape.query_len, "passage_len": shape.passage_len,
        "tokens_per_step": shape.tokens, "flops_per_step": per_step, "steps": steps,
        "tokens": steps * shape.tokens, "flops_total": steps * per_step, "flops_budget": budget,
        "budget_match": cfg["budget"].get("match"),
        "hardware_flops_per_step": terms["hardware_total"], "hardware_flops_total": hardware_total,
        "nodes": nodes, "gpus": gpus, "accelerator": planner["accelerator"], "gpu_hours": gpu_hours,
        "wall_hours": gpu_hours / gpus,
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
