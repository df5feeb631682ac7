"""`prepare` fetches a sweep's inputs before the sweep, and the sweep's jobs read them offline.

The network is a local stand-in: a fake hub (an HTTP server answering huggingface_hub's requests, with a
gated repo) and an ir_datasets home the test builds. Nothing is downloaded from outside."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, build_dl19_ir_datasets_home
from fake_hub import FakeHub, tiny_cross_encoder_repo, tiny_llama_repo

TOKEN = "hf_fakeTOKEN0123456789secret"
LLAMA, CROSS_ENCODER = "rs-test/tiny-llama", "rs-test/tiny-cross-encoder"
TINY_S = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
          "intermediate_size": 176, "vocab_size": 4096, "tie_word_embeddings": True}
NOT_FETCHED = ("original/consolidated.00.pth", "pytorch_model.bin", "onnx/model.onnx")
# A cell whose backbone comes from the (fake) hub; data and evaluation are the local SciFact directory.
HUB_CELL = ["model=tiny_s", "model.source=hub", f"model.name_or_path={LLAMA}", "model.mntp.steps=10",
            "paradigm=dense", "loss=cl", "budget.flops=5e10", "sweep.name=hubcell",
            "eval.subset={queries:10,bm25_depth:10,seed:0}"]


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("hub")
    texts = [json.loads(line)["text"] for line in (data_root / "scifact" / "corpus.jsonl").open()][:3000]
    tiny_llama_repo(root / LLAMA, TINY_S, texts)
    tiny_cross_encoder_repo(root / CROSS_ENCODER, texts)
    for extra in NOT_FETCHED:  # as Meta's repos hold their original checkpoint, and others other formats
        (root / LLAMA / extra).parent.mkdir(parents=True, exist_ok=True)
        (root / LLAMA / extra).write_bytes(b"\0" * 200_000)
    return root


@pytest.fixture
def hub(hub_root):
    with FakeHub(hub_root, token=TOKEN, gated=(LLAMA,)) as server:
        yield server


def env_for(tmp_path, data_root, hub_url, token=True):
    env = {**os.environ, "RS_SWEEPS_DIR": str(tmp_path / "sweeps"), "RS_DATA_DIR": str(data_root),
           "MLFLOW_TRACKING_URI": "", "HF_ENDPOINT": hub_url, "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HOME": str(tmp_path / "user-hf-home")}  # the user's own cache: never what the jobs read
    env.pop("HF_TOKEN", None)
    return {**env, "HF_TOKEN": TOKEN} if token else env


def start(verb, *args, env):
    return subprocess.Popen([sys.executable, "-m", f"retrieval_scaling.{verb}", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(verb, *args, env, timeout=900):
    return subprocess.run([sys.executable, "-m", f"retrieval_scaling.{verb}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def inputs_of(tmp_path) -> Path:
    return tmp_path / "sweeps" / ".cache" / "inputs"


def assert_manifest_verifies(inputs: Path, hub: FakeHub, repos=(LLAMA,)) -> dict:
    """Every entry's files hash to what it records, and each hub repo's files are the hub's bytes."""
    manifest = json.loads((inputs / "manifest.json").read_text())
    for key, entry in manifest.items():
        base = Path(entry["path"]) if entry["kind"] == "local" else inputs / entry["path"]
        for rel, meta in entry["files"].items():
            data = (base / rel).read_bytes()
            assert len(data) == meta["size"] and hashlib.sha256(data).hexdigest() == meta["sha256"], (key, rel)
    for repo in repos:
        entry = manifest[f"hub:{repo}"]
        assert entry["commit"] == hub.commit(repo)
        loaded = {rel: hashlib.sha256(d).hexdigest() for rel, d in hub.files(repo).items() if rel not in NOT_FETCHED}
        assert loaded == {rel: m["sha256"] for rel, m in entry["files"].items()}  # and nothing else
    return manifest


