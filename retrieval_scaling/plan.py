"""What a cell costs, from its config alone (no weights, no network): parameters, FLOPs, steps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .backbone import architecture, lora_params
from .errors import ConfigError
from .flops import CONVENTION, StepShape, step_flops
from .identity import cell_id
from .paradigms import paradigm_of
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
        in_batch=bool(loss.in_batch),
        own_group=bool(loss.needs_teacher),
    )


def step_cost(cfg: Mapping[str, Any]) -> dict[str, int]:
    """The named FLOP terms of one optimizer step of this cell (flops.step_flops on its shapes)."""
    model = cfg["model"]
    lora = model["lora"]
    return step_flops(architecture(model), step_shape(cfg), paradigm_of(cfg["paradigm"]), int(lora["r"]),
                      tuple(lora["targets"]),
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
    shape = step_shape(cfg)
    train_emb = bool(model.get("train_embeddings", False))
    terms = step_cost(cfg)
    per_step = terms["total"]
    budget = float(cfg["budget"]["flops"])
    steps = math.floor(budget / per_step)
    adapter = lora_params(model)
    trainable = adapter + (arch.vocab_size * arch.hidden_size if train_emb else 0)
    planner = cfg["planner"]
    nodes, gpus = accelerators(cfg)
    hardware_total = steps * terms["hardware_total"]
    gpu_hours = hardware_total / (float(planner["peak_flops"]) * float(planner["utilization"])) / 3600
    return {
        "cell_id": cell_id(cfg), "model": model["name"], "paradigm": cfg["paradigm"]["name"],
        "loss": cfg["loss"]["name"], "teacher": taught_by(cfg), "params_total": arch.params_total() + adapter,
        "params_trainable": trainable, "params_non_embedding": arch.params_non_embedding(),
        "queries_per_step": shape.queries, "passages_per_query": shape.passages_per_query,
        "query_len": shape.query_len, "passage_len": shape.passage_len,
        "tokens_per_step": shape.tokens, "flops_per_step": per_step, "steps": steps,
        "tokens": steps * shape.tokens, "flops_total": steps * per_step, "flops_budget": budget,
        "budget_match": cfg["budget"].get("match"),
        "hardware_flops_per_step": terms["hardware_total"], "hardware_flops_total": hardware_total,
        "nodes": nodes, "gpus": gpus, "accelerator": planner["accelerator"], "gpu_hours": gpu_hours,
        "wall_hours": gpu_hours / gpus,
        "flops_terms": terms, "flops_convention": CONVENTION, **memory_plan(cfg, gpus),
    }


def memory_plan(cfg: Mapping[str, Any], gpus: int) -> dict[str, Any]:
    """Each stage's estimated peak per GPU on the planner's GPUs (GB by term), the largest, and that peak
    with the planner's per-GPU overhead."""
    from .memory import Precision, evaluation_peak, gigabytes, mntp_peak, training_peak

    planner, model = cfg["planner"], cfg["model"]
    bf16 = bool(planner.get("bf16", True))
    weights = 2 if str(model.get("dtype") or "float32") in ("bfloat16", "float16") else 4
    eval_bf16 = bf16 and cfg["eval"].get("dtype") in ("auto", "bfloat16")  # inference weights: LoRA merged, cast
    train_prec = Precision(bf16 and cfg["train"].get("bf16") is not False, weights)
    stages = {"train": training_peak(cfg, gpus, train_prec, bool(loss_class(cfg["loss"]).in_batch)),
              "mntp": mntp_peak(cfg, gpus, Precision(bf16 and (model.get("mntp") or {}).get("bf16") is not False,
                                                     weights)),
              "eval": evaluation_peak(cfg, Precision(bf16, 2 if eval_bf16 else 4))}
    sizes = {stage: gigabytes(terms) for stage, terms in stages.items() if terms}
    peak = max(sizes, key=sizes.get)
    return {"memory_gb": {stage: {"total": round(sizes[stage], 3), **{k: round(v / 1e9, 3) for k, v in terms.items()}}
                          for stage, terms in stages.items() if terms},
            "memory_peak_stage": peak, "gpu_memory_gb": sizes[peak] + float(planner.get("memory_overhead_gb") or 0)}


# What to change when a stage does not fit, by stage.
MEMORY_REMEDY = {
    "train": "lower train.micro_batch{micro}, set model.deepspeed.zero_optimization.stage=3, or give each cell more "
             "GPUs (the launcher's resources)",
    "mntp": "lower model.mntp.batch_size, set model.mntp.gradient_checkpointing=true, or give the stage more GPUs "
            "(launcher.stage_resources)",
    "eval": "lower eval.batch_size",
}


def check_memory(cfgs: Sequence[Mapping[str, Any]], plans: Sequence[Mapping[str, Any]]) -> None:
    """Every cell's stages must fit the planner's GPU memory: one error naming the cell that needs most."""
    limit = cfgs[0]["planner"].get("gpu_memory_gb")
    if not limit:
        return
    cfg, plan = max(zip(cfgs, plans, strict=True), key=lambda cp: cp[1]["gpu_memory_gb"])
    if plan["gpu_memory_gb"] <= float(limit):
        return
    stage = plan["memory_peak_stage"]
    micro = cfg["train"].get("micro_batch")
    remedy = MEMORY_REMEDY[stage].format(micro=f" (now {micro})" if micro else " (now null: the whole share at once)")
    raise ConfigError(
        f"cell {plan['cell_id']} ({plan['model']}/{plan['paradigm']}/{plan['loss']}) needs about "
        f"{plan['gpu_memory_gb']:.1f} GB per GPU in its {stage} stage (estimate with "
        f"{float(cfg['planner'].get('memory_overhead_gb') or 0):g} GB overhead, {plan['gpus']} GPUs) but "
        f"planner.gpu_memory_gb={float(limit):g} ({cfg['planner']['accelerator']}): {remedy}")


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
