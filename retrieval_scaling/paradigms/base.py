"""The `Paradigm` strategy: the one place a representation's kind is known.

The defaults describe one vector per text scored by a dot product (what Lion-DS is); a paradigm
overrides what differs. Every cost method counts from shapes alone (`flops.Architecture`), so the planner
prices a paradigm without weights, and without torch: what needs torch is imported where it is used.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..store_format import KEY_BYTES, narrowed, store_dtype

if TYPE_CHECKING:
    import torch
    from torch import nn

FP32 = 4


@dataclass(frozen=True)
class HeadMemory:
    """Bytes a paradigm's head holds in a training step beyond the representations themselves (one rank):
    `kept` from the forward for the head's backward (and by gradient caching between its two encodings),
    `backward` at the peak of the head's backward, `graph` a micro-batch's graph keeps of the pooled
    output; `loss_copies` is how many copies of the gathered representations the loss holds, and `scores`
    what its scoring holds beyond the (queries, passages) score matrices."""

    kept: float = 0.0
    backward: float = 0.0
    graph: float = 0.0
    loss_copies: int = 1
    scores: float = 0.0


@dataclass(frozen=True)
class Shapes:
    """The shapes a paradigm's costs read, for an encoder that is not one of our backbones (a
    sentence-transformers baseline): its output's width."""

    hidden_size: int
    vocab_size: int = 0


