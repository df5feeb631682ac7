"""The disk a sweep holds, and the encoding stores the sweep removes: exactly those no evaluation reads again."""

from pathlib import Path

from retrieval_scaling.disk import disk_line, remove_stale_stores, stale_stores, sweep_disk
from retrieval_scaling.identity import file_hash
from retrieval_scaling.layout import DONE, FINAL
from retrieval_scaling.stages import COMPLETE


def put(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def sweep_on_disk(root: Path) -> dict[str, Path]:
    """A sweep `s`: cell aaaaaaaa done, cell bbbbbbbb evaluating its final weights, and step-0 stores."""
    cache = root / ".cache"
    done, busy = root / "s" / "cells" / "aaaaaaaa", root / "s" / "cells" / "bbbbbbbb"
    put(done / DONE, 10)
    put(done / "config.yaml", 30)
    put(done / "checkpoints" / "step-8" / "model.pt", 1000)
    put(done / "runs" / "scifact.trec.gz", 200)
    put(done / "eval" / "final-0123" / "shard-1.npz", 5000)  # a finished evaluation's leftover
    put(busy / FINAL, 64)
    current = file_hash(busy / FINAL)
    put(busy / "eval" / f"final-{current}" / "shard-1.npz", 7000)  # being evaluated: resumes from it
    put(busy / "eval" / "final-feedbeef" / "shard-1.npz", 3000)  # of weights since replaced
    put(busy / "eval" / "step0-k1" / "shard-1.npz", 400)  # an older layout's store of a built step 0
    put(busy / "eval" / "step0-k2" / "shard-1.npz", 500)  # ... of a step 0 not built yet
    put(cache / "step0-evals" / "k1" / COMPLETE, 1)
    put(cache / "step0-evals" / "k1" / "metrics.json", 20)
    put(cache / "step0-evals" / "k1.encodings" / "shard-1.npz", 800)  # another cell finished k1
    put(cache / "step0-evals" / "k3.encodings" / "shard-1.npz", 900)  # k3 still being evaluated
    put(cache / "tokens" / "t.npy", 100)
    put(root / "s" / "plan.json", 40)
    return {"done": done, "busy": busy, "cache": cache, "current": busy / "eval" / f"final-{current}"}


def test_the_stale_stores_are_exactly_those_no_evaluation_reads_again(tmp_path):
    d = sweep_on_disk(tmp_path)
    want = {d["done"] / "eval" / "final-0123", d["busy"] / "eval" / "final-feedbeef",
            d["busy"] / "eval" / "step0-k1", d["cache"] / "step0-evals" / "k1.encodings"}
    assert set(stale_stores(tmp_path, "s", d["cache"])) == want
    before = sweep_disk(tmp_path, "s", d["cache"])
    # checkpoints 1000; encodings 5000 + 7000 + 3000 + 400 + 500 in cells, 800 + 900 in the cache; runs 200;
    # the rest of the sweep: DONE 10, config 30, FINAL 64, plan 40; the cache: COMPLETE 1, metrics 20, tokens 100
    assert before == {"checkpoints": 1000, "encodings": 17600, "runs": 200, "other": 144, "shared cache": 121}
    assert remove_stale_stores(tmp_path, "s", d["cache"]) == 5000 + 3000 + 400 + 800
    assert not any(p.exists() for p in want)
    assert d["current"].is_dir() and (d["busy"] / "eval" / "step0-k2").is_dir()
    assert (d["cache"] / "step0-evals" / "k3.encodings").is_dir() and (d["cache"] / "step0-evals" / "k1").is_dir()
    assert sweep_disk(tmp_path, "s", d["cache"])["encodings"] == 17600 - 9200
    assert stale_stores(tmp_path, "s", d["cache"]) == []


def test_a_done_cell_that_keeps_its_encodings_keeps_them(tmp_path):
    d = sweep_on_disk(tmp_path)
    (d["done"] / "config.yaml").write_text("eval:\n  keep_encodings: true\n")
    assert d["done"] / "eval" / "final-0123" not in stale_stores(tmp_path, "s", d["cache"])


def test_the_disk_line_names_every_kind():
    line = disk_line({"checkpoints": 2_500_000_000, "encodings": 1200, "runs": 0, "other": 5, "shared cache": 9e12})
    assert line == "disk: checkpoints 2.5 GB · encodings 1.2 KB · runs 0 B · other 5 B · shared cache 9 TB"
