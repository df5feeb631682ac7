"""What a cell holds per GPU at its peak, from its config alone: each stage's bytes by term.

Terms, per rank: the frozen weights (in `model.dtype`; ZeRO-3 shards them), autocast's bf16 copies of
fp32 weights that a forward with a graph keeps for backward, the trainable state (fp32 LoRA and any
trained embeddings, their gradients, DeepSpeed's gradient bucket, its fp32 master partition and Adam's
two moments), the activations autograd keeps for one forward (a micro-batch's, or the whole share's),
the sparse head's vocabulary scores (a chunk of logits, the pooled (N, V) representations, the gathered
ones and their gradients), and a backward's transient buffers. What autograd keeps per token and layer
is `SAVED_PER_TOKEN` below, counted with saved-tensor hooks on Llama decoder layers with LoRA on every
projection (`python bench/memory_model.py --fit`; a test recounts one shape). Not modelled: the CUDA
context, NCCL's buffers and the allocator's slack, which the planner adds as `planner.memory_overhead_gb`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .backbone import architecture, lora_params
from .paradigms import paradigm_of

GB = 1e9
FP32, BF16 = 4, 2

# Bytes autograd keeps per token for one decoder layer with LoRA on all seven projections, fp32 frozen
# weights, no dropout: (per hidden unit, per MLP unit, per key/value unit, per head × sequence position).
SAVED_PER_TOKEN = {("sdpa", True): (22.17, 8.17, 4.24, 0.0), ("sdpa", False): (24.28, 16.32, 8.49, 0.0),
                   ("eager", True): (25.07, 7.89, 0.87, 7.49), ("eager", False): (30.18, 15.78, 1.70, 6.93)}
DROPOUT_PER_TOKEN = {True: (24.0, 2.0), False: (40.0, 4.0)}  # LoRA dropout's masks and outputs (d, I)
# per hidden unit under autocast, with bf16 weights: the norms' outputs are bf16 (no cast copies; dropout's
# masks and outputs in bf16), without dropout and with it
BF16_WEIGHTS_SAVING = {False: 6.0, True: 10.0}
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements; DeepSpeed's default `reduce_bucket_size`


@dataclass(frozen=True)
class Precision:
    """How a stage computes: bf16 autocast or not, and the frozen weights' bytes."""

    autocast: bool
    weight_bytes: int

    @property
    def compute_bytes(self) -> int:
        return BF16 if self.autocast else FP32


def saved_per_token_layer(arch, attention: str, prec: Precision, dropout: bool, length: int) -> float:
    """Bytes autograd keeps per token of one decoder layer (`SAVED_PER_TOKEN`)."""
    kind = "eager" if attention == "eager" else "sdpa"
    per_d, per_i, per_kv, per_hs = SAVED_PER_TOKEN[(kind, prec.autocast)]
    if dropout:
        extra_d, extra_i = DROPOUT_PER_TOKEN[prec.autocast]
        per_d, per_i = per_d + extra_d, per_i + extra_i
    if prec.autocast and prec.weight_bytes == BF16:
        per_d -= BF16_WEIGHTS_SAVING[dropout]
    kv = arch.num_key_value_heads * arch.head_size
    return (per_d * arch.hidden_size + per_i * arch.intermediate_size + per_kv * kv
            + per_hs * arch.num_attention_heads * length)


def trainable_state(trainable: int, world: int, zero_stage: int) -> dict[str, float]:
    """What training holds throughout: fp32 trainable parameters, their fp32 gradients (ZeRO-2: this
    rank's partition), the fp32 master partition and Adam's two moments (ZeRO-1 and up: partitioned)."""
    shard = world if zero_stage >= 1 else 1
    return {"trainable_params": FP32 * trainable / (world if zero_stage >= 3 else 1),
            "gradients": FP32 * trainable / (world if zero_stage >= 2 else 1),
            "optimizer": FP32 * 3 * trainable / shard}


def zero_settings(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """The cell's `zero_optimization` (the `deepspeed` group with the model's overlay)."""
    from .cell_model import deepspeed_config

    return deepspeed_config(cfg).get("zero_optimization") or {}


def gradient_bucket(zero: Mapping[str, Any]) -> float:
    """DeepSpeed's contiguous gradient bucket (ZeRO-2), allocated in each backward pass."""
    if int(zero.get("stage", 0)) < 2 or zero.get("contiguous_gradients") is False:
        return 0.0
    return float(FP32 * int(zero.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET)))


