"""One cell, end to end: prepare → backbone (+ LoRA) → evaluate at step 0 → train under the FLOP
budget → evaluate → DONE marker. Runs in its own process (submitit job)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .cell_model import build_cell_encoder, deepspeed_config, ensure_backbone, save_trainable, stage_dirs
from .cli import setup_logging
from .faults import Faults
from .identity import cell_id, file_hash
from .layout import DONE, FINAL, cell_dir, faults_path, read_done, run_artifacts, write_json
from .monitoring import Heartbeat, NullRun, SystemMetrics
from .plan import plan_cell, taught_by

log = logging.getLogger(__name__)

# Not logged as params: Hydra's own node, and the tracking URI (a server URI may carry credentials).
NOT_PARAMS = ("hydra", "tracking")


class Terminated(Exception):
    """SIGTERM (scancel, local kill): the run ends KILLED, not FAILED."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Terminated(f"signal {signum}")


def slurm_job_id() -> str | None:
    """This process's SLURM job (`<array>_<task>` for array tasks), None outside SLURM."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")


def write_process_info(out: Path, attempt: int) -> None:
    """`process.json`: where this attempt runs (to find, debug or kill it)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": slurm_job_id(), "attempt": attempt,
            "started_at": time.time()}
    write_json(out / "process.json", info)


def cell_tags(cfg: Mapping[str, Any]) -> dict[str, str]:
    """A cell run's tags: its axes, its FLOP budget, the teacher its loss learns from ("none" for a loss
    that reads no teacher), its sweep, a readable run name."""
    from .tracking import AXES

    tags = {axis: cfg[axis]["name"] for axis in AXES}
    return {**tags, "teacher": taught_by(cfg), "sweep": cfg["sweep"]["name"],
            "budget": f"{float(cfg['budget']['flops']):.3g}",
            "run_name": f"{tags['model']}-{tags['paradigm']}-{tags['loss']}"}


def cell_params(cfg: Mapping[str, Any]) -> dict[str, str]:
    """A cell run's params: its resolved config, flattened, less NOT_PARAMS."""
    from .tracking import flatten

    return flatten({k: v for k, v in cfg.items() if k not in NOT_PARAMS})


PLAN_PARAMS = ("flops_per_step", "flops_budget", "budget_match", "steps", "flops_total", "hardware_flops_per_step",
               "tokens_per_step", "params_total", "params_trainable", "params_non_embedding", "flops_convention")


def run_cell(cfg: dict[str, Any]) -> dict[str, float]:
    """Run (or finish) one cell; returns its final metrics (rank 0; other ranks return {}).
    The MLflow run ends FINISHED after DONE, FAILED on an exception, KILLED on SIGTERM, and
    SCHEDULED while a requeued job waits to resume."""
    from .distributed import configure_threads, device, launched_ranks
    from .precision import resolved as resolved_precision
    from .requeue import REQUEUE
    from .tracking import CellRun
    from .tracking_client import tracking_uri

    setup_logging()
    configure_threads(int(cfg["launcher"]["threads_per_job"]))
    REQUEUE.install()
    rank, _ = launched_ranks()
    cid, out = cell_id(cfg), cell_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if (out / DONE).is_file():
        log.info("cell %s is done already", cid)
        return read_done(out / DONE)["metrics"]
    signal.signal(signal.SIGTERM, _on_sigterm)
    if rank != 0:
        _run_stages(cfg, cid, out, NullRun(), rank)
        return {}
    from omegaconf import OmegaConf

    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    sweep = cfg["sweep"]
    uri = tracking_uri(cfg["tracking"], sweep["root"])
    run = CellRun(uri, sweep["name"], cfg["tracking"]["artifacts"], cid, cell_tags(cfg), cell_params(cfg),
                  # per attempt: a resubmitted cell may run on another kind of node
                  attempt_tags={"slurm_job_id": slurm_job_id() or "", **resolved_precision(cfg, device())})
    write_process_info(out, run.attempt)
    run.log_artifact(out / "config.yaml")
    try:
        with Heartbeat(run, float(cfg["log"]["heartbeat_s"])), \
                SystemMetrics(run, uri, float(cfg["log"]["system_metrics_s"])):
            metrics = _run_stages(cfg, cid, out, run, rank)
    except BaseException as exc:
        if REQUEUE.requeued:  # submitit's exit after a requeue, or SLURM stopping the requeued job
            run.set_status("SCHEDULED")
        else:  # SIGTERM (scancel) → KILLED; an exception or exit → FAILED
            run.finish("KILLED" if isinstance(exc, Terminated) else "FAILED")
        raise
    write_json(out / DONE, {"cell_id": cid, "run_id": run.run_id, "metrics": metrics, "finished_at": time.time()})
    run.finish("FINISHED")
    return metrics