def no_secret_under(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_an_unprepared_sweep_submits_nothing_then_prepare_fetches_and_the_sweep_runs_offline(
        tmp_path, data_root, hub):
    """A KD cell whose backbone and teacher come from the hub (the backbone gated) and whose test set is
    an ir_datasets id: the sweep stops before submitting, prepare fetches all three, then the sweep runs
    with the hub gone."""
    args = ["model=tiny_s", "model.source=hub", f"model.name_or_path={LLAMA}", "model.mntp.steps=10",
            "paradigm=dense", "loss=kd", "teacher=cross_encoder", f"teacher.name_or_path={CROSS_ENCODER}",
            "teacher.max_len=128", "budget.flops=5e10", "sweep.name=offline", "eval=dl19",
            "eval.collections.dl19.allow_missing_nonrelevant=true", "eval.subset={queries:10,bm25_depth:10,seed:0}"]
    env = env_for(tmp_path, data_root, hub.url)
    inputs, sweeps = inputs_of(tmp_path), tmp_path / "sweeps"
    build_dl19_ir_datasets_home(data_root, inputs / "ir_datasets")  # what ir_datasets would have downloaded

    proc = run("sweep", *args, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: 3 input(s) of this sweep are not prepared")
    for item in (f"hub {LLAMA} (model tiny_s): missing", f"hub {CROSS_ENCODER} (teacher cross_encoder): missing",
                 "ir_datasets msmarco-passage/trec-dl-2019/judged (eval dl19): missing",
                 "`python -m retrieval_scaling.prepare model=tiny_s"):
        assert item in line, line
    assert not (sweeps / "offline" / "ledger.json").exists() and not (sweeps / "offline" / "cells").exists()
    assert not any(m == "GET" and "/resolve/" in p for m, p, _ in hub.requests)  # the sweep fetched nothing

    proc = run("prepare", *args, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = assert_manifest_verifies(inputs, hub, repos=(LLAMA, CROSS_ENCODER))
    assert {k.split(":")[0] for k in manifest} == {"hub", "ir_datasets", "local"}  # local: SciFact, verified
    assert manifest["ir_datasets:msmarco-passage/trec-dl-2019/judged"]["path"] == "ir_datasets/msmarco-passage"
    assert TOKEN not in proc.stdout + proc.stderr
    assert all(auth == f"Bearer {TOKEN}" for _, p, auth in hub.requests if LLAMA in p)  # the environment's token

    hub.__exit__()  # no network from here on: the sweep and its jobs read the prepared caches
    offline = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}
    offline.pop("HF_TOKEN")
    proc = run("sweep", *args, env=offline)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (cell,) = json.loads((sweeps / "offline" / "plan.json").read_text())
    done = json.loads((sweeps / "offline" / "cells" / cell["cell_id"] / "DONE").read_text())
    assert "dl19:q10-bm25_10/ndcg_10" in done["metrics"]
    assert not (tmp_path / "user-hf-home").exists()  # nothing read or wrote the user's own hub cache
    no_secret_under(sweeps)


def test_prepare_killed_midway_then_run_again_ends_with_a_complete_verified_manifest(tmp_path, data_root, hub):
    env = env_for(tmp_path, data_root, hub.url)
    inputs = inputs_of(tmp_path)
    hub.seconds_per_chunk = 0.05  # the weights (~1.5 MB) take about a second
    proc = start("prepare", *HUB_CELL, env=env)
    blobs = inputs / "hub" / f"models--{LLAMA.replace('/', '--')}" / "blobs"
    deadline = time.monotonic() + 120
    while not list(blobs.glob("*.incomplete")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert list(blobs.glob("*.incomplete")), proc.kill() or proc.communicate()[1][-3000:]
    proc.kill()  # mid-download, as a lost login session
    proc.wait()
    manifest = inputs / "manifest.json"
    assert not manifest.exists() or f"hub:{LLAMA}" not in json.loads(manifest.read_text())  # no entry: not whole

    hub.seconds_per_chunk = 0.0
    proc = run("prepare", *HUB_CELL, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"fetched  hub {LLAMA}" in proc.stdout
    assert_manifest_verifies(inputs, hub)
    assert not list(blobs.glob("*.incomplete"))

    proc = run("prepare", *HUB_CELL, env=env)  # again: everything verified, nothing fetched
    assert proc.returncode == 0 and f"prepared  hub {LLAMA}" in proc.stdout, proc.stdout[-2000:]


def test_two_prepares_at_once_leave_one_intact_copy(tmp_path, data_root, hub):
    env = env_for(tmp_path, data_root, hub.url)
    hub.seconds_per_chunk = 0.01
    procs = [start("prepare", *HUB_CELL, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    inputs = inputs_of(tmp_path)
    manifest = assert_manifest_verifies(inputs, hub)
    repo = inputs / "hub" / f"models--{LLAMA.replace('/', '--')}"
    assert sorted(p.name for p in (repo / "snapshots").iterdir()) == [hub.commit(LLAMA)]
    assert len(list((repo / "blobs").iterdir())) == len(hub.files(LLAMA)) - len(NOT_FETCHED)  # one blob per file
    states = sorted(line.split()[0] for out, _ in outs for line in out.splitlines() if f"hub {LLAMA}" in line
                    and line.split()[0] in ("fetched", "prepared"))
    assert states == ["fetched", "prepared"]  # one fetched it; the other waited and found it whole
    assert len([k for k in manifest if k.startswith("hub:")]) == 1


def test_a_damaged_input_is_reported_by_the_sweep_and_fetched_again_by_prepare(tmp_path, data_root, hub):
    env = env_for(tmp_path, data_root, hub.url)
    assert run("prepare", *HUB_CELL, env=env).returncode == 0
    inputs = inputs_of(tmp_path)
    entry = json.loads((inputs / "manifest.json").read_text())[f"hub:{LLAMA}"]
    weights = inputs / entry["path"] / "model.safetensors"
    blob = weights.resolve()
    blob.write_bytes(blob.read_bytes()[:1000])  # a truncated file, as a full scratch disk leaves it

    proc = run("sweep", *HUB_CELL, "sweep.dry_run=true", env=env)
    assert proc.returncode == 0 and f"hub {LLAMA}" in proc.stdout and "damaged" in proc.stdout, proc.stdout[-2000:]
    proc = run("sweep", *HUB_CELL, env=env)
    assert proc.returncode == 2 and f"hub {LLAMA} (model tiny_s): damaged" in proc.stderr, proc.stderr[-2000:]

    proc = run("prepare", *HUB_CELL, env=env)
    assert proc.returncode == 0 and f"repaired  hub {LLAMA}" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert_manifest_verifies(inputs, hub)


def test_prepare_without_the_gated_repos_token_fails_with_one_error_line_and_keeps_what_it_fetched(
        tmp_path, data_root, hub):
    env = env_for(tmp_path, data_root, hub.url, token=False)
    args = [*HUB_CELL, "loss=kd", "teacher=cross_encoder", f"teacher.name_or_path={CROSS_ENCODER}"]
    proc = run("prepare", *args, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot fetch hub {LLAMA} (model tiny_s) from the hub (GatedRepoError")
    assert "HF_TOKEN" in line
    proc = run("prepare", *args, env={**env, "HF_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"prepared  hub {CROSS_ENCODER}" in proc.stdout or f"fetched  hub {CROSS_ENCODER}" in proc.stdout


def test_jobs_read_the_prepared_caches_offline(compose, tmp_path, monkeypatch):
    from retrieval_scaling.inputs import work_offline

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "IR_DATASETS_HOME"):
        monkeypatch.delenv(key, raising=False)
    cfg = compose(f"sweep.root={tmp_path}")
    work_offline(cfg)
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.environ["HF_HUB_CACHE"] == str(tmp_path / ".cache" / "inputs" / "hub")
    assert os.environ["IR_DATASETS_HOME"] == str(tmp_path / ".cache" / "inputs" / "ir_datasets")


def test_the_full_grid_needs_three_backbones_the_teacher_and_seventeen_collections(compose):
    from retrieval_scaling.inputs import needed_inputs

    cfgs = [compose(f"model={m}", "+grid=full", f"loss={lo}") for m in ("llama3_1b", "llama3_3b", "llama3_8b")
            for lo in ("cl", "kd")]
    items = {i.key: i.users for i in needed_inputs(cfgs)}
    assert items["hub:meta-llama/Meta-Llama-3-8B"] == ("model llama3_8b",)
    assert items["hub:cross-encoder/ms-marco-MiniLM-L-6-v2"] == ("teacher cross_encoder",)
    assert items["ir_datasets:msmarco-passage/train/judged"] == ("data msmarco",)
    assert sum(k.startswith("hub:") for k in items) == 4 and sum(k.startswith("ir_datasets:") for k in items) == 17


def test_the_prepare_command_repeats_the_sweeps_overrides_without_its_secrets():
    from retrieval_scaling.inputs import prepare_command

    argv = ["+grid=full", "launcher=my cluster", "sweep.dry_run=true", "tracking=server",
            "tracking.uri=postgresql://rs:s3cret@db.example/mlflow"]
    assert prepare_command(argv) == ("python -m retrieval_scaling.prepare +grid=full 'launcher=my cluster' "
                                     "tracking=server tracking.uri=postgresql://rs:***@db.example/mlflow")
