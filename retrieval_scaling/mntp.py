"""MNTP (masked next-token prediction), the paper's stage 1: once per backbone, cached, shared.

With attention made bidirectional, 20% of tokens are masked (80% → mask token, 10% → random token,
10% kept) and token i is predicted from position i−1 (the causal LM's shifted loss). Only a LoRA
adapter trains; retrieval fine-tuning continues this same adapter. Its compute is reported in the
stage's `mntp.json`, never charged to a cell's budget.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .backbone import architecture, enable_gradient_checkpointing, load_backbone, lora_config, lora_inputs_uncast
from .data import Collection
from .layout import mntp_dir
from .precision import AUTO
from .pretrain import corpus_blocks, lm_head_loss
from .stage_training import LossObjective, train_stage
from .stages import build_resumable

log = logging.getLogger(__name__)

IGNORE = -100


def mntp_mask(input_ids: torch.Tensor, maskable: torch.Tensor, mask_id: int, vocab_size: int, rate: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels): `rate` of the maskable positions are selected; of those 80% become the mask
    token, 10% a random token, 10% stay. Labels hold the original token at selected positions and
    IGNORE elsewhere, unshifted: the causal LM loss shifts them, so position i−1 predicts token i."""
    selected = (torch.rand(input_ids.shape, generator=generator) < rate) & maskable
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    roll = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[selected & (roll < 0.8)] = mask_id
    to_random = selected & (roll >= 0.8) & (roll < 0.9)
    inputs[to_random] = torch.randint(vocab_size, input_ids.shape, generator=generator)[to_random]
    return inputs, labels


def masked_lm_loss(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal LM's shifted loss (`model(input_ids=inputs, labels=labels).loss`: position i−1 predicts
    label i, mean over the labelled positions), with the LM head applied only at the positions that
    predict a label — a fifth of them at MNTP's mask rate, where the head and its fp32 cross-entropy
    over the vocabulary are most of a tiny model's step."""
    hidden = model.get_decoder()(input_ids=inputs).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return lm_head_loss(model, hidden[:, :-1][keep], targets[keep])


def mntp_flops(model_cfg: Mapping[str, Any], tokens: int, block_len: int, predicted: int,
               recompute: bool = False) -> int:
    """Same convention as cells (flops.py): frozen weights 4N per token, LoRA 6N, attention 12·L·d·S²
    with S² summed over blocks = tokens·block_len; the LM head 4·d·V per `predicted` token only (the
    positions `masked_lm_loss` applies it to). `recompute`: the hardware's, with every decoder layer's
    forward (2N, 2N LoRA, 4·L·d·S²) again under gradient checkpointing."""
    arch = architecture(model_cfg)
    n_lin = arch.num_hidden_layers * arch.linear_params_per_layer()
    n_lora = arch.num_hidden_layers * arch.lora_params_per_layer(int(model_cfg["lora"]["r"]),
                                                                tuple(model_cfg["lora"]["targets"]))
    head = 4 * arch.hidden_size * arch.vocab_size
    attention = 12 * arch.num_hidden_layers * arch.hidden_size * block_len
    again = tokens * (2 * n_lin + 2 * n_lora + attention // 3) if recompute else 0
    return tokens * (4 * n_lin + 6 * n_lora + attention) + predicted * head + again


def ensure_mntp(model_cfg: Mapping[str, Any], backbone_dir: Path | None, corpus: Collection,
                cache_root: Path, ds_cfg: Mapping[str, Any] | None = None) -> Path:
    out = mntp_dir(cache_root, model_cfg, corpus.name)
    return build_resumable(out, lambda tmp, ckpt: _train_mntp(model_cfg, backbone_dir, corpus, tmp, ckpt, ds_cfg),
                           f"MNTP {model_cfg['name']}")


def mntp_batch(blocks: torch.Tensor, step: int, seed: int, batch: int, mask_id: int, vocab: int,
               rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s (inputs, labels): a pure function of (seed, step), so a resumed stage sees the
    batches an uninterrupted one would."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = blocks[torch.randint(0, len(blocks), (batch,), generator=gen)].long()
    maskable = torch.ones_like(x, dtype=torch.bool)
    maskable[:, 0] = False  # BOS is never a target
    return mntp_mask(x, maskable, mask_id, vocab, rate, gen)


def _train_mntp(model_cfg: Mapping[str, Any], backbone_dir: Path | None, corpus: Collection, out: Path,
                ckpt_dir: Path, ds_cfg: Mapping[str, Any] | None) -> None:
    import torch.distributed as dist
    from peft import get_peft_model

    recipe = model_cfg["mntp"]
    seed = int(recipe["seed"])
    torch.manual_seed(seed)
    model, tokenizer = load_backbone({**model_cfg, "bidirectional": True}, backbone_dir)
    mask_id = tokenizer.convert_tokens_to_ids(recipe["mask_token"])
    if mask_id is None or mask_id == tokenizer.unk_token_id:
        raise ValueError(f"MNTP mask token {recipe['mask_token']!r} is not in the tokenizer's vocabulary")
    if recipe.get("gradient_checkpointing"):  # without it every layer's activations are held at once (8B: too many)
        enable_gradient_checkpointing(model)
    model = get_peft_model(model, lora_config(model_cfg))
    if recipe.get("train_embeddings"):
        model.get_input_embeddings().weight.requires_grad_(True)
    blocks = corpus_blocks(tokenizer, corpus.corpus.values(), int(recipe["block_len"]))
    steps, batch = int(recipe["steps"]), int(recipe["batch_size"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(recipe["lr"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))  # linear, no warm-up
    vocab = model.get_input_embeddings().weight.shape[0]
    rate = float(recipe["mask_rate"])
    start = time.time()
    bf16, curve = train_stage(LossObjective(model, masked_lm_loss), opt, sched, steps,
                              lambda step: mntp_batch(blocks, step, seed, batch, mask_id, vocab, rate), batch,
                              recipe.get("bf16", AUTO), "model.mntp.bf16", ckpt_dir,
                              int(recipe.get("checkpoint_every") or 500), ds_cfg=ds_cfg,
                              desc=f"MNTP {model_cfg['name']}", curve_every=25,
                              around_steps=lambda half: lora_inputs_uncast(model, half))
    if dist.get_rank() != 0:
        return
    predicted = sum(int((mntp_batch(blocks, s, seed, batch, mask_id, vocab, rate)[1][:, 1:] != IGNORE).sum())
                    for s in range(steps))
    model.save_pretrained(out)
    tokens = steps * batch * int(recipe["block_len"])
    summary = {"model": model_cfg["name"], "steps": steps, "batch_size": batch, "tokens": tokens,
               "predicted_tokens": predicted,
               "flops": mntp_flops(model_cfg, tokens, int(recipe["block_len"]), predicted),
               "seconds": round(time.time() - start, 1), "loss_curve": curve,
               "mask_token": recipe["mask_token"], "mask_rate": recipe["mask_rate"], "bf16": bf16}
    (out / "mntp.json").write_text(json.dumps(summary, indent=2))
    log.info("MNTP %s: loss %s -> %s in %.0fs", model_cfg["name"], curve[0][1] if curve else None,
             curve[-1][1] if curve else None, summary["seconds"])