def _shared_inputs(cfg: Mapping[str, Any], run) -> tuple[Path, Path | None, Path | None]:
    """(training data dir, tiny backbone dir, MNTP adapter): the backbone's shared stages, built by the
    sweep's stages job, or here when the cell runs alone. Their compute is logged as params."""
    from .passages import training_collection
    from .stages import is_built
    from .training_data import ensure_training_data

    cache, data_cfg, model_cfg = Path(cfg["sweep"]["cache_dir"]), cfg["data"], cfg["model"]
    data_dir = ensure_training_data(data_cfg, cache)
    local_dir, adapter = stage_dirs(model_cfg, data_cfg["name"], cache)
    if not all(is_built(d) for d in (local_dir, adapter) if d is not None):
        local_dir, adapter = ensure_backbone(model_cfg, training_collection(data_cfg, cache), cache,
                                             deepspeed_config(cfg))
    for stage, directory in (("pretrain", local_dir), ("mntp", adapter)):
        if directory is not None and (directory / f"{stage}.json").is_file():  # not for hub/GGUF models
            summary = json.loads((directory / f"{stage}.json").read_text())
            run.log_params({f"{stage}.{k}": summary[k] for k in ("flops", "tokens", "steps", "seconds")})
    return data_dir, local_dir, adapter


class Evaluator:
    """The cell's evaluations: every rank encodes and searches its share, rank 0 gets the metrics. The
    encodings persist in `store_dir` until the evaluation is done (a failed or requeued one resumes)."""

    def __init__(self, cfg: Mapping[str, Any], cid: str, rank: int):
        from .distributed import world_size

        self.cfg, self.cid, self.rank, self.world = cfg, cid, rank, world_size()

    def __call__(self, encoder, tokenizer, store_dir: Path, runs_dir: Path | None = None,
                 max_terms: int | None = None) -> dict[str, float]:
        from .evaluation import entropy_spec, evaluate_all
        from .inference import encoder_retriever, inference_encoder

        eval_cfg = self.cfg["eval"]
        inference = inference_encoder(encoder, eval_cfg["dtype"], self.cfg["model"].get("eval_attn_implementation"))
        entropy = entropy_spec(eval_cfg, encoder.paradigm.temperature)
        retriever = encoder_retriever(inference, tokenizer, int(eval_cfg["batch_size"]), f"cell-{self.cid}",
                                      store_dir, self.rank, self.world, entropy, max_terms, eval_cfg)
        # each finished collection is kept beside the encodings it came from: a requeue skips it
        metrics = evaluate_all(retriever, None, eval_cfg, runs_dir, self.rank, store_dir / "collections")
        if self.rank == 0 and not eval_cfg.get("keep_encodings"):
            shutil.rmtree(store_dir, ignore_errors=True)
        return metrics

    def step0(self, encoder, tokenizer, out: Path) -> dict[str, float] | None:
        """At step 0 LoRA's B is zero, so every loss's cell of a (model, paradigm) is the same model:
        evaluated once and shared. Rank 0 holds the lock; all ranks evaluate when it is missing. An
        untrained head may weigh most of the vocabulary: the paradigm says how much of its vectors is kept
        (`Sparse.step0_max_terms`), and the metrics are named for it (`inference.pruned_names`)."""
        from .distributed import from_rank0
        from .inference import pruned_names
        from .layout import step0_dir, step0_store
        from .stages import holding_lock, is_built, write_stage

        pruned = encoder.paradigm.step0_max_terms(self.cfg["eval"])
        shared = step0_dir(self.cfg, pruned)
        # while another cell evaluates it (hours at the paper's size), rank 0 waits on the lock and the
        # other ranks on the file system for its word: no collective waits that long
        with holding_lock(shared, self.rank == 0):
            if from_rank0(shared.parent, f"step0-{shared.name}", lambda: not is_built(shared)):
                computed = self(encoder, tokenizer, step0_store(self.cfg, pruned), max_terms=pruned)
                if self.rank == 0:
                    computed = pruned_names(computed, pruned) if pruned else computed
                    write_stage(shared, lambda tmp: (tmp / "metrics.json").write_text(json.dumps(computed)))
        return json.loads((shared / "metrics.json").read_text()) if self.rank == 0 else None


