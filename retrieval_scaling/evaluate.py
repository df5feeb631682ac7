"""`python -m retrieval_scaling.evaluate` — evaluate a finished cell or a baseline on any configured
collection:

    python -m retrieval_scaling.evaluate cell=<cell_id> [sweep.name=tiny] [eval=scifact]
    python -m retrieval_scaling.evaluate baseline=bm25 eval=beir_dir eval.path=<dir> eval.name=<name>
    python -m retrieval_scaling.evaluate baseline=sbert baseline.path=<sentence-transformers dir>

It prints a table, then as its last stdout line a JSON object of the metrics (`ndcg_10`, ... for one
collection; `<collection>/ndcg_10`, ... for several), and logs metrics and run files to MLflow: into the
cell's run, or a run of experiment `baselines`. The evaluation itself is `retrieval_scaling.evaluation`.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, UserError
from .evaluation import collection_specs, entropy_spec, evaluate_all
from .inference import encoder_retriever, inference_encoder
from .layout import run_artifacts
from .retrievers import EncoderRetriever, Retriever

log = logging.getLogger(__name__)


def compose_config(argv: Sequence[str]) -> dict[str, Any]:
    """conf/evaluate.yaml with the command line's overrides, resolved."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        try:
            return OmegaConf.to_container(compose("evaluate", overrides=list(argv)), resolve=True)
        except Exception as exc:  # Hydra's / omegaconf's own message names the bad override or missing value
            raise ConfigError(str(exc).splitlines()[0]) from None


def cell_retriever(cfg: Mapping[str, Any], cell: str) -> tuple[Retriever, dict[str, Any]]:
    """The trained encoder of a finished cell (its config and final weights, from the cell's directory)."""
    from omegaconf import OmegaConf

    from .cell_model import load_trained_encoder
    from .layout import DONE, cell_path

    out = cell_path(cfg["sweep"]["root"], cfg["sweep"]["name"], cell)
    if not (out / DONE).is_file():
        raise UserError(f"cell {cell} of sweep {cfg['sweep']['name']} is not finished ({out}/{DONE} is missing): "
                        "run or resubmit the sweep first, or check sweep.name / RS_SWEEPS_DIR.")
    cell_cfg = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"), resolve=True)
    encoder, tokenizer = load_trained_encoder(cell_cfg, out)
    encoder = inference_encoder(encoder, cfg["eval"]["dtype"], cell_cfg["model"].get("eval_attn_implementation"))
    from .identity import file_hash
    from .layout import FINAL

    # Encodings of these weights at this precision, kept in the cell's directory until the evaluation is
    # done: an interrupted `evaluate` resumes from them.
    store = out / "eval" / f"verb-{file_hash(out / FINAL)}-{cfg['eval']['dtype']}"
    entropy = entropy_spec(cfg["eval"], encoder.paradigm.temperature)
    return encoder_retriever(encoder, tokenizer, int(cfg["eval"]["batch_size"]), f"cell-{cell}", store,
                             entropy=entropy, eval_cfg=cfg["eval"]), cell_cfg


def print_table(metrics: Mapping[str, float], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    collections: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        coll, name = key.rsplit("/", 1)
        collections.setdefault(coll, {})[name] = value
    names = sorted({n for m in collections.values() for n in m})
    table.add_column("collection")
    for n in names:
        table.add_column(n, justify="right")
    for coll, values in collections.items():
        table.add_row(coll, *(f"{values[n]:.4f}" if n in values else "" for n in names))
    Console(file=sys.stdout, width=200).print(table)


def log_to_mlflow(cfg: Mapping[str, Any], metrics: Mapping[str, float], runs_dir: Path, cell: str | None) -> str:
    """Metrics and run files into the cell's own run, or a new run of experiment `baselines`."""
    import time

    from mlflow.entities import Metric

    from .tracking import KIND, ensure_experiment, find_cell_run, flatten, log_param_batches
    from .tracking_client import client, tracking_uri

    uri = tracking_uri(cfg["tracking"], cfg["sweep"]["root"])
    c = client(uri)
    if cell is not None:
        exp = c.get_experiment_by_name(cfg["sweep"]["name"])
        run = find_cell_run(c, exp.experiment_id, cell) if exp else None
        if run is None:
            raise UserError(f"cell {cell} has no MLflow run in experiment {cfg['sweep']['name']} at {uri}.")
        run_id = run.info.run_id  # at the cell's last training step, beside its own final metrics
        step = max((m.step for m in c.get_metric_history(run_id, "flops_spent")), default=0)
    else:
        exp_id = ensure_experiment(uri, "baselines", cfg["tracking"]["artifacts"])
        name = f"{cfg['baseline']['name']}-{'+'.join(s['name'] for s in collection_specs(cfg['eval']))}"
        run_id = c.create_run(exp_id, run_name=name, tags={KIND: "baseline", "baseline": cfg["baseline"]["name"]}
                              ).info.run_id
        log_param_batches(c, run_id, flatten({"baseline": cfg["baseline"],
                                              "eval": {k: v for k, v in cfg["eval"].items() if k != "root"}}))
        step = 0
    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
    for f in run_artifacts(runs_dir):
        c.log_artifact(run_id, str(f), artifact_path="runs")
    if cell is None:
        c.set_terminated(run_id, "FINISHED")
    return run_id


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import run_verb

    return run_verb(lambda: evaluate_verb(sys.argv[1:] if argv is None else argv))


def evaluate_verb(argv: Sequence[str]) -> int:
    import tempfile

    cfg = compose_config(argv)
    cell, baseline = cfg.get("cell"), cfg.get("baseline")
    if (cell is None) == (baseline is None):
        raise ConfigError("evaluate needs one of cell=<cell_id> or baseline=bm25|sbert.")
    if cell is not None:
        retriever, cell_cfg = cell_retriever(cfg, str(cell))
        title = f"cell {cell} ({cell_cfg['model']['name']}, {cell_cfg['paradigm']['name']}, {cell_cfg['loss']['name']})"
    else:
        from .retrievers import build_baseline

        retriever = build_baseline(baseline, cfg["eval"])
        title = f"baseline {retriever.name}"
    runs_dir = Path(cfg["runs_dir"]) if cfg.get("runs_dir") else Path(tempfile.mkdtemp(prefix="rs-runs-"))
    if isinstance(retriever, EncoderRetriever) and retriever.store_root is None:
        # One store for the whole run, so collections that share documents share their encodings.
        retriever.store_root = Path(tempfile.mkdtemp(prefix="rs-encodings-"))
    progress = retriever.store_root / "collections" if isinstance(retriever, EncoderRetriever) else None
    metrics = evaluate_all(retriever, None, cfg["eval"], runs_dir, progress=progress)
    if isinstance(retriever, EncoderRetriever) and (cell is None or not cfg["eval"].get("keep_encodings")):
        shutil.rmtree(retriever.store_root, ignore_errors=True)
    print_table(metrics, title)
    log.info("run files in %s", runs_dir)
    if cfg.get("track", True):
        run_id = log_to_mlflow(cfg, metrics, runs_dir, None if cell is None else str(cell))
        log.info("logged to MLflow run %s", run_id)
    single = len(collection_specs(cfg["eval"])) == 1
    out = {k.rsplit("/", 1)[1]: v for k, v in metrics.items()} if single else dict(metrics)
    sys.stdout.flush()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
