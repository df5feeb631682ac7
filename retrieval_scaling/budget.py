"""The FLOP budget of a cell, by number (`budget.flops`) or by intent (`budget.match`).

`budget.match=<model>/<paradigm>/<loss>` with `budget.match_steps=N` means "the compute N optimizer
steps of that cell cost": e.g. `llama3_1b/dense/cl` with 33,250 steps is what the paper gave its 1B
CL cell. The matched cell is composed with this cell's own overrides (grid, lengths, batch), the
three axes swapped, so it is priced under the same settings; the result is written into
`budget.flops`, which is what plans, identities and runs read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import ConfigError

AXES = ("model", "paradigm", "loss")
Compose = Callable[[list[str]], dict[str, Any]]


def parse_match(spec: str) -> dict[str, str]:
    parts = str(spec).split("/")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(f"budget.match={spec!r}: expected <model>/<paradigm>/<loss>, e.g. llama3_1b/dense/cl")
    return dict(zip(AXES, parts, strict=True))


def resolve_budget(cfg: dict[str, Any], overrides: Sequence[str], compose: Compose) -> None:
    """Fill `budget.flops` from `budget.match` (in place); a cell with a number keeps it."""
    budget: Mapping[str, Any] = cfg["budget"]
    spec = budget.get("match")
    if not spec:
        if budget.get("flops") is None:
            raise ConfigError("budget: set budget.flops=<FLOPs per cell> or budget.match=<model>/<paradigm>/<loss>")
        return
    if budget.get("flops") is not None:
        raise ConfigError(f"budget.flops={budget['flops']} and budget.match={spec} are both set: keep one "
                          "(budget.match=null to give a number, or budget.flops=null to match a cell)")
    steps = budget.get("match_steps")
    if not steps or int(steps) < 1:
        raise ConfigError(f"budget.match={spec} needs budget.match_steps=<optimizer steps of that cell>")
    axes = parse_match(spec)
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in AXES]
    try:
        matched = compose([*kept, *(f"{k}={v}" for k, v in axes.items())])
    except Exception as exc:  # noqa: BLE001 — Hydra's missing-config errors name the bad value
        raise ConfigError(f"budget.match={spec}: that cell cannot be composed ({exc})") from None
    from .plan import step_cost

    cfg["budget"]["flops"] = float(int(steps) * step_cost(matched)["total"])