def decoder_activations(arch, tokens: int, length: int, attention: str, prec: Precision, dropout: bool,
                        checkpointing: bool) -> dict[str, float]:
    """One forward with a graph over `tokens` tokens (sequences of `length`) and its backward's peak;
    with checkpointing each layer keeps its input, in the frozen weights' dtype (the residual stream's)."""
    layer = saved_per_token_layer(arch, attention, prec, dropout, length) * tokens
    casts = BF16 * arch.linear_params_per_layer() if prec.autocast and prec.weight_bytes == FP32 else 0
    if checkpointing:  # each layer's input kept; one layer recomputed at a time in backward
        kept = arch.num_hidden_layers * tokens * arch.hidden_size * prec.weight_bytes + layer + casts
    else:
        kept = arch.num_hidden_layers * (layer + casts)
    # backward: the gradient flowing through a layer and one MLP-wide gradient, in fp32
    transient = FP32 * tokens * (2 * arch.hidden_size + 2 * arch.intermediate_size)
    return {"activations": kept, "backward_buffers": transient}


@dataclass(frozen=True)
class TrainShape:
    """One rank's share of a training step."""

    queries: int
    passages: int
    query_len: int
    passage_len: int
    world: int
    micro_batch: int | None
    in_batch: bool = True  # the loss scores every query against every passage of the gathered batch

    @property
    def whole(self) -> bool:
        return self.micro_batch is None or int(self.micro_batch) >= max(self.queries, self.passages)

    @property
    def texts(self) -> int:
        """Queries and passages on this rank."""
        return self.queries + self.passages

    @property
    def backward_rows(self) -> int:
        """Passages one backward pass goes through: the whole share, or a micro-batch."""
        return self.passages if self.whole else min(int(self.micro_batch), self.passages)

    def tokens_in_graph(self) -> int:
        """Tokens whose activations one forward keeps: the whole share, or the larger micro-batch."""
        if self.whole:
            return self.queries * self.query_len + self.passages * self.passage_len
        micro = int(self.micro_batch)
        return max(min(micro, self.queries) * self.query_len, min(micro, self.passages) * self.passage_len)


