"""Where a sweep lives on disk, and how its files are named, read and written.

`<sweep.root>/<sweep.name>/` holds plan.json, ledger.json, the sweep's lock, and `cells/<cell_id>/`
(config.yaml, checkpoints, DONE). Names that become directories are checked here, so that no name
reaches outside the sweeps root; files are written whole or not at all."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CELL_ID = re.compile(r"[0-9a-f]{8}")
DONE = "DONE"


def check_name(key: str, value: Any) -> str:
    """A sweep or experiment name: letters, digits, '.', '_', '-', starting with a letter or digit."""
    text = "" if value is None else str(value)
    if not NAME.fullmatch(text) or ".." in text:
        shown = text if len(text) <= 40 else f"{text[:40]}… ({len(text)} characters)"
        raise ConfigError(f"{key}={shown!r} is not a usable name: it names a directory under the sweeps root, so "
                          "use 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit (no '/', "
                          "no '..'), e.g. msmarco-full")
    return text


def check_cell_id(value: Any) -> str:
    text = "" if value is None else str(value)
    if not CELL_ID.fullmatch(text):
        raise ConfigError(f"cell={text!r} is not a cell id (8 hex digits, as `status` lists them)")
    return text


def sweep_dir(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / check_name("sweep.name", name)


def cell_path(root: str | os.PathLike, name: str, cell: str) -> Path:
    return sweep_dir(root, name) / "cells" / check_cell_id(cell)


def write_via(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` into a temporary sibling of `path` (same suffix: numpy and safetensors keep it), then
    rename it over `path`: a reader, a crash or a second writer never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{threading.get_ident()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: Path, text: str) -> None:
    """`text` written to `path` whole (flushed to disk before the rename)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_via(path, write)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2))


def read_json(path: Path, fix: str) -> Any:
    """A JSON file the project wrote; a damaged one is a DataError naming it and `fix`."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is damaged ({exc}); {fix}") from None


def read_done(path: Path) -> Mapping[str, Any]:
    """A cell's DONE marker: the metrics its evaluation ended with."""
    return read_json(path, "delete it and resubmit the cell, which then re-evaluates from its final checkpoint")


# --- the sweep's files ------------------------------------------------------------------------------

def plan_path(root: str | os.PathLike, name: str) -> Path:
    return sweep_dir(root, name) / "plan.json"


def ledger_path(root: str | os.PathLike, name: str) -> Path:
    return sweep_dir(root, name) / "ledger.json"


def faults_path(root: str | os.PathLike, name: str) -> Path:
    return sweep_dir(root, name) / "faults.json"


def curves_dir(root: str | os.PathLike, name: str) -> Path:
    """The scaling curves, fits and summary of a sweep (see `curves`)."""
    return sweep_dir(root, name) / "curves"


def predictions_dir(root: str | os.PathLike, name: str) -> Path:
    """Predictions stored before training, one `<cell>.json` each (see `predictions`)."""
    return sweep_dir(root, name) / "predictions"


def cell_dir(cfg: Mapping[str, Any]) -> Path:
    """A cell's directory, from its config: `<sweep.root>/<sweep.name>/cells/<cell_id>`."""
    from .identity import cell_id

    return cell_path(cfg["sweep"]["root"], cfg["sweep"]["name"], cell_id(cfg))


PER_QUERY = "per_query.json.gz"  # beside a cell's run files: every measure of every judged query


def run_artifacts(runs_dir: str | os.PathLike) -> list[Path]:
    """What an evaluation leaves in its runs directory for MLflow: the TREC run files and `PER_QUERY`."""
    return sorted(Path(runs_dir).glob("*.gz"))
FINAL = "final/trainable.safetensors"  # a finished cell's trained parameters (LoRA, trained embeddings)


# --- shared stages under sweep.cache_dir ------------------------------------------------------------
# Each stage's key holds what decides its content: its config (less the keys that only say how it runs),
# the content of the files it reads, and the version of the code that builds it. Bump a version when
# a change to that code changes what the stage contains, so that cached copies are built again.
STAGE_VERSIONS = {"training_data": 2, "bm25_index": 1, "passages": 1, "training_tokens": 1, "pretrain": 2,
                  "mntp": 2, "gguf": 1, "step0": 2}


