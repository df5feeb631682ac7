"""The training examples as token arrays, prepared once and memory-mapped by every rank of every cell.

One directory per (training data, tokenizer, maximum length), built by the first process that asks and
reused by all later ones: the token ids of every query and passage the examples name (one flat int32
array and its row offsets), and each example as rows and teacher scores (its query's row; its positives'
and hard negatives' rows and scores, in the examples' order). A cell's batch sampler indexes these
arrays, so no process tokenizes the training passages again or holds them as Python objects: a rank's
memory no longer grows with the number of training passages (MS MARCO: ~500k queries, ~8M passages).
Rows: the examples' queries first, in example order, then the passages in `passages.jsonl` order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ARRAYS = {"ids": np.int32, "offsets": np.int64, "query_row": np.int64, "pos_ptr": np.int64, "pos_row": np.int64,
          "pos_teacher": np.float32, "neg_ptr": np.int64, "neg_row": np.int64, "neg_teacher": np.float32}
TOKENIZE_CHUNK = 10_000  # texts per tokenizer call while building
VERSION = 1

TokenizeFn = Callable[[list[str]], list[list[int]]]


@dataclass
class TrainingTokens:
    """Token rows (`ids[offsets[r]:offsets[r + 1]]`) and the examples as rows and teacher scores."""

    ids: np.ndarray
    offsets: np.ndarray
    query_row: np.ndarray
    pos_ptr: np.ndarray
    pos_row: np.ndarray
    pos_teacher: np.ndarray
    neg_ptr: np.ndarray
    neg_row: np.ndarray
    neg_teacher: np.ndarray

    def row(self, r: int) -> list[int]:
        return self.ids[self.offsets[r]:self.offsets[r + 1]].tolist()

    @property
    def examples(self) -> int:
        return len(self.query_row)

    @classmethod
    def build(cls, examples: Iterable[Mapping[str, Any]], passages: Iterable[tuple[str, str]],
              tokenize: TokenizeFn) -> TrainingTokens:
        """From examples (`qid`, `query`, `positives`, `negatives`, `teacher`) and (id, text) passages."""
        parts: dict[str, list] = {name: [] for name in ARRAYS}
        queries, lengths, pos_n, neg_n, judged = [], [], [], [], []
        for ex in examples:
            queries.append(ex["query"])
            pos_n.append(len(ex["positives"]))
            neg_n.append(len(ex["negatives"]))
            judged.append(([*ex["positives"], *ex["negatives"]], [ex["teacher"][d] for d in
                                                                  (*ex["positives"], *ex["negatives"])]))
        row_of: dict[str, int] = {}
        ids_parts = []
        for texts, keys in _chunks(((q, None) for q in queries), ((t, d) for d, t in passages)):
            for key in keys:
                if key is not None:
                    row_of[key] = len(queries) + len(row_of)
            tokens = tokenize(texts)
            lengths.extend(len(t) for t in tokens)
            ids_parts.append(np.fromiter((i for t in tokens for i in t), dtype=np.int32))
        parts["ids"] = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int32)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)
        rows = [(np.array([row_of[d] for d in docs], dtype=np.int64), np.array(scores, dtype=np.float32))
                for docs, scores in judged]
        pos_n, neg_n = np.array(pos_n, dtype=np.int64), np.array(neg_n, dtype=np.int64)
        pos_rows = [r[:n] for (r, _), n in zip(rows, pos_n, strict=True)]
        neg_rows = [r[n:] for (r, _), n in zip(rows, pos_n, strict=True)]
        pos_scores = [s[:n] for (_, s), n in zip(rows, pos_n, strict=True)]
        neg_scores = [s[n:] for (_, s), n in zip(rows, pos_n, strict=True)]
        return cls(ids=parts["ids"], offsets=offsets, query_row=np.arange(len(queries), dtype=np.int64),
                   pos_ptr=_ptr(pos_n), pos_row=_cat(pos_rows, np.int64), pos_teacher=_cat(pos_scores, np.float32),
                   neg_ptr=_ptr(neg_n), neg_row=_cat(neg_rows, np.int64), neg_teacher=_cat(neg_scores, np.float32))

    def save(self, directory: Path) -> None:
        for name in ARRAYS:
            np.save(Path(directory) / f"{name}.npy", getattr(self, name))
        (Path(directory) / "tokens.json").write_text(json.dumps({
            "examples": self.examples, "rows": len(self.offsets) - 1, "tokens": len(self.ids), "version": VERSION}))

    @classmethod
    def load(cls, directory: Path) -> TrainingTokens:
        """Memory-mapped, read-only: the ranks of a node share one copy in the page cache."""
        return cls(**{name: np.load(Path(directory) / f"{name}.npy", mmap_mode="r") for name in ARRAYS})


def _chunks(*streams: Iterable[tuple[str, str | None]]) -> Iterator[tuple[list[str], list[str | None]]]:
    texts: list[str] = []
    keys: list[str | None] = []
    for stream in streams:
        for text, key in stream:
            texts.append(text)
            keys.append(key)
            if len(texts) == TOKENIZE_CHUNK:
                yield texts, keys
                texts, keys = [], []
    if texts:
        yield texts, keys


def _ptr(counts: np.ndarray) -> np.ndarray:
    ptr = np.zeros(len(counts) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(counts)
    return ptr


def _cat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)


def tokenizer_key(tokenizer) -> str:
    """A tokenizer's identity by content: its full serialised definition where it has one (a fast
    tokenizer), less the truncation and padding that its last call left set, else its vocabulary and
    special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        text = json.dumps({k: v for k, v in definition.items() if k not in ("truncation", "padding")}, sort_keys=True)
    else:
        text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.bos_token_id, tokenizer.pad_token_id])
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def hf_tokenize(tokenizer, max_len: int) -> TokenizeFn:
    """Texts → ids as the batch sampler reads them: no special tokens, truncated to `max_len - 1` (the
    sampler adds BOS)."""
    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len - 1)["input_ids"]
    return tokenize


def training_max_len(data_cfg: Mapping[str, Any]) -> int:
    """The length the token arrays are cut to: the longer of the query and passage lengths."""
    return max(int(data_cfg["query_max_len"]), int(data_cfg["passage_max_len"]))


def ensure_training_tokens(data_dir: Path, tokenizer, max_len: int, cache_root: Path) -> TrainingTokens:
    """The training data's token arrays for this tokenizer and length: built once (the first process to
    ask builds, the others wait on its lock), then memory-mapped."""
    from .errors import DataError
    from .layout import training_tokens_dir
    from .stages import build_once
    from .training_data import PASSAGES, iter_examples

    def build(tmp: Path) -> None:
        if not (Path(data_dir) / PASSAGES).is_file():
            raise DataError(f"{data_dir} has no {PASSAGES} (prepared by an older version): delete that directory "
                            "and the stages job prepares it again.")
        with (Path(data_dir) / PASSAGES).open(encoding="utf-8") as handle:
            passages = ((row["_id"], row["text"]) for row in map(json.loads, handle))
            TrainingTokens.build(iter_examples(data_dir), passages, hf_tokenize(tokenizer, max_len)).save(tmp)

    path = build_once(training_tokens_dir(data_dir, tokenizer_key(tokenizer), max_len, cache_root), build,
                      f"training tokens of {Path(data_dir).name}")
    return TrainingTokens.load(path)
