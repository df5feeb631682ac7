"""Teachers for distillation: who scores a query's positives and mined negatives.

A teacher is a config choice (`teacher=bm25`, `teacher=cross_encoder teacher.name_or_path=...`); its
scores are computed once per (collection, split, miner, teacher) by the data preparation stage and
read by the KD losses as they are (MarginMSE margins; the CL+KD softmax at T=1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import ConfigError

# Scores of one query against some of the corpus's documents, in their order.
TeacherFn = Callable[[str, Sequence[str]], list[float]]


def cross_encoder_teacher(cfg: Mapping[str, Any], corpus: Mapping[str, str]) -> TeacherFn:
    """An HF sequence-classification model with one output: its logit for (query, passage)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .distributed import device
    from .precision import use_bf16

    where = cfg["name_or_path"]
    revision = {"revision": cfg["revision"]} if cfg.get("revision") else {}  # the one `prepare` fetched
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **revision)
        model = AutoModelForSequenceClassification.from_pretrained(where, **revision).eval()
    except OSError as exc:
        raise ConfigError(f"teacher.name_or_path={where!r} cannot be loaded ({exc}). Offline machines "
                          "need a local directory.") from None
    if model.config.num_labels != 1:
        raise ConfigError(f"teacher {where!r} has {model.config.num_labels} outputs; a cross-encoder teacher "
                          "gives one relevance logit per pair (num_labels=1).")
    max_len, batch = int(cfg["max_len"]), int(cfg["batch_size"])
    # On the job's accelerator, under bf16 autocast where it has it natively, as cells run.
    dev = device()
    model = model.to(dev)
    half = use_bf16(cfg.get("bf16", "auto"), dev, "teacher.bf16")

    @torch.no_grad()
    def score(query: str, doc_ids: Sequence[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(doc_ids), batch):
            chunk = doc_ids[start:start + batch]
            enc = tokenizer([query] * len(chunk), [corpus[d] for d in chunk], truncation="only_second",
                            max_length=max_len, padding=True, return_tensors="pt").to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=half):
                out.extend(model(**enc).logits[:, 0].float().tolist())
        return out

    return score


def sbert_teacher(cfg: Mapping[str, Any], corpus: Mapping[str, str]) -> TeacherFn:
    """A sentence-transformers bi-encoder: the inner product of its (normalised, for cosine models)
    query and passage embeddings."""
    from collections import OrderedDict

    import numpy as np

    from .retrievers import sbert_encode

    encode = sbert_encode(cfg["path"], int(cfg["batch_size"]), cfg.get("max_len"))
    # A passage's embedding does not depend on the query: keep the most recently used `cache_size` of
    # them. Mined negatives recur across queries (SciFact train: 27,570 judged pairs), and re-encoding them
    # was most of the teacher's cost; the bound keeps MS MARCO's 8.8M passages out of memory.
    cache: OrderedDict[str, np.ndarray] = OrderedDict()
    cache_size = max(int(cfg.get("cache_size") or 0), 1)

    def score(query: str, doc_ids: Sequence[str]) -> list[float]:
        new = list(dict.fromkeys(d for d in doc_ids if d not in cache))
        fresh = dict(zip(new, encode([corpus[d] for d in new], 0, "teacher passages"), strict=True)) if new else {}
        vectors = np.stack([fresh[d] if d in fresh else cache[d] for d in doc_ids])
        for d in doc_ids:
            if d in fresh:
                cache[d] = fresh[d]
            cache.move_to_end(d)
        while len(cache) > cache_size:
            cache.popitem(last=False)
        q = encode([query], 0, "teacher query")[0]
        return (vectors @ q).astype(float).tolist()

    return score


TEACHERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, str]], TeacherFn]] = {
    "cross_encoder": cross_encoder_teacher,
    "sbert": sbert_teacher,
}


def build_teacher(cfg: Mapping[str, Any], corpus: Mapping[str, str]) -> TeacherFn | None:
    """The teacher's scoring function, or None for BM25 (whose scores the miner already has)."""
    name = cfg["name"]
    if name == "bm25":
        return None
    if name not in TEACHERS:
        raise ConfigError(f"teacher={name!r} is not one of {['bm25', *TEACHERS]}")
    return TEACHERS[name](cfg, corpus)
