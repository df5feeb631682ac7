"""Config composition of the grid through Hydra's compose API, and cell identity."""

import itertools

import pytest
from hydra.errors import MissingConfigException

from retrieval_scaling.identity import cell_id
from retrieval_scaling.plan import plan_cell

AXES = {"model": ["tiny_s", "tiny_m", "tiny_l"], "paradigm": ["sparse", "dense"], "loss": ["cl", "kd", "cl_kd"]}


def test_all_18_tiny_cells_compose_with_distinct_identities(compose):
    ids = set()
    for model, paradigm, loss in itertools.product(*AXES.values()):
        cfg = compose(f"model={model}", f"paradigm={paradigm}", f"loss={loss}", "+grid=tiny")
        assert (cfg["model"]["name"], cfg["paradigm"]["name"], cfg["loss"]["name"]) == (model, paradigm, loss)
        # the per-objective recipe of the model picks batch and group size
        group = 2 if loss == "kd" else 8
        assert cfg["train"]["passages_per_query"] == group
        assert cfg["train"]["lr"] == 1e-3  # the grid's override
        # the grid's λ reaches sparse cells only; dense cells have no regulariser at all
        if paradigm == "sparse":
            assert (cfg["paradigm"]["flops"]["lambda_q"], cfg["paradigm"]["flops"]["lambda_d"]) == (0.1, 0.08)
            # and its KD-only student temperature: sparse KD cells only
            assert cfg["paradigm"]["temperature"] == (0.1 if loss == "kd" else 1.0)
        else:
            assert "flops" not in cfg["paradigm"]
            assert cfg["paradigm"]["temperature"] == 0.01
        plan = plan_cell(cfg)
        assert plan["steps"] >= 1
        ids.add(cell_id(cfg))
    assert len(ids) == 18


def test_sizes_grow_and_sparse_costs_more_per_step(compose):
    plans = {(m, p): plan_cell(compose(f"model={m}", f"paradigm={p}", "loss=cl"))
             for m in AXES["model"] for p in AXES["paradigm"]}
    sizes = [plans[(m, "dense")]["params_non_embedding"] for m in AXES["model"]]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    for m in AXES["model"]:
        assert plans[(m, "sparse")]["flops_per_step"] > plans[(m, "dense")]["flops_per_step"]


def test_identity_same_config_same_id(compose):
    assert cell_id(compose("model=tiny_m")) == cell_id(compose("model=tiny_m"))


@pytest.mark.parametrize("override", ["train.lr=2e-3", "seed=1", "budget.flops=3e12", "paradigm=sparse",
                                      "model.lora.r=8", "data.passage_max_len=64"])
def test_identity_changes_with_any_semantic_change(compose, override):
    assert cell_id(compose(override)) != cell_id(compose())


def test_the_flops_lambda_changes_sparse_cells_only(compose):
    for paradigm, changes in (("sparse", True), ("dense", False)):
        base = cell_id(compose(f"paradigm={paradigm}"))
        assert (cell_id(compose(f"paradigm={paradigm}", "flops_lambda.d=0.5")) != base) == changes


def test_a_sparse_temperature_changes_the_sparse_cells_of_its_loss_only(compose):
    for paradigm, loss, changes in (("sparse", "kd", True), ("sparse", "cl", False), ("dense", "kd", False)):
        base = compose(f"paradigm={paradigm}", f"loss={loss}")
        cfg = compose(f"paradigm={paradigm}", f"loss={loss}", "sparse_temperature.kd=0.5")
        assert (cell_id(cfg) != cell_id(base)) == changes
        assert cfg["paradigm"]["temperature"] == (0.5 if changes else base["paradigm"]["temperature"])


@pytest.mark.parametrize("override", ["sweep.name=other", "log.every=3", "launcher.max_parallel=5",
                                      "data.root=/elsewhere", "sweep.root=/tmp/x", "tracking.uri=sqlite:///x.db",
                                      "train.compile=true", "train.micro_batch=8", "eval.batch_size=7"])
def test_identity_ignores_where_and_how_a_cell_is_run_or_logged(compose, override):
    assert cell_id(compose(override)) == cell_id(compose())


def test_the_precision_evaluation_runs_in_is_part_of_identity(compose):
    assert cell_id(compose("eval.dtype=float32")) != cell_id(compose())


@pytest.mark.parametrize("override", ["model=tiny_xl", "loss=foo", "paradigm=hybrid"])
def test_unknown_axis_value_is_a_clear_hydra_error(compose, override):
    group, value = override.split("=")
    with pytest.raises(MissingConfigException, match=f"{group}/{value}"):
        compose(override)


