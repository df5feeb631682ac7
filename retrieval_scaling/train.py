"""Retrieval fine-tuning of one cell: a DeepSpeed ZeRO engine for exactly the budget's steps.

Batches, and the random draws of a step (dropout), are a pure function of (seed, step), so a resumed
run sees the same data and masks it would have seen.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbone import compiled_layers, lora_inputs_uncast
from .batch import Batch
from .distributed import any_rank, world_size
from .encoders import Encoder, encode_inputs
from .errors import ConfigError, DataError
from .faults import Faults
from .gradient_cache import MicroBatches, optimizer_step
from .losses import LossOutput, Scores
from .paradigms import Paradigm
from .precision import AUTO, use_bf16
from .requeue import REQUEUE
from .training_tokens import TrainingTokens

log = logging.getLogger(__name__)


class BatchSampler:
    """Queries without replacement per epoch; for each, one positive and G-1 hard negatives drawn
    without replacement from its mined negatives every time the query is drawn."""

    def __init__(self, data: TrainingTokens, queries_per_step: int, group: int, seed: int, query_len: int,
                 passage_len: int, bos_id: int, pad_id: int):
        self.examples = np.flatnonzero(np.diff(data.neg_ptr) >= group - 1)  # those with enough negatives
        if len(self.examples) < queries_per_step:
            raise DataError(
                f"only {len(self.examples)} training queries have ≥ {group - 1} hard negatives; a step needs "
                f"{queries_per_step}. Raise data.negatives.keep or lower the batch."
            )
        self.data, self.queries_per_step, self.group, self.seed = data, queries_per_step, group, seed
        self.query_len, self.passage_len, self.bos_id, self.pad_id = query_len, passage_len, bos_id, pad_id

    @functools.lru_cache(maxsize=4)  # noqa: B019  (a few epochs' permutations; samplers live for a run)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def batch(self, step: int) -> Batch:
        n, rng, data = len(self.examples), np.random.default_rng([self.seed, 1_000_003, step]), self.data
        picks = []
        for k in range(step * self.queries_per_step, (step + 1) * self.queries_per_step):
            picks.append(int(self.examples[self._order(k // n)[k % n]]))
        queries, passages, teacher = [], [], []
        for ex in picks:
            pos_lo, pos_n = int(data.pos_ptr[ex]), int(data.pos_ptr[ex + 1] - data.pos_ptr[ex])
            neg_lo, neg_n = int(data.neg_ptr[ex]), int(data.neg_ptr[ex + 1] - data.neg_ptr[ex])
            pos = pos_lo + int(rng.integers(pos_n))
            negs = neg_lo + rng.choice(neg_n, size=self.group - 1, replace=False)
            rows = [int(data.pos_row[pos]), *(int(r) for r in data.neg_row[negs])]
            queries.append(data.row(int(data.query_row[ex])))
            passages.extend(data.row(r) for r in rows)
            teacher.append([float(data.pos_teacher[pos]), *(float(s) for s in data.neg_teacher[negs])])
        q_ids, q_mask = encode_inputs(queries, self.bos_id, self.pad_id, self.query_len, pad_to=self.query_len)
        p_ids, p_mask = encode_inputs(passages, self.bos_id, self.pad_id, self.passage_len, pad_to=self.passage_len)
        return Batch(q_ids, q_mask, p_ids, p_mask, torch.tensor(teacher, dtype=torch.float32))


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(*(t.to(device, non_blocking=True) for t in (batch.query_ids, batch.query_mask, batch.passage_ids,
                                                             batch.passage_mask, batch.teacher)))


def shard(batch: Batch, rank: int, world: int) -> Batch:
    """This rank's contiguous share of a global batch: queries [r·B/W, (r+1)·B/W) and their groups.
    Gathering every rank's reps in rank order restores the global batch's order."""
    b = batch.query_ids.shape[0]
    n = b // world
    q = slice(rank * n, (rank + 1) * n)
    group = batch.passage_ids.shape[0] // b
    p = slice(rank * n * group, (rank + 1) * n * group)
    return Batch(batch.query_ids[q], batch.query_mask[q], batch.passage_ids[p], batch.passage_mask[p],
                 batch.teacher[q])


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then linear decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    path = ckpt_dir / tag
    if not path.is_dir():
        raise DataError(
            f"checkpoint {ckpt_dir}: 'latest' names {tag!r}, which does not exist. Delete {ckpt_dir} "
            "to restart the cell from step 0."
        )
    return path


def resume(engine, ckpt_dir: Path, what: str) -> dict | None:
    """Load `ckpt_dir`'s latest checkpoint into `engine`; its client state, or None without one."""
    if latest_checkpoint(ckpt_dir) is None:
        return None
    try:
        # the frozen base is not in the checkpoint (it is rebuilt from the stage cache): not strict
        _, client = engine.load_checkpoint(str(ckpt_dir), load_module_strict=False)
    except Exception as exc:  # noqa: BLE001 — any load failure means the same thing to the user
        raise DataError(f"checkpoint {ckpt_dir} cannot be loaded ({exc}). Delete it to restart {what} from "
                        "step 0.") from exc
    saved = client.get("trainable") if client else None
    if saved is not None and saved != trainable_names(engine):
        raise DataError(f"checkpoint {ckpt_dir} holds other trainable parameters than {what} trains (another "
                        "LoRA or head). Delete it to restart from step 0.")
    return client


