"""Pretraining stage of the tiny family: full-parameter causal language modelling on the corpus.

The paper fine-tunes *pretrained* LLMs; LoRA on frozen random weights barely learns. So each tiny size
is pretrained once per corpus, cached, and shared by all of that size's cells. Its compute is
reported in the stage's `pretrain.json` (and on every cell's run), never charged to the cell budget.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .backbone import architecture, decoder_config, train_bpe_tokenizer
from .data import Collection
from .encoders import weight_usable_directly
from .flops import Architecture
from .layout import pretrained_dir
from .precision import AUTO, use_bf16
from .stage_training import LossObjective, train_stage
from .stages import build_resumable

log = logging.getLogger(__name__)


def pretrain_flops(arch: Architecture, tokens: int, block_len: int) -> int:
    """Full-parameter training: 6N per token for every linear and the (tied) LM head, plus attention
    (4 + 8)·d·S² per layer with S² summed over blocks = tokens·block_len."""
    n_lin = arch.num_hidden_layers * arch.linear_params_per_layer()
    head = arch.hidden_size * arch.vocab_size
    return 6 * tokens * (n_lin + head) + 12 * arch.num_hidden_layers * arch.hidden_size * tokens * block_len


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits `hidden @ weight.T` against `targets` — (T, d), (V, d), (T,) →
    a scalar — `chunk` rows at a time, each chunk's gradients taken in the same pass (softmax − one-hot
    of logits still in cache): the (T, V) logits never exist whole, and nothing of them is kept for the
    backward. As the module and transformers' loss compute it: matmuls in the autocast dtype when
    autocast is on, softmax in fp32. Every target counts (no ignore index). Why: a tiny model's LM step
    spends most of its time on the logits."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        w, n = weight.to(dtype), hidden.shape[0]
        device_of = {"device": hidden.device}
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, **device_of) if hidden.requires_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, **device_of) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(device, enabled=False):
            for start in range(0, n, chunk):
                h, t = hidden[start:start + chunk].to(dtype), targets[start:start + chunk]
                logits = (h @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
                grad[torch.arange(len(t), device=t.device), t] -= 1
                grad = grad.div_(n).to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk] = grad @ w
                if grad_weight is not None:
                    grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else (grad_hidden * grad_loss).to(ctx.dtypes[0]),
                None if grad_weight is None else (grad_weight * grad_loss).to(ctx.dtypes[1]), None, None)


def lm_head_loss(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Mean cross-entropy of `model`'s LM head on `hidden` (…, d) against `targets` (…), through
    `ChunkedHeadCrossEntropy` when the head is a bias-free linear (Llama's), else through the module."""
    head = model.get_output_embeddings()
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if weight_usable_directly(head) and head.bias is None:
        # Under no_grad the function still sees a weight that requires grad: detach it, or each chunk
        # would compute the weight's gradient too.
        weight = head.weight if torch.is_grad_enabled() else head.weight.detach()
        return ChunkedHeadCrossEntropy.apply(hidden, weight, targets, chunk)
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets)


def causal_lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """`model(input_ids=x, labels=x).loss` — position i predicts token i+1 — through `lm_head_loss`."""
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
    return lm_head_loss(model, hidden[:, :-1], input_ids[:, 1:])


def corpus_blocks(tokenizer, texts: Iterable[str], block: int, chunk: int = 10_000) -> torch.Tensor:
    """The corpus packed into blocks of `block` tokens that start with BOS (documents end with EOS),
    int32. Tokenized as a stream, `chunk` texts at a time, into int32 arrays: MS MARCO's 8.8M passages
    (~0.6B tokens) take ~2.4 GB this way, where one Python list of their token ids took ~20 GB."""
    import itertools

    import numpy as np

    parts: list[np.ndarray] = []
    it = iter(texts)
    while batch := list(itertools.islice(it, chunk)):
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        flat = np.fromiter(itertools.chain.from_iterable(x + [tokenizer.eos_token_id] for x in ids), dtype=np.int32)
        parts.append(flat)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    body = block - 1
    n = len(stream) // body
    blocks = torch.from_numpy(stream[: n * body].copy()).view(n, body)
    return torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.int32), blocks], dim=1)