@pytest.mark.parametrize("model,lora_params", [
    # r·(in+out) summed over q,k,v,o,gate,up,down and layers: peft's count for these models
    ("llama3_1b", 16 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 512) + 3 * (2048 + 8192))),
    ("llama3_3b", 28 * 16 * ((3072 + 3072) * 2 + 2 * (3072 + 1024) + 3 * (3072 + 8192))),
    ("llama3_8b", 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))),
])
def test_full_grid_plans_paper_backbones_without_weights(planned, model, lora_params):
    plan = planned(f"model={model}", "+grid=full", "loss=cl")
    assert plan["params_trainable"] == lora_params
    assert lora_params in (11_272_192, 24_313_856, 41_943_040)
    assert (plan["queries_per_step"], plan["passages_per_query"]) == ((112 if model == "llama3_1b" else 128), 17)
    assert (plan["query_len"], plan["passage_len"]) == (64, 128)


@pytest.mark.parametrize("model,kd_batch", [("llama3_1b", 1024), ("llama3_3b", 512), ("llama3_8b", 512)])
def test_full_grid_is_the_papers_recipe_per_size_and_objective(compose, planned, model, kd_batch):
    kd = planned(f"model={model}", "+grid=full", "loss=kd", "paradigm=dense")
    assert (kd["queries_per_step"], kd["passages_per_query"]) == (kd_batch, 2)
    cfg = compose(f"model={model}", "+grid=full", "loss=cl_kd", "paradigm=sparse")
    assert cfg["train"]["gradient_checkpointing"] is True
    assert (cfg["train"]["lr"], cfg["train"]["warmup_fraction"], cfg["train"]["grad_clip"]) == (1e-4, 0.04, 1.0)
    assert cfg["paradigm"]["flops"]["lambda_q"] == 0.05 and cfg["paradigm"]["flops"]["lambda_d"] == 0.04
    assert cfg["loss"]["ce_weight"] == cfg["loss"]["kl_weight"] == 0.5 and cfg["loss"]["teacher_temperature"] == 1.0
    assert compose(f"model={model}", "+grid=full", "paradigm=dense")["paradigm"]["temperature"] == 0.01
    assert cfg["model"]["dtype"] == "bfloat16" and cfg["data"]["negatives"]["keep"] >= 16


def test_the_kl_only_variant_composes_with_the_cl_kd_batch_and_no_in_batch_term(compose):
    from retrieval_scaling.losses import KLDistillationLoss

    for model, batch in (("tiny_s", (8, 8)), ("llama3_8b", (128, 17))):
        cfg = compose(f"model={model}", "loss=kl")
        plan = plan_cell(cfg)
        assert (plan["queries_per_step"], plan["passages_per_query"]) == batch
        assert cfg["loss"]["_target_"].endswith("KLDistillationLoss") and not KLDistillationLoss.in_batch
    assert cell_id(compose("loss=kl")) != cell_id(compose("loss=cl_kd"))


def test_the_models_deepspeed_overlay_is_merged_over_the_group(compose):
    from retrieval_scaling.cell_model import deepspeed_config

    tiny = deepspeed_config(compose("model=tiny_s"))
    big = deepspeed_config(compose("model=llama3_8b", "model.deepspeed.zero_optimization.stage=3"))
    assert tiny["zero_optimization"]["stage"] == 2
    assert big["zero_optimization"]["stage"] == 3
    assert big["zero_optimization"]["contiguous_gradients"] is True  # the group's other settings stay


def test_the_teacher_is_a_config_choice_that_names_the_cell(compose):
    ce = compose("teacher=cross_encoder")
    assert ce["data"]["teacher"]["name_or_path"] == "cross-encoder/ms-marco-MiniLM-L-6-v2"
    assert compose()["data"]["teacher"] == {"name": "bm25"}
    assert cell_id(ce) != cell_id(compose())
    # how it batches and caches does not name the cell
    sbert = compose("teacher=sbert", "teacher.path=/models/minilm")
    assert sbert["data"]["teacher"]["cache_size"] == 1_000_000
    for override in ("teacher.batch_size=8", "teacher.cache_size=10"):
        assert cell_id(compose("teacher=sbert", "teacher.path=/models/minilm", override)) == cell_id(sbert)
    assert cell_id(compose("teacher=sbert", "teacher.path=/models/other")) != cell_id(sbert)


