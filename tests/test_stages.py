"""Shared stages: built once, atomically; concurrent callers wait and reuse."""

import multiprocessing as mp
import time

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
