"""The training loop of the shared stages (tiny pretraining, MNTP), under the rules cells follow: a
DeepSpeed engine on the job's device over every rank the job has, bf16 where the device has it natively,
and a checkpoint every N steps that a requeued or resubmitted stage job resumes from.

A stage's batch is a pure function of its step (`batch_at`), so a resumed run sees the batches an
uninterrupted one would. Each rank takes a contiguous share of the step's global batch; DeepSpeed
averages the ranks' gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, DataError
from .precision import use_bf16

log = logging.getLogger(__name__)

# A stage's DeepSpeed settings where its caller gives none (the cells' conf/deepspeed group).
DEFAULT_DEEPSPEED: dict[str, Any] = {"zero_optimization": {"stage": 2}}


def rank_share(batch: tuple[torch.Tensor, ...], rank: int, world: int) -> tuple[torch.Tensor, ...]:
    n = batch[0].shape[0]
    if n % world:
        raise ConfigError(f"a stage batch of {n} does not split over {world} ranks: make the stage's batch_size a "
                          "multiple of the stage job's ranks")
    share = n // world
    return tuple(t[rank * share:(rank + 1) * share] for t in batch)


def train_stage(objective: nn.Module, optimizer: torch.optim.Optimizer, scheduler, steps: int,
                batch_at: Callable[[int], tuple[torch.Tensor, ...]], global_batch: int, bf16_setting: Any,
                bf16_where: str, ckpt_dir: Path, checkpoint_every: int, grad_clip: float = 0.0,
                ds_cfg: Mapping[str, Any] | None = None,
                on_step: Callable[[int, float], None] = lambda step, loss: None,
                around_steps: Callable[[bool], Any] | None = None) -> bool:
    """Train `objective` (a module whose forward returns the loss of its batch) for `steps` optimizer
    steps, resuming from `ckpt_dir`'s latest checkpoint. Returns whether bf16 autocast was on.
    `around_steps(bf16)`: a context manager entered around the steps (e.g. `lora_inputs_uncast`)."""
    import contextlib

    import deepspeed

    from .distributed import init_distributed
    from .train import latest_checkpoint, save_checkpoint

    rank, world = init_distributed()
    config = {**(ds_cfg or DEFAULT_DEEPSPEED), "train_micro_batch_size_per_gpu": max(1, global_batch // world),
              "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True}
    if grad_clip:
        config["gradient_clipping"] = float(grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config)
    start = 0
    if latest_checkpoint(ckpt_dir) is not None:
        try:
            _, client = engine.load_checkpoint(str(ckpt_dir))
        except Exception as exc:  # noqa: BLE001 — any load failure means the same thing to the user
            raise DataError(f"stage checkpoint {ckpt_dir} cannot be loaded ({exc}). Delete it to restart the "
                            "stage from step 0.") from exc
        start = int(client["step"])
        log.info("stage resumed from its checkpoint at step %d of %d", start, steps)
    device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
    bf16 = use_bf16(bf16_setting, device, bf16_where)
    engine.train()
    with around_steps(bf16) if around_steps else contextlib.nullcontext():
        for step in range(start, steps):
            local = tuple(t.to(device, non_blocking=True) for t in rank_share(batch_at(step), rank, world))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = engine(*local)
            engine.backward(loss)
            engine.step()
            on_step(step, loss.item())
            done = step + 1
            if done % max(1, int(checkpoint_every)) == 0 and done < steps:
                save_checkpoint(engine, ckpt_dir, {"step": done})
    return bf16
