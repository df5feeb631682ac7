"""A cell's encoder at inference: prepared for evaluation (LoRA merged, inference dtype and attention),
run over texts in length-sorted batches, each batch's reps brought to the host as its paradigm keeps them
(sparse: CSR made on the device, optionally pruned), and put behind the retriever interface with its
store's settings."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .encoders import Encoder, encode_inputs
from .encodings import store_settings
from .precision import weight_dtype
from .retrievers import EncoderRetriever


def inference_encoder(encoder: Encoder, dtype: str = "auto", attn_implementation: str | None = None) -> Encoder:
    """The encoder as evaluation runs it, built on a copy so that training state is untouched: LoRA
    merged into the weights it adapts (no adapter matmuls, scale and add per layer and batch), every
    weight in `dtype` (bf16: no per-batch casts of weights, a half-width residual stream; `auto`: bf16
    where the encoder's device has it natively, see `precision`) and the inference attention kernel."""
    from peft import PeftModel

    torch_dtype = weight_dtype(dtype, next(encoder.parameters()).device, "eval.dtype")
    model = copy.deepcopy(encoder)
    if isinstance(model.backbone, PeftModel):
        model.backbone = model.backbone.merge_and_unload()
    if attn_implementation:
        model.backbone.set_attn_implementation(attn_implementation)
    return model.to(torch_dtype).eval().requires_grad_(False)


@torch.no_grad()
def encode_texts(encoder: Encoder, tokenizer, texts: list[str], max_len: int, batch_size: int,
                 desc: str, max_terms: int | None = None) -> Any:
    """Reps of `texts` in input order, in the host form of the encoder's paradigm (`Paradigm.to_host`):
    a float32 array for a dense encoder; for a sparse one CSR, each batch's reps made sparse as it comes,
    so no dense (texts, vocabulary) array exists beyond one batch's; with `max_terms`, each sparse rep
    keeps only its `max_terms` largest weights.
    Batches are formed over length-sorted texts so that padding is small, on the encoder's device,
    under bf16 autocast where its weights are bf16 (see `inference_encoder`)."""
    from tqdm import tqdm

    encoder.eval()
    weight = next(encoder.parameters())
    device, half = weight.device, weight.dtype == torch.bfloat16
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len - 1)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    chunks: list = []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, mininterval=10):
        rows = order[start:start + batch_size]
        input_ids, mask = encode_inputs([ids[i] for i in rows], tokenizer.bos_token_id,
                                        tokenizer.pad_token_id, max_len)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
            reps = encoder(input_ids.to(device), mask.to(device)).float()
        chunks.append(encoder.paradigm.to_host(reps, max_terms))
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return encoder.paradigm.join(chunks, inverse)


def pruned_names(metrics: Mapping[str, float], max_terms: int) -> dict[str, float]:
    """`scifact/ndcg_10` → `scifact:top256/ndcg_10`: metrics of vectors pruned to `max_terms` terms."""
    return {f"{where}:top{max_terms}/{what}": value
            for key, value in metrics.items() for where, what in [key.split("/", 1)]}


def encoder_retriever(encoder: Encoder, tokenizer, batch_size: int, name: str = "cell",
                      store_root: Path | None = None, rank: int = 0, world: int = 1,
                      entropy: Mapping[str, Any] | None = None, max_terms: int | None = None,
                      eval_cfg: Mapping[str, Any] | None = None) -> EncoderRetriever:
    """An encoder (as `inference_encoder` prepares it) behind the retriever interface; its corpus
    encodings persist under `store_root` (see `EncoderRetriever`), stored and searched as `eval_cfg`
    says (`store_settings`). `max_terms`: what a step-0 evaluation keeps of each representation
    (`Paradigm.step0_max_terms`; `encode_texts`)."""
    def encode(texts: list[str], max_len: int, desc: str):
        return encode_texts(encoder, tokenizer, texts, max_len, batch_size, desc, max_terms)

    settings = store_settings(eval_cfg or {}, encoder.paradigm, encoder.backbone.config,
                              next(encoder.parameters()).device, step0=max_terms is not None)
    return EncoderRetriever(name, encode, encoder.paradigm, store_root, rank, world, entropy, settings)