class Paradigm:
    """How a cell represents texts. `temperature` divides the student scores in every loss."""

    name = "paradigm"

    def __init__(self, name: str | None = None, temperature: float = 1.0):
        self.name = name or type(self).name
        self.temperature = float(temperature)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, temperature={self.temperature:g})"

    # ---- the model ----

    def encoder(self, backbone: nn.Module) -> nn.Module:
        """An `encoders.Encoder` over `backbone` that pools as this paradigm does."""
        raise NotImplementedError

    def scores(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """(queries, passages): every query against every passage."""
        return q @ p.T

    def own_scores(self, q: torch.Tensor, p: torch.Tensor, group: int) -> torch.Tensor:
        """(B, G): each query against its own G passages (`p` grouped per query, the positive first)."""
        import torch  # here: the planner imports paradigms without torch

        return torch.einsum("bd,bgd->bg", q, p.view(q.shape[0], group, -1))

    def regularizer(self, q: torch.Tensor, p: torch.Tensor, step: int,
                    steps: int) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
        """(the term added to the loss at optimizer `step` of `steps`, its named parts to log)."""
        return 0.0, {}

    def train_metrics(self, q: torch.Tensor, p: torch.Tensor) -> dict[str, float]:
        """What training logs of a step's gathered representations, beside the loss."""
        return {}

    # ---- what it costs (shapes only) ----

    def head_flops(self, arch, tokens: int, train_embeddings: bool) -> dict[str, int]:
        """FLOP terms of the head over a training step's `tokens` (forward and backward)."""
        return {"lm_head": 0, "lm_head_weight_grad": 0}

    def pair_width(self, arch, query_len: int, passage_len: int) -> int:
        """Multiply-adds of scoring one (query, passage) pair: the similarity's FLOPs are 2× this forward."""
        return arch.hidden_size

    def encoding_flops_per_token(self, arch) -> int:
        """Forward FLOPs of the head per encoded token, at evaluation."""
        return 0

    def rep_width(self, arch, length: int) -> int:
        """Floats in one text's training representation, for a text padded to `length` tokens."""
        return arch.hidden_size

    def training_head(self, arch, shape, prec, head_trainable: bool) -> HeadMemory:
        """What the head holds in one rank's training step of `shape` (`memory.TrainShape`), in precision
        `prec` (`memory.Precision`)."""
        return HeadMemory()

    def encoding_buffers(self, arch, batch: int, length: int, compute_bytes: int) -> dict[str, float]:
        """Bytes by term the head adds to encoding one evaluation batch."""
        return {}

    def search_buffers(self, arch, eval_cfg: Mapping[str, Any], shard: int, block: int) -> dict[str, float]:
        """Bytes by term of one stored shard of `shard` documents on the GPU and `block` queries' scores
        against it (`shard_search.TorchSearch`)."""
        return {"search_scores": float(block * shard * (FP32 + 1)),  # the scores and the candidates' mask
                "search_shard": float(shard * arch.hidden_size * on_device_bytes(eval_cfg))}

    # ---- stored and searched ----

    def check_corpus(self, label: str, documents: int, tokens: float) -> None:
        """Refuse, with one clear error, a corpus of `documents` texts of `tokens` tokens this paradigm
        cannot evaluate exactly; the planner and the store both ask."""

    def step0_max_terms(self, eval_cfg: Mapping[str, Any]) -> int | None:
        """How much of a representation the step-0 evaluation keeps (None: all of it)."""
        return None

    def doc_bytes(self, arch, eval_cfg: Mapping[str, Any], mean_tokens: float, step0: bool = False) -> int:
        """What one document of `mean_tokens` tokens is planned to take in a store, its key included
        (`step0`: in the step-0 evaluation's store)."""
        return KEY_BYTES + arch.hidden_size * np.dtype(store_dtype(eval_cfg)).itemsize

    def to_host(self, reps: torch.Tensor, max_terms: int | None = None) -> Any:
        """One encoded batch on the host, in the form shards and searches take."""
        return reps.float().cpu().numpy()

    def join(self, chunks: Sequence[Any], order: np.ndarray) -> Any:
        """Batches' host representations as one, row `i` being `order[i]`'s."""
        return np.concatenate(chunks)[order]

    def take(self, reps: Any, rows: np.ndarray) -> Any:
        """The representations of `rows` (indices into `reps`), in order."""
        return reps[rows]

    def shard_arrays(self, reps: Any, dtype: str) -> dict[str, np.ndarray]:
        """A shard's representations as named arrays for its file, `dtype` the store's dtype."""
        return {"reps": np.ascontiguousarray(narrowed(reps, dtype))}

    def from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Any:
        """A shard's representations read back from its file's arrays."""
        return arrays["reps"]

    def stored_values(self, reps: Any) -> np.ndarray | None:
        """Values each stored row holds, where that varies from row to row (logged as `doc_nnz`); None
        where every row holds the same."""
        return None

    def query_stats(self, queries: Any) -> dict[str, float]:
        """What an evaluation logs of its encoded queries."""
        return {}

    def searcher(self, where: str, device: Any = "cpu"):
        """`eval.search`'s searcher of this paradigm's shards on the encoder's `device`."""
        from ..shard_search import shard_search  # torch

        return shard_search(where, device)

    def host_scores(self, queries: Any, docs: Any) -> np.ndarray:
        """Scores on the host, (queries, docs), float64: the contrastive entropy's."""
        return np.asarray(queries @ docs.T, dtype=np.float64)


def on_device_bytes(eval_cfg: Mapping[str, Any]) -> int:
    """Bytes a stored dense value takes on the device while searched: its 16-bit copy and the float32 one
    made from it, or the float32 value alone."""
    return (2 if store_dtype(eval_cfg) == "float16" else 0) + FP32


def paradigm_of(cfg: Mapping[str, Any]) -> Paradigm:
    """The paradigm a `paradigm` config group describes: its `_target_` class with the other keys."""
    target = cfg.get("_target_") or shipped_target(str(cfg.get("name")))
    module, _, attr = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"paradigm._target_={target!r} cannot be imported ({reason}); name a Paradigm class, "
                          "e.g. retrieval_scaling.paradigms.dense.Dense") from None
    if not (isinstance(cls, type) and issubclass(cls, Paradigm)):
        raise ConfigError(f"paradigm._target_={target!r} is not a Paradigm class (retrieval_scaling.paradigms)")
    settings = {k: v for k, v in cfg.items() if k != "_target_"}
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ConfigError(f"paradigm.{unknown[0]} is not a setting of the {settings.get('name')} paradigm "
                          f"({cls.__name__} takes {', '.join(accepted)}); remove it or fix its spelling")
    return cls(**settings)


def shipped_target(name: str) -> str | None:
    """The class `conf/paradigm/<name>.yaml` names: for a cell config written before paradigms had one."""
    path = Path(__file__).resolve().parents[2] / "conf" / "paradigm" / f"{name}.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(path).get("_target_")
