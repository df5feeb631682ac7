"""What a running cell reports besides its metrics: a heartbeat and system metrics from background
threads, and the null run that ranks other than 0 log to."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


class NullRun:
    """What ranks > 0 log to: nothing (rank 0 alone owns the MLflow run)."""

    run_id = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_new_metrics(self, metrics: Mapping[str, float], step: int) -> None:
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
    seconds into the cell's run; step numbering continues across attempts. `every_s` ≤ 0 turns it off.

    MLflow's collectors take the samples, but our thread logs them, through the run's retrying client:
    MLflow's own loop stops for good at its first failed call to the store, so a tracking server that
    restarts mid-cell would end the cell's system metrics; here a sample that cannot be logged is
    dropped with a warning, and the next one is logged once the store answers again."""

    NAME = "system/cpu_utilization_percentage"  # where the step numbering resumes from

    def __init__(self, run, uri: str, every_s: float):
        self.run, self.every_s, self.sampler = run, every_s, None
        if every_s > 0 and run.run_id is not None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.sampler = SystemMetricsMonitor(run.run_id, sampling_interval=every_s, resume_logging=False,
                                                tracking_uri=uri)  # its own logger, unused, opens this store
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._sample, name="system-metrics", daemon=True)
        self.logged = 0  # samples logged by this process: what tests count

    def next_step(self) -> int:
        try:
            history = self.run.client.get_metric_history(self.run.run_id, self.NAME)
        except Exception as exc:  # noqa: BLE001 — a store down at start: count from 0, the metrics still go
            log.warning("system metrics: could not read the last step (%s); counting from 0", exc)
            return 0
        return max((m.step for m in history), default=-1) + 1

    def _sample(self) -> None:
        step = self.next_step()
        while not self.stop_event.wait(self.every_s):
            self.sampler.collect_metrics()
            metrics = {f"system/{k}": float(v) for k, v in self.sampler.aggregate_metrics().items()}
            for monitor in self.sampler.monitors:
                monitor.clear_metrics()
            try:
                self.run.log_metrics(metrics, step=step)
            except Exception as exc:  # noqa: BLE001 — a lost sample must not kill the cell
                log.warning("system metrics at step %d not logged (%s); sampling goes on", step, exc)
                continue
            step += 1
            self.logged += 1

    def __enter__(self) -> SystemMetrics:
        if self.sampler is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout=60)  # its last sample logged before the run is terminated
