"""The planner prices the whole study: MNTP, training and evaluation, in FLOPs and GPU-hours."""

import pytest

from retrieval_scaling.backbone import architecture
from retrieval_scaling.paradigms.dense import Dense
from retrieval_scaling.paradigms.sparse import Sparse
from retrieval_scaling.pricing import DECLARED, TOKENS_PER_WORD, encoding_flops, evaluation_flops, price_study


def test_encoding_flops_by_hand(compose):
    arch = architecture(compose("model=tiny_s")["model"])  # d 64, 2 layers, MLP 176, vocabulary 4096
    # linear weights per layer: 4·64·64 (q, k, v, o) + 3·64·176 (gate, up, down) = 50,176; 2 layers 100,352
    # 10 texts × 20 tokens: 10·(20·2·100,352 + 4·2·64·20²) = 42,188,800; the sparse head adds 10·20·2·64·4096
    assert encoding_flops(arch, Dense(), 10, 20) == 42_188_800
    assert encoding_flops(arch, Sparse(), 10, 20) == 42_188_800 + 104_857_600


def msmarco_suite(cfg):
    """The paper's suite cut to its three collections over the MS MARCO passage corpus."""
    cfg["eval"]["collections"] = {k: v for k, v in cfg["eval"]["collections"].items()
                                  if k in ("msmarco_dev", "dl19", "dl20")}
    return cfg


def test_msmarco_dev_dl19_dl20_price_one_corpus_encoding(compose):
    cfg = msmarco_suite(compose("model=llama3_1b", "eval=paper", "paradigm=dense"))
    arch = architecture(cfg["model"])
    specs = cfg["eval"]["collections"]
    assert {s["id"] for s in specs.values()} >= {"msmarco-passage/dev/small", "msmarco-passage/trec-dl-2019/judged"}
    flops, unpriced = evaluation_flops(cfg)
    size = DECLARED["msmarco-passage/dev/small"]
    corpus = encoding_flops(arch, Dense(), size.docs, min(192, 1 + size.doc_words * TOKENS_PER_WORD))
    queries = sum(encoding_flops(arch, Dense(), DECLARED[s["id"]].queries,
                                 min(64, 1 + DECLARED[s["id"]].query_words * TOKENS_PER_WORD)) for s in specs.values())
    assert unpriced == [] and flops == pytest.approx(corpus + queries)  # the corpus once, not three times


def test_a_local_collection_is_priced_from_its_files(compose, data_root):
    cfg = compose("eval=scifact")
    cfg["eval"]["root"] = str(data_root)
    flops, unpriced = evaluation_flops(cfg)
    assert unpriced == [] and flops > 0


def test_study_totals_count_shared_stages_and_step0_evaluations_once(compose):
    cfgs = [msmarco_suite(compose("model=llama3_1b", "eval=paper", f"loss={loss}")) for loss in ("cl", "kd")]
    plans = [{"gpu_hours": 10.0, "params_trainable": 10**6}, {"gpu_hours": 12.0, "params_trainable": 10**6}]
    totals = price_study(cfgs, plans)
    one_eval = plans[0]["eval_gpu_hours"] / 2
    assert plans[0]["mntp_gpu_hours"] == plans[1]["mntp_gpu_hours"] > 0
    assert totals["mntp_gpu_hours"] == pytest.approx(plans[0]["mntp_gpu_hours"])  # one backbone, one MNTP
    assert totals["eval_gpu_hours"] == pytest.approx(3 * one_eval)  # a shared step 0 + two final evaluations
    assert totals["train_gpu_hours"] == 22.0
    disk = plans[0]["disk_gb"]
    # kept: per cell final weights + run files + one checkpoint tag; the peak adds a second tag, the final
    # stores, and the one step-0 store the two cells share
    kept = 2 * (disk["final"] + disk["runs"] + disk["checkpoint"] / 2)
    assert totals["disk_kept_gb"] == pytest.approx(kept)
    assert totals["disk_peak_gb"] == pytest.approx(kept + 2 * (disk["checkpoint"] / 2 + disk["eval_store"])
                                                   + disk["step0_store"])
    assert totals["total_gpu_hours"] == pytest.approx(sum(totals[k] for k in ("mntp_gpu_hours", "train_gpu_hours",
                                                                              "eval_gpu_hours")))