def batch_sampler(cfg: Mapping[str, Any], data_dir: Path, tokenizer):
    """The training batches, from token arrays prepared once per (data, tokenizer, length) and
    memory-mapped: a pure function of (seed, step)."""
    from .train import BatchSampler
    from .training_tokens import ensure_training_tokens, training_max_len

    data_cfg = cfg["data"]
    tokens = ensure_training_tokens(data_dir, tokenizer, training_max_len(data_cfg), Path(cfg["sweep"]["cache_dir"]))
    return BatchSampler(tokens, int(cfg["train"]["queries_per_step"]), int(cfg["train"]["passages_per_query"]),
                        int(cfg["seed"]), int(data_cfg["query_max_len"]), int(data_cfg["passage_max_len"]),
                        tokenizer.bos_token_id, tokenizer.pad_token_id)


def _run_stages(cfg: dict[str, Any], cid: str, out: Path, run, rank: int) -> dict[str, float]:
    import torch
    from hydra.utils import instantiate

    from .distributed import barrier, init_distributed
    from .train import train

    init_distributed()
    plan = plan_cell(cfg)
    run.log_params({k: plan[k] for k in PLAN_PARAMS})
    data_dir, local_dir, adapter = _shared_inputs(cfg, run)
    torch.manual_seed(int(cfg["seed"]))  # LoRA's initialisation
    encoder, tokenizer = build_cell_encoder(cfg, local_dir, adapter)
    evaluate = Evaluator(cfg, cid, rank)
    before = evaluate.step0(encoder, tokenizer, out)
    if rank == 0:
        run.log_new_metrics(before, step=0)
        log.info("step 0: %s", before)
    loss_fn = instantiate({k: v for k, v in cfg["loss"].items() if k != "name"})
    # Compiled layers (train.compile) are cached with the sweep's other stages unless the user chose a place.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cfg["sweep"]["cache_dir"]) / "inductor"))
    encoder = train(encoder, loss_fn, batch_sampler(cfg, data_dir, tokenizer), plan["steps"],
                    plan["flops_per_step"], plan["tokens_per_step"], cfg["train"], encoder.paradigm,
                    deepspeed_config(cfg), out / "checkpoints", int(cfg["log"]["every"]), run.log_new_metrics,
                    Faults(faults_path(cfg["sweep"]["root"], cfg["sweep"]["name"]), cid))
    if rank == 0:
        save_trainable(encoder, out / FINAL)
    barrier()  # the final weights are on disk before any rank fingerprints them
    after = evaluate(encoder, tokenizer, out / "eval" / f"final-{file_hash(out / FINAL)}", out / "runs")
    if rank != 0:
        return {}
    run.log_new_metrics(after, step=plan["steps"])
    for run_file in run_artifacts(out / "runs"):
        run.log_artifact(run_file, "runs")
    log.info("step %d: %s", plan["steps"], after)
    return after
