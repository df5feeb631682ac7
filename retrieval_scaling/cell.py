"""One cell, end to end: prepare → backbone (+ LoRA) → evaluate at step 0 → train under the FLOP
budget → evaluate → DONE marker. Runs in its own process (submitit job)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .cli import setup_logging
from .faults import Faults
from .identity import cell_id, file_hash
from .layout import DONE, FINAL, cell_dir, faults_path, read_done, write_json, write_via
from .plan import plan_cell

log = logging.getLogger(__name__)

# Not logged as params: Hydra's own node, and the tracking URI (a server URI may carry credentials).
NOT_PARAMS = ("hydra", "tracking")


class Terminated(Exception):
    """SIGTERM (scancel, local kill): the run ends KILLED, not FAILED."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Terminated(f"signal {signum}")


class NullRun:
    """What ranks > 0 log to: nothing (rank 0 alone owns the MLflow run)."""

    run_id = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass


class Heartbeat:
    """A `heartbeat` metric (unix time) every few seconds from a background thread, through training
    and evaluation alike, so `status` can tell a live cell from one whose process vanished."""

    def __init__(self, run, every_s: float):
        self.run, self.every_s = run, every_s
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            now = time.time()
            try:  # step = the time too: MLflow's latest value is the highest step's, across attempts
                self.run.log_metrics({"heartbeat": now}, step=int(now))
            except Exception as exc:  # noqa: BLE001 — a missed beat must not kill the cell
                log.warning("heartbeat not logged: %s", exc)
            if self.stop_event.wait(self.every_s):
                return

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()


class SystemMetrics:
    """MLflow's system metrics (`system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes`,
    disk, network, and per-GPU utilisation and memory where pynvml sees GPUs) sampled every `every_s`
    seconds into the cell's run; step numbering continues across attempts. `every_s` ≤ 0 turns it off."""

    def __init__(self, run, uri: str, every_s: float):
        self.monitor = None
        if every_s > 0 and run.run_id is not None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run.run_id, sampling_interval=every_s, resume_logging=True,
                                                tracking_uri=uri)

    def __enter__(self) -> SystemMetrics:
        if self.monitor is not None:
            self.monitor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.monitor is not None:
            self.monitor.finish()  # flushes what was sampled; before the run is terminated


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
    """A cell run's tags: its axes, its sweep, a readable run name."""
    from .tracking import AXES

    tags = {axis: cfg[axis]["name"] for axis in AXES}
    return {**tags, "sweep": cfg["sweep"]["name"], "run_name": f"{tags['model']}-{tags['paradigm']}-{tags['loss']}"}


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
    from .tracking import CellRun, tracking_uri

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


def deepspeed_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The `deepspeed` group with the model's per-size overlay (`model.deepspeed`) merged over it."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(cfg["deepspeed"], cfg["model"].get("deepspeed") or {})
    return OmegaConf.to_container(merged, resolve=True)


def ensure_backbone(model_cfg: Mapping[str, Any], corpus, cache: Path,
                    ds_cfg: Mapping[str, Any] | None = None) -> tuple[Path | None, Path | None]:
    """The backbone's shared stages, built once: (pretrained tiny model dir or None, MNTP adapter or None);
    the training stages under DeepSpeed with `ds_cfg` (the cells' settings)."""
    from .gguf import ensure_converted
    from .mntp import ensure_mntp
    from .pretrain import ensure_pretrained

    source = model_cfg.get("source")
    if source == "pretrain":
        local_dir = ensure_pretrained(model_cfg, corpus, cache, ds_cfg)
    elif source == "gguf":
        local_dir = ensure_converted(model_cfg, cache)
    else:
        local_dir = None  # a hub id or local directory in model.name_or_path
    adapter = ensure_mntp(model_cfg, local_dir, corpus, cache, ds_cfg) if model_cfg.get("mntp") else None
    return local_dir, adapter


def stage_dirs(model_cfg: Mapping[str, Any], corpus: str, cache: Path) -> tuple[Path | None, Path | None]:
    """Where `ensure_backbone` put this backbone's stages (None where it has none); built or not."""
    from .layout import converted_dir, mntp_dir, pretrained_dir

    source = model_cfg.get("source")
    local_dir = (pretrained_dir(cache, model_cfg, corpus) if source == "pretrain"
                 else converted_dir(cache, model_cfg) if source == "gguf" else None)
    return local_dir, mntp_dir(cache, model_cfg, corpus) if model_cfg.get("mntp") else None


