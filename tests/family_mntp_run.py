"""MNTP, the real stage, on a random-weight decoder of each family, in a fresh process as a stages job runs
it: `python tests/family_mntp_run.py <work dir> <data root>`. Prints one JSON line: for each family, the
steps the stage recorded and whether every LoRA matrix B moved from its zero start."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    work, data_root = Path(sys.argv[1]), Path(sys.argv[2])
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from retrieval_scaling.backbone import architecture, decoder_config, train_bpe_tokenizer
    from retrieval_scaling.data import load_collection
    from retrieval_scaling.distributed import configure_threads
    from retrieval_scaling.flops import FAMILIES
    from retrieval_scaling.mntp import ensure_mntp

    configure_threads(1)
    sci = load_collection(data_root, "scifact", "test")
    corpus = replace(sci, corpus=dict(list(sci.corpus.items())[:200]))
    tokenizer = train_bpe_tokenizer(list(corpus.corpus.values()), 512)
    out = {}
    for family in FAMILIES:
        arch = {"family": family, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": len(tokenizer),
                "tie_word_embeddings": family != "mistral", "head_dim": 8}
        repo = work / family
        torch.manual_seed(0)
        config = decoder_config(architecture({"arch": arch}), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        AutoModelForCausalLM.from_config(config).save_pretrained(repo)
        tokenizer.save_pretrained(repo)
        model_cfg = {"name": f"{family}_random", "source": "hub", "name_or_path": str(repo), "arch": arch,
                     "attn_implementation": "sdpa", "bidirectional": True, "dtype": "float32",
                     "mntp": {"seed": 1, "steps": 2, "batch_size": 2, "block_len": 32, "lr": 1e-3,
                              "mask_rate": 0.2, "mask_token": "_", "bf16": False, "checkpoint_every": 1},
                     "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj", "down_proj"]}}
        adapter = ensure_mntp(model_cfg, None, corpus, work / "cache")
        summary = json.loads((adapter / "mntp.json").read_text())
        weights = load_file(str(adapter / "adapter_model.safetensors"))
        b = [w for name, w in weights.items() if "lora_B" in name]
        out[family] = {"steps": summary["steps"], "lora_b": len(b), "moved": all(bool(w.abs().sum() > 0) for w in b)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
