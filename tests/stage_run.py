"""Build a tiny backbone's stages (pretraining, then MNTP) in a fresh process, as a stages job does:
`python tests/stage_run.py <cache dir> <data root> [--die-after-checkpoints N]`. Prints one JSON line:
the stage directories and the devices every batch and weight of the stages' forwards were on."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache", type=Path)
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--die-after-checkpoints", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    from dataclasses import replace

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import retrieval_scaling.train as train_module
    from retrieval_scaling.cell_model import ensure_backbone
    from retrieval_scaling.data import load_collection
    from retrieval_scaling.distributed import configure_threads, device

    configure_threads(1)
    overrides = ["model=tiny_s", "model.pretrain.steps=6", "model.pretrain.checkpoint_every=3",
                 "model.mntp.steps=12", "model.mntp.checkpoint_every=4", "model.mntp.batch_size=4",
                 "model.pretrain.batch_size=4"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    sci = load_collection(args.data_root, "scifact", "test")
    corpus = replace(sci, corpus=dict(list(sci.corpus.items())[:400]))

    seen: set[str] = set()

    def record(module, inputs, kwargs):  # every forward of a decoder: its batch and its weights
        batch = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else inputs[0]
        seen.add(f"batch:{batch.device}")
        seen.add(f"weights:{next(module.parameters()).device}")

    from transformers.models.llama.modeling_llama import LlamaModel

    original_init = LlamaModel.__init__

    def init_with_hook(self, *a, **k):
        original_init(self, *a, **k)
        self.register_forward_pre_hook(record, with_kwargs=True)

    LlamaModel.__init__ = init_with_hook
    if args.die_after_checkpoints:  # SIGKILL right after the Nth MNTP checkpoint is on disk
        saved, real_save = [0], train_module.save_checkpoint

        def save_then_die(engine, ckpt_dir, state):
            real_save(engine, ckpt_dir, state)
            if "mntp" in str(ckpt_dir):
                saved[0] += 1
                if saved[0] == args.die_after_checkpoints:
                    os.kill(os.getpid(), signal.SIGKILL)

        train_module.save_checkpoint = save_then_die
    local_dir, adapter = ensure_backbone(cfg["model"], corpus, args.cache)
    print(json.dumps({"pretrained": str(local_dir), "adapter": str(adapter), "devices": sorted(seen),
                      "device": str(device()), "cuda": torch.cuda.is_available()}))


if __name__ == "__main__":
    main()