def build_cell_encoder(cfg: Mapping[str, Any], local_dir: Path | None, adapter: Path | None, trainable: bool = True):
    """(encoder, tokenizer): the backbone with LoRA (a new adapter, or the MNTP one continued), the
    tiny family's trainable embeddings, and the paradigm's pooling head."""
    from peft import PeftModel, get_peft_model

    from .backbone import enable_gradient_checkpointing, load_backbone, lora_config
    from .distributed import device
    from .encoders import build_encoder

    model_cfg = cfg["model"]
    backbone, tokenizer = load_backbone(model_cfg, local_dir)
    if adapter is not None:
        # Retrieval fine-tuning continues the MNTP adapter; it is not a new one.
        log.info("continuing MNTP adapter %s", adapter)
        backbone = PeftModel.from_pretrained(backbone, str(adapter), is_trainable=trainable)
    else:
        backbone = get_peft_model(backbone, lora_config(model_cfg))
    if model_cfg.get("train_embeddings"):
        # Tied: the LM head trains with them. See conf/model/_tiny_family.yaml for why.
        backbone.get_input_embeddings().weight.requires_grad_(True)
    if trainable and cfg["train"].get("gradient_checkpointing"):
        enable_gradient_checkpointing(backbone)
    return build_encoder(cfg["paradigm"]["name"], backbone).to(device()), tokenizer




