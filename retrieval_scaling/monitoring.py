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
