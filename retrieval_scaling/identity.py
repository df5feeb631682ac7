"""A cell's identity: a short hash of its resolved *semantic* config.

Everything keys off this one function: cell directories, MLflow runs, resubmission. Keys that only
change where or how a cell is run or logged are left out, so renaming a sweep or moving the data
root does not orphan finished work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# How a teacher batches, caches and computes, and its size for the planner: its scores do not change with them.
TEACHER_RUNTIME_KEYS = ("batch_size", "cache_size", "bf16", "params")
# How an evaluation runs, not its results.
EVAL_RUNTIME_KEYS = ("root", "shard_size", "batch_size", "keep_encodings", "store_dtype", "planned_doc_terms", "search")
# How a shared stage (pretraining, MNTP) runs, not what it builds.
STAGE_RUNTIME_KEYS = ("checkpoint_every", "gradient_checkpointing")
# Dotted paths that do not change what a cell computes.
NON_SEMANTIC = ("sweep", "launcher", "tracking", "log", "hydra", "grid_name", "data.root", "eval.root",
                "eval.shard_size", "eval.batch_size", "eval.keep_encodings", "eval.planned_doc_terms", "eval.search",
                # scores of 16-bit stored vectors: nDCG equal to float32's to 4 decimals (docs/evaluation.md)
                "eval.store_dtype",
                # the step-0 point's pruning: its metrics carry it in their names (scifact:top256/…)
                "eval.step0_max_terms",
                # its name carries K and the seed: a cell evaluated another way logs another metric
                "eval.contrastive_entropy",
                *(f"model.{stage}.{key}" for stage in ("pretrain", "mntp") for key in STAGE_RUNTIME_KEYS),
                "planner", "train.compile", "train.micro_batch", "deepspeed.zero_optimization.reduce_bucket_size",
                # how a teacher batches and caches (its scores do not change), wherever the teacher sits
                *(f"{where}.{key}" for where in ("teacher", "data.teacher") for key in TEACHER_RUNTIME_KEYS),
                # sources of values interpolated where they matter (sparse cells' paradigm)
                "flops_lambda", "sparse_temperature",
                # where a paradigm's code lives; its name and settings say what it computes
                "paradigm._target_")


def semantic_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a resolved config without the non-semantic keys."""
    out = json.loads(json.dumps(cfg, default=str))
    for dotted in NON_SEMANTIC:
        *parents, leaf = dotted.split(".")
        node = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def content_hash(obj: Any, length: int = 8) -> str:
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:length]


def cell_id(cfg: Mapping[str, Any]) -> str:
    """Same semantic config → same id; any semantic change → new id."""
    return content_hash(semantic_config(cfg))


def file_hash(path: Path) -> str:
    """A file's content hash: names the encodings of exactly these weights."""
    digest = hashlib.blake2b(digest_size=8)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