def ensure_pretrained(model_cfg: Mapping[str, Any], corpus: Collection, cache_root: Path,
                      ds_cfg: Mapping[str, Any] | None = None) -> Path:
    """The directory of this tiny backbone (HF format, tokenizer included), building it if needed."""
    out = pretrained_dir(cache_root, model_cfg, corpus.name)
    return build_resumable(out, lambda tmp, ckpt: _pretrain(model_cfg, corpus, tmp, ckpt, ds_cfg),
                           f"pretrain {model_cfg['name']}")


def pretraining_blocks(model_cfg: Mapping[str, Any], corpus: Collection):
    """(tokenizer, held-out blocks, training blocks): a BPE trained on the corpus, the corpus cut into
    `block_len`-token blocks, one in fifty held out (seeded)."""
    recipe = model_cfg["pretrain"]
    torch.manual_seed(int(recipe["seed"]))
    texts = list(corpus.corpus.values())
    tokenizer = train_bpe_tokenizer(texts, architecture(model_cfg).vocab_size)
    blocks = corpus_blocks(tokenizer, texts, int(recipe["block_len"]))
    perm = torch.randperm(len(blocks))
    n_heldout = max(1, len(blocks) // 50)
    return tokenizer, blocks[perm[:n_heldout]].long(), blocks[perm[n_heldout:]]


def optimizer_and_schedule(model, recipe: Mapping[str, Any]):
    """AdamW (weight decay 0.1, β 0.9/0.95), linear warm-up then cosine decay over the recipe's steps."""
    steps = int(recipe["steps"])
    warmup = max(1, int(steps * float(recipe.get("warmup_fraction", 0.05))))
    opt = torch.optim.AdamW(model.parameters(), lr=float(recipe["lr"]), weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    return opt, sched


def _pretrain(model_cfg: Mapping[str, Any], corpus: Collection, out: Path, ckpt_dir: Path,
              ds_cfg: Mapping[str, Any] | None) -> None:
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from .distributed import device

    recipe = model_cfg["pretrain"]
    arch = architecture(model_cfg)
    seed, block = int(recipe["seed"]), int(recipe["block_len"])
    tokenizer, heldout, train = pretraining_blocks(model_cfg, corpus)
    config = decoder_config(
        arch, max_position_embeddings=int(recipe.get("max_position_embeddings", 512)),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        attn_implementation=model_cfg.get("attn_implementation", "sdpa"),
    )
    model = LlamaForCausalLM(config).to(device())
    steps, batch = int(recipe["steps"]), int(recipe["batch_size"])
    opt, sched = optimizer_and_schedule(model, recipe)
    bf16 = use_bf16(recipe.get("bf16", AUTO), device(), "model.pretrain.bf16")

    def heldout_loss() -> float:
        # Through the chunked head: the held-out blocks' whole-vocabulary logits would be ~0.5 GB.
        model.eval()
        with torch.no_grad(), torch.autocast(device().type, dtype=torch.bfloat16, enabled=bf16):
            loss = causal_lm_loss(model, heldout.to(device())).item()
        model.train()
        return loss

    def batch_at(step: int) -> tuple[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return (train[torch.randint(0, len(train), (batch,), generator=gen)].long(),)

    initial = heldout_loss()
    start = time.time()
    bf16, curve = train_stage(LossObjective(model, causal_lm_loss), opt, sched, steps, batch_at, batch,
                              recipe.get("bf16", AUTO), "model.pretrain.bf16", ckpt_dir,
                              int(recipe.get("checkpoint_every") or 500), grad_clip=1.0, ds_cfg=ds_cfg,
                              desc=f"pretrain {model_cfg['name']}", curve_every=50)
    if dist.get_rank() != 0:
        return
    final = heldout_loss()
    tokens = steps * batch * block
    summary = {
        "model": model_cfg["name"], "corpus": corpus.name, "steps": steps, "batch_size": batch,
        "block_len": block, "tokens": tokens, "flops": pretrain_flops(arch, tokens, block),
        "seconds": round(time.time() - start, 1), "heldout_loss_before": round(initial, 4),
        "heldout_loss_after": round(final, 4), "train_curve": curve,
        "params": sum(p.numel() for p in model.parameters()), "bf16": bf16,
    }
    log.info("pretrain %s: held-out loss %.3f -> %.3f in %.0fs", model_cfg["name"], initial, final,
             summary["seconds"])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2))