def recipe_key(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A stage recipe as its cache key sees it."""
    from .identity import STAGE_RUNTIME_KEYS

    return {k: v for k, v in recipe.items() if k not in STAGE_RUNTIME_KEYS}


def training_data_dir(data_cfg: Mapping[str, Any], cache_root: Path) -> Path:
    """Mined negatives and teacher scores of a training collection."""
    from .data import data_fingerprint, training_spec
    from .identity import TEACHER_RUNTIME_KEYS, content_hash

    teacher = {k: v for k, v in data_cfg["teacher"].items() if k not in TEACHER_RUNTIME_KEYS}
    key = content_hash({**{k: data_cfg.get(k) for k in ("name", "source", "id", "split", "negatives")},
                        "teacher": teacher,
                        # other files under the same name (another data root, a new split) are other data
                        "files": data_fingerprint(training_spec(data_cfg), data_cfg.get("root")),
                        "code": STAGE_VERSIONS["training_data"]})
    return Path(cache_root) / "training" / f"{data_cfg['name']}-{data_cfg['split']}-{key}"


def bm25_index_dir(data_cfg: Mapping[str, Any], cache_root: Path, k1: float, b: float) -> Path:
    """The BM25 index of a training corpus: one per (corpus, BM25 settings), whatever its split or teacher."""
    from .data import data_fingerprint, training_spec
    from .identity import content_hash

    corpus = {r: f for r, f in data_fingerprint(training_spec(data_cfg), data_cfg.get("root")).items() if r == "corpus"}
    key = content_hash({**{k: data_cfg.get(k) for k in ("name", "source", "id")}, "files": corpus, "k1": k1, "b": b,
                        "code": STAGE_VERSIONS["bm25_index"]})
    return Path(cache_root) / "bm25" / f"{data_cfg['name']}-{key}"


def passages_dir(data_cfg: Mapping[str, Any], cache_root: Path) -> Path:
    """A training corpus's passages as memory-mapped arrays: one per corpus, whatever its split or teacher."""
    from .data import data_fingerprint, training_spec
    from .identity import content_hash

    corpus = {r: f for r, f in data_fingerprint(training_spec(data_cfg), data_cfg.get("root")).items() if r == "corpus"}
    key = content_hash({**{k: data_cfg.get(k) for k in ("name", "source", "id")}, "files": corpus,
                        "code": STAGE_VERSIONS["passages"]})
    return Path(cache_root) / "passages" / f"{data_cfg['name']}-{key}"


def training_tokens_dir(data_dir: Path, tokenizer: str, max_len: int, cache_root: Path) -> Path:
    """The training data's token arrays for one tokenizer (its content key) and maximum length."""
    from .identity import content_hash

    key = content_hash({"data": Path(data_dir).name, "tokenizer": tokenizer, "max_len": max_len,
                        "code": STAGE_VERSIONS["training_tokens"]})
    return Path(cache_root) / "tokens" / f"{Path(data_dir).name}-{key}"


def pretrained_dir(cache_root: Path, model_cfg: Mapping[str, Any], corpus: str) -> Path:
    """A tiny backbone pretrained for this (architecture, pretraining recipe, corpus)."""
    from .identity import content_hash

    key = content_hash({"arch": model_cfg["arch"], "pretrain": recipe_key(model_cfg["pretrain"]), "corpus": corpus,
                        "code": STAGE_VERSIONS["pretrain"]})
    return Path(cache_root) / "backbones" / f"{model_cfg['name']}-{corpus}-{key}"


def mntp_dir(cache_root: Path, model_cfg: Mapping[str, Any], corpus: str) -> Path:
    """A backbone's MNTP adapter."""
    from .identity import content_hash

    model = {k: v for k, v in model_cfg.items() if k not in ("recipe", "train_embeddings")}
    model["mntp"] = recipe_key(model["mntp"])
    if isinstance(model.get("pretrain"), Mapping):
        model["pretrain"] = recipe_key(model["pretrain"])
    key = content_hash({"model": model, "corpus": corpus, "code": STAGE_VERSIONS["mntp"]})
    return Path(cache_root) / "mntp" / f"{model_cfg['name']}-{corpus}-{key}"


def converted_dir(cache_root: Path, model_cfg: Mapping[str, Any]) -> Path:
    """A GGUF backbone converted to a Hugging Face directory."""
    from .identity import content_hash

    key = content_hash({"gguf": model_cfg["gguf"], "code": STAGE_VERSIONS["gguf"]})
    return Path(cache_root) / "backbones" / f"{model_cfg['name']}-gguf-{key}"


def step0_key(cfg: Mapping[str, Any], pruned: int | None = None) -> str:
    """The step-0 evaluation's key: what decides a (backbone, paradigm)'s untrained scores, `pruned` what
    it keeps of each representation (`Paradigm.step0_max_terms`; None: all)."""
    from .data import data_fingerprint
    from .identity import EVAL_RUNTIME_KEYS, content_hash

    eval_cfg = cfg["eval"]
    settings = {k: v for k, v in eval_cfg.items() if k not in (*EVAL_RUNTIME_KEYS, "step0_max_terms")}
    return content_hash({"model": cfg["model"], "paradigm": cfg["paradigm"]["name"], "data": cfg["data"]["name"],
                         "eval": settings,
                         **({"step0_max_terms": pruned} if pruned else {}),  # what a pruned step 0 keeps
                         # the test sets' files, not only their names: another data root may hold other ones
                         "files": {name: data_fingerprint(spec, eval_cfg.get("root"))
                                   for name, spec in eval_cfg["collections"].items()},
                         "code": STAGE_VERSIONS["step0"]})


def step0_dir(cfg: Mapping[str, Any], pruned: int | None = None) -> Path:
    return Path(cfg["sweep"]["cache_dir"]) / "step0-evals" / step0_key(cfg, pruned)


STEP0_STORE_SUFFIX = ".encodings"


def step0_store(cfg: Mapping[str, Any], pruned: int | None = None) -> Path:
    """The encodings of a step-0 evaluation until it is built: beside it, so that whichever cell takes
    the evaluation over (its first evaluator killed) resumes them, and the sweep finds them once done."""
    shared = step0_dir(cfg, pruned)
    return shared.with_name(shared.name + STEP0_STORE_SUFFIX)
