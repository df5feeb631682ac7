"""The shared stages under the cells' rules: on the cells' device, DeepSpeed, checkpoints that a killed
stage resumes from, and a streamed tokenization of the corpus."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def stage_env(rank: int = 0, world: int = 1, port: int = 0) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if world > 1:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    return env


def build_stages(cache: Path, data_root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tests" / "stage_run.py"), str(cache), str(data_root), *extra],
                          env=stage_env(), capture_output=True, text=True, timeout=900)


def adapter_weights(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


@pytest.mark.slow
def test_mntp_killed_after_a_checkpoint_resumes_and_ends_where_an_uninterrupted_run_does(tmp_path, data_root):
    whole = build_stages(tmp_path / "whole", data_root)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = json.loads(whole.stdout.strip().splitlines()[-1])
    # Stages ran on the device cells use: every decoder forward's batch and weights were there.
    assert out["devices"] == [f"batch:{out['device']}", f"weights:{out['device']}"]
    # The same pretrained backbone for the interrupted run, so that only MNTP is interrupted.
    shutil.copytree(tmp_path / "whole" / "backbones", tmp_path / "killed" / "backbones")
    killed = build_stages(tmp_path / "killed", data_root, "--die-after-checkpoints", "2")
    assert killed.returncode == -9  # SIGKILL after the checkpoint at step 8 of 12
    assert (tmp_path / "killed" / "mntp").is_dir() and not any((tmp_path / "killed" / "mntp").glob("*/.complete"))
    again = build_stages(tmp_path / "killed", data_root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"stage resumed from its checkpoint at step 8 of 12", again.stderr)
    resumed = json.loads(again.stdout.strip().splitlines()[-1])
    a, b = adapter_weights(Path(out["adapter"])), adapter_weights(Path(resumed["adapter"]))
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:  # the same batches and optimizer state from step 8 on: equal up to float rounding
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    assert not list((tmp_path / "killed" / "mntp").glob(".*.checkpoints"))  # dropped once the stage is complete
    summary = json.loads((Path(resumed["adapter"]) / "mntp.json").read_text())
    assert summary["steps"] == 12 and summary["predicted_tokens"] == json.loads(
        (Path(out["adapter"]) / "mntp.json").read_text())["predicted_tokens"]


def test_corpus_blocks_stream_the_corpus_into_bos_led_int32_blocks():
    from retrieval_scaling.pretrain import corpus_blocks

    class Tok:
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, texts, **_):
            return {"input_ids": [[10 + int(w) for w in t.split()] for t in texts]}

    texts = iter(["0 1 2", "3", "4 5 6 7", "8 9"])  # a generator: read once, in chunks
    blocks = corpus_blocks(Tok(), texts, block=4, chunk=3)
    # stream: 10 11 12 E 13 E 14 15 16 17 E 18 19 E -> 14 tokens -> 4 bodies of 3, remainder dropped
    assert blocks.dtype == torch.int32
    assert blocks.tolist() == [[1, 10, 11, 12], [1, 2, 13, 2], [1, 14, 15, 16], [1, 17, 2, 18]]


@pytest.mark.slow
def test_two_ranks_build_the_stages_together_once(tmp_path, data_root):
    """A stages job of two ranks (gloo): rank 0 holds the lock and writes, both train under one engine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "stage_run.py"), str(tmp_path / "cache"),
                               str(data_root)], env=stage_env(rank, 2, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0]["adapter"] == results[1]["adapter"] and results[0]["pretrained"] == results[1]["pretrained"]
    assert "over 2 ranks" in outs[0][1]  # built once, by both ranks together
    assert json.loads((Path(results[0]["adapter"]) / "mntp.json").read_text())["steps"] == 12
    assert len(list((tmp_path / "cache" / "mntp").iterdir())) == 2  # the stage and its lock; no rank's leftovers