def save_trainable(encoder, path: Path) -> None:
    """What training changed, alone: the parameters that require grad (the frozen backbone is the
    stage's). Written to a temporary name first, so a crash leaves no half file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().float().cpu().contiguous() for n, p in encoder.named_parameters() if p.requires_grad}
    write_via(path, lambda tmp: save_file(state, str(tmp)))


def load_trained_encoder(cell_cfg: Mapping[str, Any], out: Path):
    """(encoder, tokenizer) of a finished cell: its backbone stages from the sweep's cache and its
    trained parameters from `<cell>/final/`."""
    from safetensors.torch import load_file

    from .errors import UserError

    weights = out / FINAL
    if not weights.is_file():
        raise UserError(f"{weights} is missing: the cell finished before final weights were saved, or the "
                        "file was removed. Delete the cell's DONE marker and resubmit it to retrain.")
    cache = Path(cell_cfg["sweep"]["cache_dir"])
    local_dir, adapter = stage_dirs(cell_cfg["model"], cell_cfg["data"]["name"], cache)
    for d in (local_dir, adapter):
        if d is not None and not d.is_dir():
            raise UserError(f"backbone stage {d} is missing (sweep.cache_dir={cache}); run the evaluation from "
                            "the directory the sweep ran in, or rerun the sweep to rebuild its stages.")
    encoder, tokenizer = build_cell_encoder(cell_cfg, local_dir, adapter, trainable=False)
    state = load_file(str(weights))
    params = dict(encoder.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise UserError(f"{weights}: parameters {unknown[:3]} do not belong to this cell's model; the file is "
                        "not this cell's. Delete DONE and the final/ directory and resubmit the cell.")
    import torch

    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))
    return encoder.eval(), tokenizer


def _run_stages(cfg: dict[str, Any], cid: str, out: Path, run, rank: int) -> dict[str, float]:
    from hydra.utils import instantiate

    from .data import load_training_collection
    from .distributed import any_rank, barrier, init_distributed, world_size
    from .evaluation import encoder_retriever, evaluate_all, inference_encoder
    from .layout import step0_dir
    from .prepare import ensure_training_data, load_examples, load_passages
    from .stages import holding_lock, is_built, write_stage
    from .train import BatchSampler, train

    init_distributed()
    plan = plan_cell(cfg)
    run.log_params({k: plan[k] for k in PLAN_PARAMS})
    cache = Path(cfg["sweep"]["cache_dir"])
    data_cfg, model_cfg, eval_cfg = cfg["data"], cfg["model"], cfg["eval"]

    data_dir = ensure_training_data(data_cfg, cache)
    examples, passages = load_examples(data_dir), load_passages(data_dir)
    local_dir, adapter = stage_dirs(model_cfg, data_cfg["name"], cache)
    if passages is None or not all(is_built(d) for d in (local_dir, adapter) if d is not None):
        # Normally the sweep's stages job built these first; a cell run alone builds them itself.
        train_coll = load_training_collection(data_cfg)
        passages = passages or train_coll.corpus
        local_dir, adapter = ensure_backbone(model_cfg, train_coll, cache, deepspeed_config(cfg))
    for stage, directory in (("pretrain", local_dir), ("mntp", adapter)):
        if directory is not None and (directory / f"{stage}.json").is_file():  # not for hub/GGUF models
            summary = json.loads((directory / f"{stage}.json").read_text())
            run.log_params({f"{stage}.{k}": summary[k] for k in ("flops", "tokens", "steps", "seconds")})
    import torch

    torch.manual_seed(int(cfg["seed"]))  # LoRA's initialisation
    encoder, tokenizer = build_cell_encoder(cfg, local_dir, adapter)
    world = world_size()

    def evaluate_now(store_dir: Path, runs_dir: Path | None = None) -> dict[str, float]:
        """Every rank encodes and searches its share; rank 0 gets the metrics. The encodings persist
        in `store_dir` until the evaluation is done (a failed or requeued one resumes from them)."""
        inference = inference_encoder(encoder, eval_cfg["dtype"], model_cfg.get("eval_attn_implementation"))
        retriever = encoder_retriever(inference, tokenizer, int(eval_cfg["batch_size"]), f"cell-{cid}", store_dir,
                                      rank, world)
        metrics = evaluate_all(retriever, None, eval_cfg, runs_dir, rank)
        if rank == 0 and not eval_cfg.get("keep_encodings"):
            shutil.rmtree(store_dir, ignore_errors=True)
        return metrics

    # At step 0 LoRA's B is zero, so every loss's cell of a (model, paradigm) is the same model:
    # evaluate it once and share the result. Rank 0 holds the step-0 lock; all ranks evaluate if needed.
    shared = step0_dir(cfg)
    with holding_lock(shared, rank == 0):
        if any_rank(rank == 0 and not is_built(shared)):
            computed = evaluate_now(out / "eval" / f"step0-{shared.name}")
            if rank == 0:
                write_stage(shared, lambda tmp: (tmp / "metrics.json").write_text(json.dumps(computed)))
    if rank == 0:
        before = json.loads((shared / "metrics.json").read_text())
        run.log_metrics(before, step=0)
        log.info("step 0: %s", before)

    texts = {f"q:{e['qid']}": e["query"] for e in examples}
    texts.update({f"d:{d}": passages[d] for e in examples for d in (*e["positives"], *e["negatives"])})
    keys = list(texts)
    max_len = max(int(data_cfg["query_max_len"]), int(data_cfg["passage_max_len"]))
    ids = tokenizer([texts[k] for k in keys], add_special_tokens=False, truncation=True,
                    max_length=max_len - 1)["input_ids"]
    sampler = BatchSampler(examples, dict(zip(keys, ids, strict=True)), int(cfg["train"]["queries_per_step"]),
                           int(cfg["train"]["passages_per_query"]), int(cfg["seed"]),
                           int(data_cfg["query_max_len"]), int(data_cfg["passage_max_len"]),
                           tokenizer.bos_token_id, tokenizer.pad_token_id)
    loss_fn = instantiate({k: v for k, v in cfg["loss"].items() if k != "name"})
    # Compiled layers (train.compile) are cached with the sweep's other stages unless the user chose a place.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    encoder = train(encoder, loss_fn, sampler, plan["steps"], plan["flops_per_step"], plan["tokens_per_step"],
                    cfg["train"], cfg["paradigm"], deepspeed_config(cfg), out / "checkpoints",
                    int(cfg["log"]["every"]), run.log_metrics,
                    Faults(faults_path(cfg["sweep"]["root"], cfg["sweep"]["name"]), cid))
    if rank == 0:
        save_trainable(encoder, out / FINAL)
    barrier()  # the final weights are on disk before any rank fingerprints them
    after = evaluate_now(out / "eval" / f"final-{file_hash(out / FINAL)}", out / "runs")
    if rank != 0:
        return {}
    run.log_metrics(after, step=plan["steps"])
    for run_file in sorted((out / "runs").glob("*.trec.gz")):
        run.log_artifact(run_file, "runs")
    log.info("step %d: %s", plan["steps"], after)
    return after
