"""Backbones: the tiny Llama family (pretrained here, once, by a cached stage) and any HF decoder.

A model config names its architecture shapes (so plans need no weights) and where weights come
from: `source: pretrain` (a tiny model built by `retrieval_scaling.pretrain`) or a hub id / local
directory given as `name_or_path`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .flops import FAMILIES, Architecture

log = logging.getLogger(__name__)

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def architecture(model_cfg: Mapping[str, Any]) -> Architecture:
    arch = model_cfg.get("arch")
    if not arch:
        raise ConfigError(f"model '{model_cfg.get('name')}' has no `arch` section (shapes needed for the plan)")
    family = arch.get("family", "llama")
    if family not in FAMILIES:
        raise ConfigError(f"model.arch.family={family!r} (model '{model_cfg.get('name')}') is not a supported "
                          f"decoder family: one of {', '.join(FAMILIES)} (the transformers model_type)")
    return Architecture(**arch)


def lora_params(model_cfg: Mapping[str, Any]) -> int:
    """The LoRA adapter's parameters over every decoder layer."""
    lora, arch = model_cfg["lora"], architecture(model_cfg)
    return arch.num_hidden_layers * arch.lora_params_per_layer(int(lora["r"]), tuple(lora["targets"]))


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE like Llama-3's (cased, no normaliser), trained on `texts` in about a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Llama-3 convention: BOS prepended by us, pad = EOS.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)


def decoder_config(arch: Architecture, **extra: Any):
    """A transformers config of these shapes in the architecture's family (`extra`: token ids, attention
    kernel, …): what a random-weight model of a plan's shapes is built from."""
    from transformers import AutoConfig

    return AutoConfig.for_model(arch.family, vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                                intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_hidden_layers,
                                num_attention_heads=arch.num_attention_heads,
                                num_key_value_heads=arch.num_key_value_heads, head_dim=arch.head_size,
                                tie_word_embeddings=arch.tie_word_embeddings, **extra)


# The model config's fields the plan's `arch` section must agree with, by `Architecture` field
CHECKED_SHAPES = {"family": "model_type", "hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers",
                  "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_key_value_heads",
                  "intermediate_size": "intermediate_size", "vocab_size": "vocab_size",
                  "tie_word_embeddings": "tie_word_embeddings"}


def check_shapes(model_cfg: Mapping[str, Any], config, where: str) -> None:
    """The weights at `where` are the architecture `model.arch` describes: plans, budgets and memory are
    priced from that section, so a mismatch would make every figure wrong. One error naming each."""
    arch = architecture(model_cfg)
    wrong = [f"{field} {getattr(config, attr, None)!r} (arch says {getattr(arch, field)!r})"
             for field, attr in CHECKED_SHAPES.items() if getattr(config, attr, None) != getattr(arch, field)]
    if wrong:
        raise ConfigError(f"model '{model_cfg.get('name')}': the weights at '{where}' have {'; '.join(wrong)}: fix "
                          "model.arch (the planner prices from it) or model.name_or_path")


def load_tokenizer(model_cfg: Mapping[str, Any], local_dir: Path | None = None):
    """The backbone's tokenizer alone, as `load_backbone` loads it (pad = EOS where it has no pad)."""
    from transformers import AutoTokenizer

    where = _backbone_source(model_cfg, local_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **_revision(model_cfg, local_dir))
    except OSError as exc:
        raise ConfigError(f"model '{model_cfg.get('name')}': cannot load the tokenizer of '{where}' ({exc}). Offline "
                          "machines need a local directory in model.name_or_path.") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _backbone_source(model_cfg: Mapping[str, Any], local_dir: Path | None) -> str:
    where = str(local_dir) if local_dir is not None else model_cfg.get("name_or_path")
    if not where:
        raise ConfigError(f"model '{model_cfg.get('name')}': set model.name_or_path (hub id or directory)")
    return where


def _revision(model_cfg: Mapping[str, Any], local_dir: Path | None) -> dict[str, str]:
    """The hub revision `prepare` fetched (`model.revision`), for a hub id; nothing for a directory."""
    revision = model_cfg.get("revision")
    return {"revision": revision} if revision and local_dir is None else {}


def load_backbone(model_cfg: Mapping[str, Any], local_dir: Path | None = None):
    """(model, tokenizer) for a `*ForCausalLM` backbone, with attention made bidirectional if asked."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_cfg, local_dir)
    where = _backbone_source(model_cfg, local_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, **_revision(model_cfg, local_dir), dtype=model_cfg.get("dtype", "float32"),
            attn_implementation=model_cfg.get("attn_implementation", "sdpa"),
        )
    except OSError as exc:
        raise ConfigError(
            f"model '{model_cfg.get('name')}': cannot load '{where}' ({exc}). Offline machines need a "
            "local directory in model.name_or_path."
        ) from None
    check_shapes(model_cfg, model.config, where)
    set_bidirectional(model, bool(model_cfg.get("bidirectional", False)))
    return model, tokenizer


def lora_config(model_cfg: Mapping[str, Any]):
    """The peft LoraConfig a model config names (MNTP trains it; retrieval fine-tuning continues it)."""
    from peft import LoraConfig

    lora = model_cfg["lora"]
    return LoraConfig(r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                      target_modules=list(lora["targets"]))


def lora_inputs_uncast(model, autocast: bool):
    """A context in which LoRA layers take their input as it comes, while bf16 autocast is on. peft
    casts a LoRA layer's bf16 input (o_proj's and down_proj's: the attention output, the MLP product)
    to its adapter's dtype (fp32) before the adapter's matmul, which autocast casts straight back to
    bf16: a lossless round trip (same values and gradients) that only copies activations, 2-6 % of a
    tiny training step. Without autocast it changes nothing."""
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model, active=autocast)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (one more forward per step, much less
    memory). Non-reentrant, so LoRA's gradients flow although the frozen embeddings need none."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_bidirectional(model, on: bool) -> None:
    """transformers ≥5 builds a padding-only mask and passes is_causal=False to the kernels when the
    config says so; setting it on attention modules alone is not enough (stays causal under eager). It is
    tested for each of `FAMILIES` (tests/test_families.py); another family may ignore it."""
    family = getattr(model.config, "model_type", None)
    if on and family not in FAMILIES:
        raise ConfigError(f"bidirectional attention is verified for {', '.join(FAMILIES)}, not for {family!r}: "
                          "add the family to flops.FAMILIES once its test passes, or set model.bidirectional=false")
    model.config.is_causal = not on


@contextmanager
def compiled_layers(encoder, on: bool) -> Iterator[None]:
    """Within the block, each decoder layer runs `torch.compile`d (inductor fuses the norms, rotary,
    softmax, LoRA's scale-and-add and autocast's casts that dominate a small model's step). Layers
    share one compiled graph per input shape, so compilation costs one layer's, not the model's; it
    is cached on disk (TORCHINDUCTOR_CACHE_DIR). In place, so parameter names, checkpoints and saved
    weights are those of an eager run; the layers are eager again afterwards (evaluation's shapes
    vary batch to batch and would recompile)."""
    layers = list(encoder.backbone.get_decoder().layers) if on else []
    for layer in layers:
        layer.compile()
    try:
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set; no public way to undo it
