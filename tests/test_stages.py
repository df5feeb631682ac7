"""Shared stages: built once, atomically; concurrent callers wait and reuse."""

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from retrieval_scaling.stages import build_once, is_built


def test_built_once_then_reused(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "x.txt").write_text("1")

    out = build_once(tmp_path / "stage", build, "test")
    assert build_once(tmp_path / "stage", build, "test") == out
    assert len(calls) == 1 and (out / "x.txt").read_text() == "1" and is_built(out)


def test_a_crash_mid_build_leaves_nothing_that_looks_built(tmp_path):
    def crash(tmp):
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "stage", crash, "test")
    assert not (tmp_path / "stage").exists()
    assert not any(p.name.startswith(".stage.tmp") for p in tmp_path.iterdir())


def _slow_build(path, log):
    def build(tmp):
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(1.0)
        (tmp / "done").write_text("ok")

    build_once(path, build, "test")


def test_concurrent_callers_build_once(tmp_path):
    log = tmp_path / "log.txt"
    procs = [mp.get_context("fork").Process(target=_slow_build, args=(tmp_path / "stage", log)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text().count("built") == 1
    assert (tmp_path / "stage" / "done").read_text() == "ok"


@pytest.mark.slow
def test_ranks_wait_for_a_long_shared_build_on_the_file_system_not_in_a_collective(tmp_path):
    """Three gloo ranks, a 20 s collective timeout. Another job holds the stage's lock for 60 s while it
    builds the stage, so rank 0 waits that long for it. With the product's wait the job finishes; with
    the decision taken in a collective (as before), ranks 1 and 2 time out after 20 s."""
    import socket
    import subprocess
    import sys
    import time

    from retrieval_scaling.stages import holding_lock, write_stage

    helper = Path(__file__).resolve().parent / "rank_waits.py"

    def start_job(mode: str) -> list[subprocess.Popen]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "3", "RS_COLLECTIVE_TIMEOUT_S": "20"}
        return [subprocess.Popen([sys.executable, str(helper), str(tmp_path / mode / "stage"), mode],
                                 env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for r in range(3)]

    started = time.monotonic()
    for mode in ("files", "collective"):
        (tmp_path / mode).mkdir()
    # the other job: holds both stages' locks for 60 s, then puts the stages in place
    with holding_lock(tmp_path / "files" / "stage"), holding_lock(tmp_path / "collective" / "stage"):
        jobs = {mode: start_job(mode) for mode in ("files", "collective")}
        time.sleep(60)
        for mode in jobs:
            write_stage(tmp_path / mode / "stage", lambda tmp: (tmp / "built").touch())
    out = {mode: [p.communicate(timeout=300) for p in procs] for mode, procs in jobs.items()}
    codes = {mode: [p.returncode for p in procs] for mode, procs in jobs.items()}
    assert codes["files"] == [0, 0, 0], [err[-1500:] for _, err in out["files"]]
    assert [o.strip() for o, _ in out["files"]] == ["done 0", "done 1", "done 2"]
    assert time.monotonic() - started >= 60
    # before: ranks 1 and 2 gave up in the collective after 20 s, and the job failed
    assert codes["collective"][1] != 0 and codes["collective"][2] != 0, codes
    assert any("timed out" in err.lower() or "timeout" in err.lower() for _, err in out["collective"][1:])
