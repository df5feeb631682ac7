"""FLOPs of one training step, counted from the cell's real shapes.

Convention (written in README "How FLOPs are counted" and logged as `flops_convention`):
- A matmul of (m×k)·(k×n) costs 2·m·k·n. Element-wise ops, norms, softmax and pooling are not counted.
- Frozen weights (base model, embeddings, tied LM head) cost forward 2·T·N plus the activation
  gradient 2·T·N — no weight gradient: ~4N per token, not 6N. The layer-0 q/k/v projections get no
  activation gradient when the embeddings are frozen (their input then needs none).
- LoRA weights cost forward + activation gradient + weight gradient: 6N per token.
- Attention scores and mixing cost 4·d·S² per layer and sequence forward, 8·d·S² backward.
- A paradigm's head is counted by the paradigm (`Paradigm.head_flops`). Sparse cells run the LM head
  over every position (2·T·d·V forward, 2·T·d·V backward), plus
  2·T·d·V for its weight gradient when the (tied) embeddings are trained. A dense cell's embedding
  gradient is a scatter-add of token rows: no matmul, not counted.
- The loss's similarity matrices cost 2·pairs·D forward and 4·pairs·D backward, D the multiply-adds of
  scoring one pair (`Paradigm.pair_width`: the vector's width for one vector per text): every query against
  every passage for in-batch losses (CL, CL+KD), plus each query against its own G passages for
  teacher losses (KD, CL+KD, KL).
- Gradient checkpointing recomputes every decoder layer's forward in backward. Those are hardware
  FLOPs, not model FLOPs: reported as `recompute` and `hardware_total`, never charged to the budget.
  (An upper bound by < 0.3 %: non-reentrant recomputation skips each layer's last LoRA matmul.)
- Tokens are counted padded: training batches are padded to the configured maximum lengths, so the
  FLOPs of a step are a constant of the cell and the budget is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

CONVENTION = ("lora-aware-4N+6N_lora+attn(4/8)dS2+sparse-head+similarity;padded-tokens;matmul=2mkn;"
              "recompute=hardware-only")

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# Decoder families whose attention is made bidirectional, MNTP-trained and pooled by both heads, by their
# transformers `model_type`: each is Llama's layer plus, at most, a few parameters no matmul touches.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Architecture:
    """The shapes of a decoder of one of the `FAMILIES` that matter for parameters and FLOPs."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = True
    head_dim: int | None = None
    family: str = "llama"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear in one decoder layer."""
        d, hd = self.hidden_size, self.head_size
        q_out, kv_out = self.num_attention_heads * hd, self.num_key_value_heads * hd
        f = self.intermediate_size
        return {
            "q_proj": (d, q_out),
            "k_proj": (d, kv_out),
            "v_proj": (d, kv_out),
            "o_proj": (q_out, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }

    def linear_params_per_layer(self) -> int:
        return sum(i * o for i, o in self.projection_shapes().values())

    def extra_params_per_layer(self) -> int:
        """What the family adds to Llama's layer: Qwen2's q/k/v biases, Qwen3's q/k norms over a head."""
        q_out, kv_out = self.num_attention_heads * self.head_size, self.num_key_value_heads * self.head_size
        return {"qwen2": q_out + 2 * kv_out, "qwen3": 2 * self.head_size}.get(self.family, 0)

    def lora_params_per_layer(self, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
        shapes = self.projection_shapes()
        return sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)

    def params_total(self) -> int:
        """Base parameters (without LoRA): embeddings, LM head if untied, layers, norms."""
        d, v, layers = self.hidden_size, self.vocab_size, self.num_hidden_layers
        embeddings = v * d * (1 if self.tie_word_embeddings else 2)
        per_layer = self.non_embedding_per_layer()
        return embeddings + layers * per_layer + d  # + final norm

    def params_non_embedding(self) -> int:
        return self.num_hidden_layers * self.non_embedding_per_layer()

    def non_embedding_per_layer(self) -> int:
        """Linear weights, the input and post-attention RMSNorms, and the family's extras."""
        return self.linear_params_per_layer() + 2 * self.hidden_size + self.extra_params_per_layer()


@dataclass(frozen=True)
class StepShape:
    """What one optimizer step processes (global, all ranks and micro-batches together)."""

    queries: int  # B_q
    passages_per_query: int  # G
    query_len: int  # padded length, BOS included
    passage_len: int
    in_batch: bool  # loss scores every query against every passage of the batch
    own_group: bool = False  # loss also scores each query against its own G passages (teacher losses)

    @property
    def passages(self) -> int:
        return self.queries * self.passages_per_query

    @property
    def tokens(self) -> int:
        return self.queries * self.query_len + self.passages * self.passage_len

    @property
    def sum_sq_len(self) -> int:
        return self.queries * self.query_len**2 + self.passages * self.passage_len**2


def step_flops(arch: Architecture, shape: StepShape, paradigm, lora_rank: int,
               lora_targets: tuple[str, ...] = LORA_TARGETS, train_embeddings: bool = False,
               gradient_checkpointing: bool = False) -> dict[str, int]:
    """Named FLOP terms of one step (forward + backward) of a `paradigm` (`paradigms.Paradigm`: its head's
    terms and what scoring a pair takes); `total` (model FLOPs, what budgets count) is their sum;
    `hardware_total` adds the gradient-checkpointing `recompute`."""
    layers, d = arch.num_hidden_layers, arch.hidden_size
    t, s2 = shape.tokens, shape.sum_sq_len
    shapes = arch.projection_shapes()
    n_lin = layers * arch.linear_params_per_layer()
    n_lora = layers * arch.lora_params_per_layer(lora_rank, lora_targets)
    first_qkv = ("q_proj", "k_proj", "v_proj")
    # Frozen embeddings: layer 0's input needs no gradient, so its q/k/v projections (frozen and
    # LoRA's A-path) compute no activation gradient. Trained embeddings need it.
    n_qkv0 = 0 if train_embeddings else sum(i * o for name, (i, o) in shapes.items() if name in first_qkv)
    lora_qkv0_input = 0 if train_embeddings else sum(lora_rank * shapes[n][0] for n in first_qkv
                                                     if n in lora_targets)

    width = paradigm.pair_width(arch, shape.query_len, shape.passage_len)
    pairs = shape.queries * ((shape.passages if shape.in_batch else 0)
                             + (shape.passages_per_query if shape.own_group or not shape.in_batch else 0))
    terms = {
        "frozen_forward": 2 * t * n_lin,
        "frozen_backward": 2 * t * (n_lin - n_qkv0),
        "lora_forward": 2 * t * n_lora,
        "lora_backward": 4 * t * n_lora - 2 * t * lora_qkv0_input,
        "attention_forward": 4 * layers * d * s2,
        "attention_backward": 8 * layers * d * s2,
        **paradigm.head_flops(arch, t, train_embeddings),
        "similarity": (2 + 4) * pairs * width,
    }
    terms["total"] = sum(terms.values())
    layer_forward = terms["frozen_forward"] + terms["lora_forward"] + terms["attention_forward"]
    terms["recompute"] = layer_forward if gradient_checkpointing else 0
    terms["hardware_total"] = terms["total"] + terms["recompute"]
    return terms
