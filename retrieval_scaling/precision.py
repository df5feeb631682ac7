"""Which floating-point format a stage computes in: bf16 where the device computes it natively.

The paper trains in bf16 on A100s, and a CPU with AMX or AVX-512 runs bf16 matmuls as fast as fp32 or
faster. A CPU without them has no bf16 kernel, and bf16 there is many times slower than fp32. So each
bf16 switch (`train.bf16`, `model.pretrain.bf16`, `model.mntp.bf16`)
takes `auto`, resolved on the machine that runs the stage, not where the sweep is planned; `true` and
`false` force it. `eval.dtype: auto` is bfloat16 or float32 by the same rule. The choice changes
numerics, not what a cell is: a cell's identity keeps the setting (`auto`), its run records the choice
(tags `precision.*`, per attempt), as do the stages' summaries (`pretrain.json`, `mntp.json`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

AUTO = "auto"


def bf16_native(device: torch.device | str) -> bool:
    """Whether `device` has bf16 kernels: CUDA's own check; on a CPU, oneDNN's (AVX-512 or AMX)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # the check PyTorch's own tests use
    return False


def check_bf16(setting: Any, where: str) -> None:
    if setting != AUTO and not isinstance(setting, bool):
        raise ConfigError(f"{where}={setting!r}: use auto (bf16 where the device has it natively), true or false.")


def use_bf16(setting: Any, device: torch.device | str, where: str = "bf16") -> bool:
    """A bf16 switch resolved for `device`: `auto` → `bf16_native(device)`; `true`/`false` as given."""
    check_bf16(setting, where)
    return bf16_native(device) if setting == AUTO else setting


def check_dtype(setting: Any, where: str) -> None:
    if setting == AUTO:
        return
    import torch  # here, not at the top: planning and `status` import this module and need no torch

    dtype = getattr(torch, str(setting), None)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"{where}={setting!r}: use auto, bfloat16 or float32.")


def weight_dtype(setting: Any, device: torch.device | str, where: str = "dtype") -> torch.dtype:
    """A dtype setting resolved for `device`: `auto` → bfloat16 where native, else float32."""
    import torch

    check_dtype(setting, where)
    if setting == AUTO:
        return torch.bfloat16 if bf16_native(device) else torch.float32
    return getattr(torch, str(setting))


def check_settings(cfg: Mapping[str, Any]) -> None:
    """Every precision setting of a cell's config is one this module resolves (checked when planning)."""
    model = cfg["model"]
    check_bf16(cfg["train"].get("bf16", AUTO), "train.bf16")
    for stage in ("pretrain", "mntp"):
        if isinstance(model.get(stage), Mapping):
            check_bf16(model[stage].get("bf16", AUTO), f"model.{stage}.bf16")
    check_dtype(cfg["eval"].get("dtype", AUTO), "eval.dtype")


def resolved(cfg: Mapping[str, Any], device: torch.device | str) -> dict[str, str]:
    """What this machine computes a cell in, for its run's tags."""
    import torch

    return {"precision.train": "bf16" if use_bf16(cfg["train"].get("bf16", AUTO), device) else "fp32",
            "precision.eval": str(weight_dtype(cfg["eval"].get("dtype", AUTO), device)).removeprefix("torch."),
            "precision.device": torch.device(device).type}
