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

from .errors import ConfigError
from .precision import use_bf16

log = logging.getLogger(__name__)

# A stage's DeepSpeed settings where its caller gives none (the cells' conf/deepspeed group).
DEFAULT_DEEPSPEED: dict[str, Any] = {"zero_optimization": {"stage": 2}}


class LossObjective(nn.Module):
    """`loss(model, *batch)` as a module's forward, for the DeepSpeed engine to run."""

    def __init__(self, model: nn.Module, loss: Callable[..., torch.Tensor]):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model, *batch)


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
                ds_cfg: Mapping[str, Any] | None = None, desc: str = "stage", curve_every: int = 25,
                around_steps: Callable[[bool], Any] | None = None) -> tuple[bool, list[list[float]]]:
    """Train `objective` (a module whose forward returns the loss of its batch) for `steps` optimizer
    steps, resuming from `ckpt_dir`'s latest checkpoint, with a progress bar (`desc`). Returns whether
    bf16 autocast was on, and the loss every `curve_every` steps (and at the last) of this attempt.
    `around_steps(bf16)`: a context manager entered around the steps (e.g. `lora_inputs_uncast`)."""
    import contextlib

    import deepspeed
    from tqdm import tqdm

    from .distributed import init_distributed
    from .train import resume, save_checkpoint

    rank, world = init_distributed()
    config = {**(ds_cfg or DEFAULT_DEEPSPEED), "train_micro_batch_size_per_gpu": max(1, global_batch // world),
              "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True}
    if grad_clip:
        config["gradient_clipping"] = float(grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config)
    client = resume(engine, ckpt_dir, "the stage")
    start = int(client["step"]) if client is not None else 0
    if client is not None:
        log.info("stage resumed from its checkpoint at step %d of %d", start, steps)
    device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
    bf16 = use_bf16(bf16_setting, device, bf16_where)
    engine.train()
    curve: list[list[float]] = []
    bar = tqdm(total=steps, initial=start, desc=desc, mininterval=10)
    with around_steps(bf16) if around_steps else contextlib.nullcontext():
        for step in range(start, steps):
            local = tuple(t.to(device, non_blocking=True) for t in rank_share(batch_at(step), rank, world))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = engine(*local)
            engine.backward(loss)
            engine.step()
            bar.update(1)
            if step % curve_every == 0 or step == steps - 1:
                curve.append([step, round(loss.item(), 4)])
                bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
            done = step + 1
            if done % max(1, int(checkpoint_every)) == 0 and done < steps:
                save_checkpoint(engine, ckpt_dir, {"step": done})
    bar.close()
    return bf16, curve
