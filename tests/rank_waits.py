"""One rank of a job whose rank 0 waits a long time on a shared stage another job is building:
`python tests/rank_waits.py <stage dir> files|collective`, with torch.distributed's rendezvous in the
environment and RS_COLLECTIVE_TIMEOUT_S set. `files`: the product's `build_once_collective` (ranks wait
for rank 0 on the file system); `collective`: the same decision taken through a collective, as before.
Ends with one collective, so the group is known to be whole, and prints 'done <rank>'."""

from __future__ import annotations

import sys
from pathlib import Path

from retrieval_scaling.distributed import any_rank, barrier, init_distributed
from retrieval_scaling.stages import build_once_collective, holding_lock, is_built


def never_called(tmp: Path) -> None:
    raise AssertionError("the other job built the stage: no rank builds it again")


def main() -> None:
    stage, mode = Path(sys.argv[1]), sys.argv[2]
    rank, _ = init_distributed()
    if mode == "files":
        build_once_collective(stage, never_called, "a stage another job builds")
    else:
        with holding_lock(stage, take=rank == 0):
            any_rank(rank == 0 and not is_built(stage))
    barrier()
    print(f"done {rank}", flush=True)


if __name__ == "__main__":
    main()