def test_stage_resources_overlay_the_cells_per_size(compose):
    from retrieval_scaling.slurm import stage_resources_for

    launcher = compose("launcher=slurm")["launcher"]
    launcher["resources"] = {"default": {"nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4, "cpus_per_task": 8,
                                         "mem_gb": 256, "time_min": 1440}}
    base = stage_resources_for(launcher, "llama3_8b")  # nothing said: one rank of the cells' node shape
    assert base == {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": 4, "cpus_per_task": 8, "mem_gb": 256,
                    "time_min": launcher["stage_time_min"]}
    launcher["stage_resources"] = {"default": {"tasks_per_node": 4, "time_min": 240},
                                   "llama3_8b": {"time_min": 720}}
    assert stage_resources_for(launcher, "llama3_8b")["tasks_per_node"] == 4
    assert stage_resources_for(launcher, "llama3_8b")["time_min"] == 720
    assert stage_resources_for(launcher, "llama3_1b")["time_min"] == 240


def test_training_data_preparation_is_priced_once_per_corpus_and_per_training_set(compose):
    from retrieval_scaling.pricing import BM25_INDEX_CORE_S_PER_MDOC, BM25_MINING_CORE_S_PER_QUERY_PER_MDOC

    def cell(loss, teacher):
        return msmarco_suite(compose("model=llama3_1b", "eval=paper", "data=msmarco", f"teacher={teacher}",
                                     f"loss={loss}"))

    cfgs = [cell("kd", "cross_encoder"), cell("cl_kd", "cross_encoder"), cell("kd", "bm25")]
    plans = [{"gpu_hours": 1.0, "params_trainable": 10**6} for _ in cfgs]
    totals = price_study(cfgs, plans)
    # MS MARCO train: 502,939 judged queries over 8,841,823 passages (BM25 mines for every teacher)
    index = BM25_INDEX_CORE_S_PER_MDOC * 8.841823 / 3600
    mining = BM25_MINING_CORE_S_PER_QUERY_PER_MDOC * 502_939 * 8.841823 / 3600
    assert totals["bm25_index_cpu_hours"] == pytest.approx(index)  # one corpus: one index
    assert totals["mining_cpu_hours"] == pytest.approx(2 * mining)  # two training sets (two teachers)
    assert plans[0]["mining_cpu_hours"] == pytest.approx(index + mining)
    # the cross-encoder: 2 × 22.7M parameters × (3 + (5.96 + 55.98) × 1.3 tokens) per (query, passage) pair,
    # 1 + keep pairs a query; on 3.12e14 × 0.4 FLOP/s
    keep = cfgs[0]["data"]["negatives"]["keep"]
    flops = 2 * 22.7e6 * (3 + (5.96 + 55.98) * 1.3) * 502_939 * (1 + keep)
    assert plans[0]["teacher_gpu_hours"] == pytest.approx(flops / (3.12e14 * 0.4) / 3600)
    assert plans[2]["teacher_gpu_hours"] == 0.0  # BM25 teaches on the CPU, priced as mining
    assert totals["teacher_gpu_hours"] == pytest.approx(plans[0]["teacher_gpu_hours"])  # shared by kd and cl_kd
    assert totals["total_gpu_hours"] == pytest.approx(sum(totals[k] for k in (
        "mntp_gpu_hours", "train_gpu_hours", "eval_gpu_hours", "teacher_gpu_hours")))


@pytest.mark.parametrize("paradigm", ["dense", "sparse"])
def test_a_cells_disk_by_hand(compose, paradigm):
    from retrieval_scaling.pricing import disk_plan

    cfg = msmarco_suite(compose("model=llama3_1b", "eval=paper", f"paradigm={paradigm}"))
    disk = disk_plan(cfg, 10**7)
    docs = 8_841_823  # the MS MARCO passage corpus, stored once for dev, DL19 and DL20
    # dense: 2,048 float16 values + a 16-byte key = 4,112 bytes; sparse: 512 planned non-zeros × (4 + 4)
    # bytes (float32 weight, term id) + a 4-byte row pointer + the key = 4,116 bytes, and 256 at step 0: 2,068
    final, step0 = (4112, 4112) if paradigm == "dense" else (4116, 2068)
    assert disk["eval_store"] == pytest.approx(docs * final / 1e9)
    assert disk["step0_store"] == pytest.approx(docs * step0 / 1e9)
    assert disk["checkpoint"] == pytest.approx(2 * 16.1 * 10**7 / 1e9) and disk["final"] == pytest.approx(0.04)
    queries = sum(DECLARED[s["id"]].queries for s in cfg["eval"]["collections"].values())
    assert disk["runs"] == pytest.approx(queries * 1000 * 11 / 1e9)