def test_the_full_grid_distils_from_the_cross_encoder_and_every_run_says_which_teacher(compose):
    from retrieval_scaling.cell import cell_tags
    from retrieval_scaling.curves_summary import results_table

    def full(loss):  # the budget as the sweep resolves it for the grid
        return compose("model=llama3_1b", "+grid=full", f"loss={loss}", "budget.flops=1e20")

    for loss in ("kd", "cl_kd"):
        assert full(loss)["data"]["teacher"]["name"] == "cross_encoder"
        assert cell_tags(full(loss))["teacher"] == "cross_encoder"
    assert cell_tags(full("cl"))["teacher"] == "none"
    assert cell_tags(compose("loss=kd"))["teacher"] == "bm25"  # the tiny default: said so on the run
    # a BM25-taught cell is its own column of the results, never averaged with the paper's teacher
    points = [{"cell_id": c, "model": "m", "params_non_embedding": 1e6, "paradigm": "dense", "loss": "kd",
               "teacher": t, "budget": 1e12, "metric": v}
              for c, t, v in (("a", "bm25", 0.1), ("b", "cross_encoder", 0.3))]
    head, _, row = results_table(points, "ndcg")
    assert head == "| model | non-embedding params | dense kd ← bm25 | dense kd ← cross_encoder |"
    assert row == "| m | 1e+06 | 0.1000 | 0.3000 |"


def test_precision_auto_is_bf16_only_where_the_device_has_it_and_true_false_force_it():
    """`auto` resolves on the machine that runs the stage: bf16 on a CPU with oneDNN's bf16 kernels
    (AVX-512/AMX), fp32 on one without and on any other device; `true`/`false` and named dtypes are
    taken as given."""
    import torch

    from retrieval_scaling.errors import ConfigError
    from retrieval_scaling.precision import use_bf16, weight_dtype

    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert use_bf16("auto", "cpu") is native
    assert weight_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert use_bf16("auto", "meta") is False and weight_dtype("auto", "meta") == torch.float32
    assert use_bf16(True, "meta") is True and use_bf16(False, "cpu") is False
    assert weight_dtype("bfloat16", "meta") == torch.bfloat16 and weight_dtype("float32", "cpu") == torch.float32
    with pytest.raises(ConfigError, match="model.mntp.bf16='yes'"):
        use_bf16("yes", "cpu", "model.mntp.bf16")


def test_planning_and_status_import_no_torch():
    """`status` and the planner import the precision checks but not torch (1.4-1.8 s of a `status`
    call's 4.9 s here), and `status` reads the ledger without the scheduler (submitit, the planners):
    torch comes in only where a stage computes, or a config names a dtype."""
    import subprocess
    import sys

    from retrieval_scaling.errors import ConfigError
    from retrieval_scaling.precision import check_dtype

    code = ("import sys, retrieval_scaling.status, retrieval_scaling.ledger\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('submitit', 'torch')))\n"
            "import retrieval_scaling.scheduler, retrieval_scaling.plan\n"
            "from retrieval_scaling.precision import check_settings\n"
            "check_settings({'model': {'pretrain': {'bf16': 'auto'}}, 'train': {'bf16': 'auto'},\n"
            "                'eval': {'dtype': 'auto'}})\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "[]"]
    check_dtype("bfloat16", "eval.dtype")  # a named dtype is still checked against torch's
    with pytest.raises(ConfigError, match="eval.dtype='int8'"):
        check_dtype("int8", "eval.dtype")


@pytest.mark.parametrize("name", ["dense", "sparse"])
def test_each_paradigm_config_builds_its_class_and_its_class_path_is_not_identity(compose, name):
    from retrieval_scaling.paradigms import Paradigm, paradigm_of

    cfg = compose("model=tiny_s", f"paradigm={name}", "loss=cl")
    paradigm = paradigm_of(cfg["paradigm"])
    assert isinstance(paradigm, Paradigm) and paradigm.name == name
    assert paradigm.temperature == {"dense": 0.01, "sparse": 1.0}[name]
    # a cell config written before paradigms named their class reads as the shipped one
    older = {k: v for k, v in cfg["paradigm"].items() if k != "_target_"}
    assert type(paradigm_of(older)) is type(paradigm)
    moved = {**cfg, "paradigm": {**cfg["paradigm"], "_target_": "elsewhere.Same"}}
    assert cell_id(moved) == cell_id(cfg)


def test_a_paradigm_config_that_names_no_paradigm_or_an_unknown_setting_is_one_clear_error(compose):
    from retrieval_scaling.errors import ConfigError
    from retrieval_scaling.paradigms import paradigm_of

    sparse = compose("paradigm=sparse")["paradigm"]
    with pytest.raises(ConfigError, match=r"paradigm._target_='retrieval_scaling.paradigms.dense.Nope' cannot be "
                                          r"imported \(module .* has no attribute 'Nope'\)"):
        paradigm_of({**sparse, "_target_": "retrieval_scaling.paradigms.dense.Nope"})
    with pytest.raises(ConfigError, match="is not a Paradigm class"):
        paradigm_of({**sparse, "_target_": "retrieval_scaling.losses.ContrastiveLoss"})
    with pytest.raises(ConfigError, match=r"paradigm.lamda is not a setting of the sparse paradigm \(Sparse takes "
                                          r"name, temperature, flops\)"):
        paradigm_of({**sparse, "lamda": 0.1})
