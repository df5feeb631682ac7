"""A composed cell's values checked before anything is planned or written: the names that become
directories, and the numbers that Hydra passes through as whatever was typed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError
from .layout import check_name

# dotted key → (type, smallest allowed value, may be null)
NUMBERS: dict[str, tuple[type, float, bool]] = {
    "budget.flops": (float, 1.0, True),
    "budget.match_steps": (int, 1, True),
    "seed": (int, 0, False),
    "launcher.max_parallel": (int, 1, True),
    "launcher.threads_per_job": (int, 1, True),
    "launcher.timeout_min": (int, 1, True),
    "sweep.stale_after_s": (float, 1.0, False),
    "log.every": (int, 1, False),
    "log.heartbeat_s": (float, 1.0, False),
    "train.lr": (float, 0.0, False),
    "train.checkpoint_every": (int, 1, False),
    "train.micro_batch": (int, 1, True),
    "planner.gpu_memory_gb": (float, 0.001, True),
    "planner.memory_overhead_gb": (float, 0.0, True),
    "eval.planned_doc_terms": (int, 1, True),
}
# dotted key → the values it may take (null: its default)
CHOICES: dict[str, tuple[str, ...]] = {
    "eval.store_dtype": ("float16", "float32"),
    "eval.search": ("auto", "host", "torch"),
}


def lookup(cfg: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return False, None
        node = node[key]
    return True, node


def assign(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """Set the existing key `dotted` of a plain config to `value`, in place."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for key in parents:
        node = node[key]
    node[leaf] = value


def check_number(dotted: str, value: Any, kind: type, least: float, nullable: bool) -> Any:
    """`value` as `kind` when it is a finite number ≥ `least` (or None where allowed); else ConfigError."""
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{dotted} must be set (a number ≥ {least:g})")
    wanted = "a whole number" if kind is int else "a finite number"
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (kind is int and number != int(number)) or number < least:
        raise ConfigError(f"{dotted}={value!r}: expected {wanted} ≥ {least:g}" + (" or null" if nullable else ""))
    return kind(number)


def check_choice(dotted: str, value: Any, allowed: tuple[str, ...]) -> str:
    """`value` when it is one of `allowed`; else ConfigError naming them."""
    if value not in allowed:
        raise ConfigError(f"{dotted}={value!r}: expected one of {', '.join(allowed)}")
    return value


def check_cell(cfg: dict[str, Any]) -> None:
    """Check (and normalise, in place: '3' → 3) the values a cell's config must get right."""
    check_name("sweep.name", lookup(cfg, "sweep.name")[1])
    for dotted, (kind, least, nullable) in NUMBERS.items():
        present, value = lookup(cfg, dotted)
        if present:
            assign(cfg, dotted, check_number(dotted, value, kind, least, nullable))
    for dotted, allowed in CHOICES.items():
        present, value = lookup(cfg, dotted)
        if present and value is not None:
            check_choice(dotted, value, allowed)
    name = cfg.get("launcher", {}).get("name")
    if name not in ("local", "slurm"):
        raise ConfigError(f"launcher.name={name!r}: expected local or slurm (launcher=local or launcher=slurm)")