def _state_dict_without_frozen(engine):
    """DeepSpeed's `module_state_dict`, leaving out every frozen parameter. DeepSpeed's own exclusion
    walks `named_parameters()`, which lists a tied parameter once, so a frozen output layer tied to the
    embeddings (Llama-3.2 1B and 3B, SmolLM2) stayed in: most of a small model's checkpoint."""
    def state_dict(destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
        sd = engine.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if exclude_frozen_parameters:
            for name, p in engine.module.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    sd.pop(name, None)
        return sd

    return state_dict


def trainable_names(engine) -> list[str]:
    return [name for name, p in engine.module.named_parameters() if p.requires_grad]


def build_engine(encoder: Encoder, micro_batch: int, steps: int, train_cfg: Mapping[str, Any],
                 ds_cfg: Mapping[str, Any], accumulation: int = 1):
    """(DeepSpeed engine, LR scheduler): AdamW over the trainable parameters, linear warm-up and decay;
    `accumulation` backward passes per optimizer step (a gradient-cached step's micro-batches)."""
    import deepspeed

    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(train_cfg["lr"]), weight_decay=float(train_cfg["weight_decay"]))
    warmup = max(1, math.ceil(steps * float(train_cfg["warmup_fraction"])))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, steps))
    config = {**ds_cfg, "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation,
              "gradient_clipping": float(train_cfg["grad_clip"]), "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=encoder, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine, scheduler


class StepLoss:
    """One step's loss over the rank-gathered reps: the objective on the paradigm's scores, plus the
    paradigm's regulariser at this optimizer step."""

    def __init__(self, loss_fn: Callable[..., LossOutput], group: int, paradigm: Paradigm, steps: int):
        self.loss_fn, self.group, self.paradigm, self.steps = loss_fn, group, paradigm, steps

    def __call__(self, q: torch.Tensor, p: torch.Tensor, teacher, step: int) -> tuple[torch.Tensor, dict]:
        out = self.loss_fn(Scores(q, p, self.group, self.paradigm), teacher)
        penalty, extra = self.paradigm.regularizer(q, p, step, self.steps)
        return out.total + penalty, {**out.parts, **extra}


def train(encoder: Encoder, loss_fn: Callable[..., LossOutput], sampler: BatchSampler, steps: int,
          flops_per_step: int, tokens_per_step: int, train_cfg: Mapping[str, Any],
          paradigm: Paradigm, ds_cfg: Mapping[str, Any], ckpt_dir: Path, log_every: int,
          log_metrics: Callable[[dict[str, float], int], None], faults: Faults | None = None) -> Encoder:
    """Train for `steps` optimizer steps, resuming from the last checkpoint in `ckpt_dir`. FLOPs and
    tokens per step come from the cell's plan, the one place they are counted. Over several ranks,
    each encodes its share of the global batch and the loss is taken over the gathered reps, so
    in-batch negatives and the FLOPS term see the whole batch whatever the number of ranks."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), world_size()
    if sampler.queries_per_step % world:
        raise ConfigError(f"{sampler.queries_per_step} queries per step do not split over {world} ranks; make "
                          "train.queries_per_step a multiple of the ranks (launcher.resources tasks × nodes)")
    local_queries = sampler.queries_per_step // world
    micro = MicroBatches.of(train_cfg.get("micro_batch"), local_queries, local_queries * sampler.group)
    engine, scheduler = build_engine(encoder, micro.size, steps, train_cfg, ds_cfg, micro.backward_passes)
    start, real_tokens = 0, 0  # real: without padding (the budget counts padded tokens: `tokens_seen`)
    client = resume(engine, ckpt_dir, "the cell")
    if client is not None:
        start, real_tokens = int(client["step"]), int(client.get("real_tokens", 0))
        log.info("resumed from checkpoint at step %d", start)
        log_metrics({"resumed_from_step": float(start)}, start)
    step_loss = StepLoss(loss_fn, sampler.group, paradigm, steps)
    device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
    bf16 = use_bf16(train_cfg.get("bf16", AUTO), device, "train.bf16")
    engine.train()
    REQUEUE.training(True)
    tick = time.time()
    with compiled_layers(encoder, bool(train_cfg.get("compile", False))), lora_inputs_uncast(encoder, bf16):
        for step in range(start, steps):
            seed_step(sampler.seed, step)
            batch = to_device(sampler.batch(step), device)
            real_tokens += int(batch.query_mask.sum()) + int(batch.passage_mask.sum())
            local = shard(batch, rank, world)
            q, p, loss, parts = optimizer_step(engine, local, micro, bf16,
                                               lambda q, p: step_loss(q, p, batch.teacher, step))  # noqa: B023
            done = step + 1
            if done % log_every == 0 or done == steps or done == start + 1:
                elapsed = max(time.time() - tick, 1e-9)
                metrics = {
                    "train/loss": loss.item(), **{f"train/{k}": v.item() for k, v in parts.items()},
                    "train/lr": scheduler.get_last_lr()[0], "flops_spent": float(done * flops_per_step),
                    "tokens_seen": float(done * tokens_per_step), "tokens_real_seen": float(real_tokens),
                    "throughput_tokens_per_s": tokens_per_step * (done - max(start, done - log_every)) / elapsed,
                    **paradigm.train_metrics(q, p),
                }
                log_metrics(metrics, done)
                log.info("step %d/%d loss %.4f", done, steps, metrics["train/loss"])
                tick = time.time()
            state = {"step": done, "real_tokens": real_tokens}
            if done % int(train_cfg["checkpoint_every"]) == 0 or done == steps:
                save_checkpoint(engine, ckpt_dir, state)
            REQUEUE.at_step_end(lambda: save_checkpoint(engine, ckpt_dir, state), any_rank)  # noqa: B023
            if faults is not None:
                faults.at_step(done)
    REQUEUE.training(False)
    return engine.module


def seed_step(seed: int, step: int) -> None:
    """Seed torch's generators (the CPU's and every GPU's) from (seed, step): a step draws the same
    dropout masks whether or not the run was resumed before it."""
    torch.manual_seed(int(np.random.SeedSequence([seed, 2_000_003, step]).generate_state(1)[0]))


def save_checkpoint(engine, ckpt_dir: Path, state: Mapping[str, int]) -> None:
    """Save the trainable state, then drop older tags; DeepSpeed writes `latest` only after the new tag
    is complete."""
    tag = f"step{state['step']}"
    # what trains (LoRA, trained embeddings, heads), its optimizer and scheduler: not the frozen base,
    # which would be 16 GB a checkpoint at 8B
    engine.module_state_dict = _state_dict_without_frozen(engine)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**state, "trainable": trainable_names(engine)},
                               exclude_frozen_parameters=True)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as "unexpected pos"
        from .disk import disk_full, is_disk_full

        if is_disk_full(exc):
            raise disk_full(ckpt_dir, f"checkpoint {tag} (the previous one is kept)") from None
        raise
    import torch.distributed as dist

    if dist.get_rank() != 0:
        return
    for old in ckpt_dir.glob("step*"):
        if old.name != tag:
            shutil.rmtree(old, ignore_errors=True)
