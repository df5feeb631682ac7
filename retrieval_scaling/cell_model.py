"""A cell's model: its backbone's shared stages (built once per backbone), the encoder built on them
with LoRA and the paradigm's head, and the trained parameters saved and loaded again."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .layout import FINAL, write_via

log = logging.getLogger(__name__)


def deepspeed_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The `deepspeed` group with the model's per-size overlay (`model.deepspeed`) merged over it."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(cfg["deepspeed"], cfg["model"].get("deepspeed") or {})
    return OmegaConf.to_container(merged, resolve=True)


def ensure_backbone(model_cfg: Mapping[str, Any], corpus, cache: Path,
                    ds_cfg: Mapping[str, Any] | None = None) -> tuple[Path | None, Path | None]:
    """The backbone's shared stages, built once: (pretrained tiny model dir or None, MNTP adapter or None);
    the training stages under DeepSpeed with `ds_cfg` (the cells' settings)."""
    from .gguf import ensure_converted
    from .mntp import ensure_mntp
    from .pretrain import ensure_pretrained

    source = model_cfg.get("source")
    if source == "pretrain":
        local_dir = ensure_pretrained(model_cfg, corpus, cache, ds_cfg)
    elif source == "gguf":
        local_dir = ensure_converted(model_cfg, cache)
    else:
        local_dir = None  # a hub id or local directory in model.name_or_path
    adapter = ensure_mntp(model_cfg, local_dir, corpus, cache, ds_cfg) if model_cfg.get("mntp") else None
    return local_dir, adapter


def stage_dirs(model_cfg: Mapping[str, Any], corpus: str, cache: Path) -> tuple[Path | None, Path | None]:
    """Where `ensure_backbone` put this backbone's stages (None where it has none); built or not."""
    from .layout import converted_dir, mntp_dir, pretrained_dir

    source = model_cfg.get("source")
    local_dir = (pretrained_dir(cache, model_cfg, corpus) if source == "pretrain"
                 else converted_dir(cache, model_cfg) if source == "gguf" else None)
    return local_dir, mntp_dir(cache, model_cfg, corpus) if model_cfg.get("mntp") else None


def build_cell_encoder(cfg: Mapping[str, Any], local_dir: Path | None, adapter: Path | None, trainable: bool = True):
    """(encoder, tokenizer): the backbone with LoRA (a new adapter, or the MNTP one continued), the
    tiny family's trainable embeddings, and the paradigm's pooling head."""
    from peft import PeftModel, get_peft_model

    from .backbone import enable_gradient_checkpointing, load_backbone, lora_config
    from .distributed import device
    from .paradigms import paradigm_of

    model_cfg = cfg["model"]
    backbone, tokenizer = load_backbone(model_cfg, local_dir)
    if adapter is not None:
        # Retrieval fine-tuning continues the MNTP adapter; it is not a new one.
        log.info("continuing MNTP adapter %s", adapter)
        backbone = PeftModel.from_pretrained(backbone, str(adapter), is_trainable=trainable)
    else:
        backbone = get_peft_model(backbone, lora_config(model_cfg))
    if model_cfg.get("train_embeddings"):
        # Tied: the LM head trains with them. See conf/model/_tiny_family.yaml for why.
        backbone.get_input_embeddings().weight.requires_grad_(True)
    if trainable and cfg["train"].get("gradient_checkpointing"):
        enable_gradient_checkpointing(backbone)
    return paradigm_of(cfg["paradigm"]).encoder(backbone).to(device()), tokenizer


def save_trainable(encoder, path: Path) -> None:
    """What training changed, alone: the parameters that require grad (the frozen backbone is the
    stage's). Written to a temporary name first, so a crash leaves no half file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().float().cpu().contiguous() for n, p in encoder.named_parameters() if p.requires_grad}
    write_via(path, lambda tmp: save_file(state, str(tmp)))


def load_trained_encoder(cell_cfg: Mapping[str, Any], out: Path):
    """(encoder, tokenizer) of a finished cell: its backbone stages from the sweep's cache and its
    trained parameters from `<cell>/final/`."""
    from safetensors.torch import load_file

    from .errors import UserError

    weights = out / FINAL
    if not weights.is_file():
        raise UserError(f"{weights} is missing: the cell finished before final weights were saved, or the "
                        "file was removed. Delete the cell's DONE marker and resubmit it to retrain.")
    cache = Path(cell_cfg["sweep"]["cache_dir"])
    local_dir, adapter = stage_dirs(cell_cfg["model"], cell_cfg["data"]["name"], cache)
    for d in (local_dir, adapter):
        if d is not None and not d.is_dir():
            raise UserError(f"backbone stage {d} is missing (sweep.cache_dir={cache}); run the evaluation from "
                            "the directory the sweep ran in, or rerun the sweep to rebuild its stages.")
    encoder, tokenizer = build_cell_encoder(cell_cfg, local_dir, adapter, trainable=False)
    state = load_file(str(weights))
    params = dict(encoder.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise UserError(f"{weights}: parameters {unknown[:3]} do not belong to this cell's model; the file is "
                        "not this cell's. Delete DONE and the final/ directory and resubmit the cell.")
    import torch

    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))
    return encoder.eval(), tokenizer
