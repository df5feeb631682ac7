"""Checkpoint-then-requeue on SLURM's warning signal (time limit near, or preemption).

submitit binds the signal (USR2) to a handler that calls the job's `checkpoint()` and requeues it.
The signal can land anywhere inside a training step, and a DeepSpeed checkpoint saved from there
could catch the engine half-updated; so while training runs, our handler only records the signal.
The loop saves a checkpoint at the next step boundary and then hands the signal to submitit. Outside
training (evaluation), the signal goes to submitit at once: the cell restarts from its last checkpoint.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class DeferredRequeue:
    def __init__(self, signum: int = signal.SIGUSR2):
        self.signum = signum
        self.pending = False
        self.requeued = False  # set just before submitit requeues and exits
        self._training = False
        self._submitit_handler: Callable[..., Any] | None = None

    def install(self) -> None:
        """Wrap the handler submitit installed (none outside a submitit job: then nothing changes)."""
        current = signal.getsignal(self.signum)
        if not callable(current) or getattr(current, "__self__", None) is self:
            return
        self._submitit_handler = current
        signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.warning("signal %d: checkpoint and requeue %s", signum,
                    "at the end of this step" if self._training else "now")
        if self._training:
            self.pending = True
        else:
            self._hand_over(signum, frame)

    def _hand_over(self, signum: int, frame: Any) -> None:
        self.requeued = True
        assert self._submitit_handler is not None
        self._submitit_handler(signum, frame)  # requeues, then sys.exit(-1) on rank 0

    def training(self, active: bool) -> None:
        self._training = active

    def at_step_end(self, save_checkpoint: Callable[[], None], agree: Callable[[bool], bool]) -> None:
        """Call after every optimizer step. `agree` makes every rank see the signal at the same step
        (DeepSpeed's save is collective); `save_checkpoint` runs on all ranks before the requeue."""
        if not agree(self.pending):
            return
        save_checkpoint()
        self.pending = False
        if self._submitit_handler is not None:
            self._hand_over(self.signum, None)
        raise SystemExit(-1)  # ranks > 0: submitit's handler returns; the requeue stops the job anyway


REQUEUE = DeferredRequeue()
