"""Process setup for DeepSpeed: NCCL on GPUs; on CPU gloo, a few threads per process and no run-time
op compilation; the collectives training needs across ranks; and waits that are not collectives.

A collective fails once it has waited the process group's timeout (NCCL's default: 10 minutes). Ranks
that may wait longer on each other (one rank builds a shared stage for an hour, or holds a lock another
job keeps; the last of an uneven split of shards) wait through the file system instead
(`wait_for_ranks`, `from_rank0`): marker files in a directory the ranks share, polled, with a log line
while they wait. The process group's timeout is the job's time limit unless the launcher sets one."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
TIMEOUT_ENV = "RS_COLLECTIVE_TIMEOUT_S"  # set by the job from the launcher (see `jobs.JobCall`)


def balanced_shards(n: int, shard_size: int, world: int) -> list[slice]:
    """`n` items (documents, queries) in shards of at most `shard_size`, their number a multiple of the
    ranks' and their sizes within one of each other: shard j goes to rank j mod world, so every rank has
    as much work as the others, give or take one item per shard, and the ranks finish together."""
    if n == 0:
        return []
    count = -(-n // max(1, shard_size))
    count = -(-count // world) * world
    bounds = [n * j // count for j in range(count + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]


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
            dist.init_process_group(backend, timeout=collective_timeout())
            _share_run_token()
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


def collective_timeout():
    """How long a collective may wait: $RS_COLLECTIVE_TIMEOUT_S, else torch's default for the backend."""
    from datetime import timedelta

    seconds = os.environ.get(TIMEOUT_ENV)
    return timedelta(seconds=float(seconds)) if seconds else None


# ---- waits through the file system --------------------------------------------------------------

_RUN: dict[str, Any] = {"token": None, "count": {}}
POLL_S, REPORT_EVERY_S = 0.5, 300.0


def _share_run_token() -> None:
    """One token per process group, from rank 0: markers of an earlier attempt never count in this one."""
    import torch.distributed as dist

    token = [f"{os.getpid()}-{time.time_ns()}"]
    dist.broadcast_object_list(token, src=0)
    _RUN["token"], _RUN["count"] = token[0], {}


def _marker_dir(directory: Path, name: str) -> Path:
    count = _RUN["count"][name] = _RUN["count"].get(name, 0) + 1
    return Path(directory) / ".rank-waits" / f"{_RUN['token']}-{name}-{count}"


def _wait_until(ready: Callable[[], bool], what: str) -> None:
    start = last = time.monotonic()
    while not ready():
        time.sleep(POLL_S)
        if time.monotonic() - last >= REPORT_EVERY_S:
            last = time.monotonic()
            log.info("rank %d still waiting for %s (%.0f s)", _rank(), what, last - start)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def wait_for_ranks(directory: Path, name: str) -> None:
    """Every rank waits here until all have come, however long that takes: each leaves a marker file in
    `directory` (shared by the ranks) and polls for the others'. A no-op on one rank."""
    if world_size() == 1:
        return
    here = _marker_dir(directory, name)
    here.mkdir(parents=True, exist_ok=True)
    (here / f"rank{_rank()}").touch()
    _wait_until(lambda: len(list(here.glob("rank*"))) >= world_size(), f"every rank at {name}")
    _leave(here)


def from_rank0(directory: Path, name: str, compute: Callable[[], Any]) -> Any:
    """`compute()` on rank 0, its (JSON) value on every rank: the others wait for it through the file
    system, so rank 0 may take as long as it needs (a lock another job holds, a build)."""
    if world_size() == 1:
        return compute()
    here = _marker_dir(directory, name)
    here.mkdir(parents=True, exist_ok=True)
    answer = here / "value.json"
    if _rank() == 0:
        tmp = answer.with_name(f".value.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"value": compute()}))
        os.replace(tmp, answer)  # whole or not at all: the others read it as soon as it is there
    else:
        _wait_until(answer.is_file, f"rank 0 at {name}")
    value = json.loads(answer.read_text())["value"]
    _leave(here)
    return value


def _leave(here: Path) -> None:
    """Mark this rank gone from a wait; the last to go removes the markers (and their directory once it
    is empty): every rank has stopped reading them by then."""
    import shutil

    (here / f"left{_rank()}").touch()
    if len(list(here.glob("left*"))) >= world_size():
        shutil.rmtree(here, ignore_errors=True)
        try:
            here.parent.rmdir()
        except OSError:  # another wait's markers are there
            pass
