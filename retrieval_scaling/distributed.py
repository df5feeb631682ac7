"""Process setup for DeepSpeed: NCCL on GPUs; on CPU gloo, a few threads per process and no run-time
op compilation; and the collectives training needs across ranks."""

from __future__ import annotations

import os
import sys

import torch


def configure_threads(threads: int) -> None:
    """The job's share of the cores, for torch and for the sparse search's numba kernels alike."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    except ImportError:  # pragma: no cover — a declared dependency
        pass


def launched_ranks() -> tuple[int, int]:
    """(rank, world size) as the launcher set them, before any process group exists."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def device() -> torch.device:
    """This rank's device: its local GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    """(rank, world size). A multi-task SLURM job (submitit) or torchrun gives the rendezvous;
    otherwise a single-rank group over an in-memory store (no port to collide on)."""
    import torch.distributed as dist

    gpu = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if gpu else "cpu")
    if not dist.is_initialized():
        if launched_ranks()[1] > 1 and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        backend = "nccl" if gpu else "gloo"
        if gpu:
            torch.cuda.set_device(device())
        if "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            os.environ.setdefault("LOCAL_RANK", "0")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    import deepspeed.comm.torch  # noqa: F401  (module to patch below)

    # DeepSpeed JIT-compiles a shared-memory comm op (30-45 s, needs g++/ninja) at every initialize
    # on CPU; gloo does not need it. `import deepspeed.comm.torch as m` yields torch itself, hence sys.modules.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return dist.get_rank(), dist.get_world_size()


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows in rank order, differentiable: each rank's gradient flows back to its own rows.
    Every rank then computes the same global loss, and DeepSpeed's gradient mean over ranks equals
    the single-rank gradient of that loss."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def barrier() -> None:
    """Every rank waits here until all have come (a no-op on one rank)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any."""
    if world_size() == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
