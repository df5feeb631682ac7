"""Process setup for DeepSpeed on CPU: gloo, one thread per process, no run-time op compilation."""

from __future__ import annotations

import os
import sys


def configure_threads(threads: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Uses the environment's rendezvous when there is one (torchrun, SLURM via
    submitit); otherwise a single-rank gloo group over an in-memory store (no port to collide on)."""
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group("gloo")
        else:
            os.environ.setdefault("LOCAL_RANK", "0")
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    import deepspeed.comm.torch  # noqa: F401  (module to patch below)

    # DeepSpeed JIT-compiles a shared-memory comm op (30-45 s, needs g++/ninja) at every initialize
    # on CPU; gloo does not need it. `import deepspeed.comm.torch as m` yields torch itself, hence sys.modules.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return dist.get_rank(), dist.get_world_size()