def train_shape(cfg: Mapping[str, Any], world: int, in_batch: bool = True) -> TrainShape:
    train = cfg["train"]
    queries = max(1, int(train["queries_per_step"]) // world)
    return TrainShape(queries, queries * int(train["passages_per_query"]), int(cfg["data"]["query_max_len"]),
                      int(cfg["data"]["passage_max_len"]), world, train.get("micro_batch"), in_batch)


def training_peak(cfg: Mapping[str, Any], world: int, prec: Precision, in_batch: bool = True) -> dict[str, float]:
    """Bytes by term of one rank at the peak of a training step of this cell, the largest of three
    moments: the loss (every representation and its gradient), a backward pass through the head (a
    graph's activations and the head's chunked gradient), and DeepSpeed's reduction of the gradients
    after the backward pass, into its bucket. `in_batch`: whether the loss scores every query against every
    passage of the gathered batch (the paradigm's scoring may hold what that takes)."""
    model, train = cfg["model"], cfg["train"]
    arch = architecture(model)
    shape = train_shape(cfg, world, in_batch)
    train_emb = bool(model.get("train_embeddings"))
    trainable = lora_params(model) + (arch.vocab_size * arch.hidden_size if train_emb else 0)
    zero = zero_settings(cfg)
    stage = int(zero.get("stage", 0))
    held = {"weights": frozen_weights(arch, prec, train_emb) / (world if stage >= 3 else 1),
            **trainable_state(trainable, world, stage)}
    paradigm = paradigm_of(cfg["paradigm"])
    # this rank's representations, fp32
    reps = FP32 * (shape.queries * paradigm.rep_width(arch, shape.query_len)
                   + shape.passages * paradigm.rep_width(arch, shape.passage_len))
    gathered = reps * world
    head = paradigm.training_head(arch, shape, prec, train_emb and arch.tie_word_embeddings)
    # the loss over every rank's representations: them (gathered copies when several ranks), their
    # gradient, and what the paradigm's loss holds beside them (sparse: the FLOPS regulariser's |x|)
    loss = gathered * head.loss_copies + (gathered if world > 1 else 0) + head.scores
    acts = decoder_activations(arch, shape.tokens_in_graph(), shape.passage_len,
                               str(model.get("attn_implementation") or "sdpa"), prec,
                               float(model["lora"].get("dropout") or 0) > 0,
                               bool(train.get("gradient_checkpointing")))
    if shape.whole and not train.get("gradient_checkpointing") and prec.autocast and prec.weight_bytes == FP32:
        # the query and the passage forwards each keep autocast's weight copies
        acts["activations"] += arch.num_hidden_layers * BF16 * arch.linear_params_per_layer()
    bucket = {"representations": reps + (gathered if world > 1 else 0), "gradient_bucket": gradient_bucket(zero)}
    if shape.whole:
        phases = [{**held, **acts, "representations": reps + head.kept + loss},
                  {**held, **acts, "representations": reps + head.kept, "vocabulary_scores": head.backward}]
    else:  # a micro-batch's graph also keeps its term weights' activation (input, output, mask)
        phases = [{**held, "representations": reps + head.kept + loss},
                  {**held, **acts, "representations": 2 * reps + head.kept + head.graph,
                   "vocabulary_scores": head.backward}]
        bucket["representations"] += reps + head.kept
    phases.append({**held, **bucket})
    return max(phases, key=lambda terms: sum(terms.values()))


def frozen_weights(arch, prec: Precision, train_embeddings: bool) -> float:
    """The frozen weights' bytes (trained embeddings are counted with the trainable state)."""
    return (arch.params_total() - (arch.vocab_size * arch.hidden_size if train_embeddings else 0)) * prec.weight_bytes


def evaluation_peak(cfg: Mapping[str, Any], prec: Precision) -> dict[str, float]:
    """Bytes by term at the larger of an evaluation's two peaks: encoding one batch of passages without a
    graph (LoRA merged into the weights), or searching one shard on the GPU beside those weights."""
    arch = architecture(cfg["model"])
    ev = cfg["eval"]
    batch, length = int(ev["batch_size"]), int(ev["passage_max_len"])
    tokens = batch * length
    c = prec.compute_bytes
    # one layer's live tensors: the residual stream and norm output, q/k/v/out, the MLP's three
    live = tokens * c * (4 * arch.hidden_size + 2 * arch.num_key_value_heads * arch.head_size
                         + 3 * arch.intermediate_size)
    weights = {"weights": float(arch.params_total() * prec.weight_bytes)}
    terms = {**weights, "activations": float(live)}
    terms.update(paradigm_of(cfg["paradigm"]).encoding_buffers(arch, batch, length, c))
    if str(ev.get("search") or "auto") == "host":
        return terms
    search = {**weights, **search_buffers(cfg, arch)}
    return search if sum(search.values()) > sum(terms.values()) else terms


def search_buffers(cfg: Mapping[str, Any], arch) -> dict[str, float]:
    """Bytes by term of searching one shard on the GPU (`shard_search.TorchSearch`), as the paradigm
    stores and searches it (`Paradigm.search_buffers`)."""
    from .shard_search import QUERY_BLOCK

    ev = cfg["eval"]
    return paradigm_of(cfg["paradigm"]).search_buffers(arch, ev, int(ev.get("shard_size") or 200_000), QUERY_BLOCK)


def mntp_peak(cfg: Mapping[str, Any], world: int, prec: Precision) -> dict[str, float]:
    """Bytes by term of one rank at its peak in an MNTP step (a LoRA stage over blocks of text; the LM
    head and its fp32 cross-entropy only at the predicted positions). {} for a backbone without one."""
    model = cfg["model"]
    recipe = model.get("mntp")
    if not recipe:
        return {}
    arch = architecture(model)
    batch, length = max(1, int(recipe["batch_size"]) // world), int(recipe["block_len"])
    tokens = batch * length
    zero = zero_settings(cfg)
    terms = {"weights": frozen_weights(arch, prec, False),
             **trainable_state(lora_params(model), world, int(zero.get("stage", 0)))}
    terms.update(decoder_activations(arch, tokens, length, str(model.get("attn_implementation") or "sdpa"), prec,
                                     float(model["lora"].get("dropout") or 0) > 0,
                                     bool(recipe.get("gradient_checkpointing"))))
    predicted = math.ceil(tokens * float(recipe["mask_rate"]))
    terms["vocabulary_scores"] = float(predicted * arch.vocab_size * (prec.compute_bytes + 3 * FP32))
    return {**terms, "gradient_bucket": gradient_bucket(zero)}


def gigabytes(terms: Mapping[str, float]) -> float:
    return sum(terms.values()) / GB
