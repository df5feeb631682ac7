"""What a stored representation takes, torch-free: the planner prices stores with it and `encodings` writes
them with it. A document's key; `eval.store_dtype`, the dense values' dtype on disk; the non-zeros a
trained sparse document is planned to take (`eval.planned_doc_terms`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from .config_checks import check_choice

log = logging.getLogger(__name__)

KEY_BYTES = 16
KEY = np.dtype(f"V{KEY_BYTES}")  # a key as one numpy item: sortable, searchable
STORE_DTYPES = {"float16": np.float16, "float32": np.float32}


PLANNED_DOC_TERMS = 512  # a trained sparse document's non-zeros, planned for (`eval.planned_doc_terms`)


def planned_doc_terms(eval_cfg: Mapping[str, Any]) -> int:
    """The non-zeros a trained sparse document is planned to take: disk checks, disk and memory plans."""
    return int(eval_cfg.get("planned_doc_terms") or PLANNED_DOC_TERMS)


def store_dtype(eval_cfg: Mapping[str, Any]) -> str:
    """`eval.store_dtype`, the dense vectors' dtype on disk (float16 unless set)."""
    return check_choice("eval.store_dtype", str(eval_cfg.get("store_dtype") or "float16"), tuple(STORE_DTYPES))


def narrowed(values: np.ndarray, store_dtype: str) -> np.ndarray:
    """`values` in the store's dtype, unless float16 would overflow a finite value: then float32."""
    values = np.asarray(values, dtype=np.float32)
    if store_dtype == "float32":
        return values
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    if np.isfinite(half).all() or not np.isfinite(values).all():
        return half
    log.warning("a shard's values reach %.3g, beyond float16: stored in float32", float(np.abs(values).max()))
    return values
