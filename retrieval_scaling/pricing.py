"""What the whole study costs beyond training: each backbone's MNTP stage and each cell's evaluations,
in FLOPs and GPU-hours, priced as the planner prices training (FLOPs ÷ (peak × utilization)); and each
training set's preparation: its BM25 index and hard-negative mining in CPU-hours (rates measured by
bench/mining.py, linear in the corpus's documents), its teacher's scoring in GPU-hours.

Encoding a text of S tokens costs 2·S·N_linear (frozen weights, LoRA merged) + 4·L·d·S² (attention)
+ 2·S·d·V for the sparse head. A corpus is priced from its size and mean length: declared below for the
ir_datasets ids the paper's suite uses (BEIR's published statistics, words × `TOKENS_PER_WORD`), or
measured from the files of a local collection. Each distinct corpus (ids sharing `corpus`) is priced
once per evaluation at each truncation length, as `encodings.EncodingStore` encodes it; the step-0
evaluation once per (backbone, paradigm), as cells share it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .backbone import architecture
from .mntp import mntp_flops
from .paradigms import paradigm_of

TOKENS_PER_WORD = 1.3  # Llama-3's tokenizer on English prose, roughly; BEIR publishes words
# Core-seconds per million corpus documents (bench/mining.py on MS MARCO-shaped data; docs/benchmarks.md):
# building the BM25 index (one core), and mining one query's top-k with the batched kernel.
BM25_INDEX_CORE_S_PER_MDOC = 53.0
BM25_MINING_CORE_S_PER_QUERY_PER_MDOC = 4.8e-4


@dataclass(frozen=True)
class CorpusSize:
    corpus: str  # collections with the same corpus share its encodings
    docs: int
    doc_words: float
    queries: int
    query_words: float


# ir_datasets id -> size (BEIR, Thakur et al. 2021, Table 1; MS MARCO passage). Climate-FEVER's corpus is
# FEVER's Wikipedia abstracts (5,416,593 vs 5,416,568): priced as one.
DECLARED: dict[str, CorpusSize] = {
    "msmarco-passage/train/judged": CorpusSize("msmarco-passage", 8_841_823, 55.98, 502_939, 5.96),
    "msmarco-passage/dev/small": CorpusSize("msmarco-passage", 8_841_823, 55.98, 6_980, 5.96),
    "msmarco-passage/trec-dl-2019/judged": CorpusSize("msmarco-passage", 8_841_823, 55.98, 43, 5.96),
    "msmarco-passage/trec-dl-2020/judged": CorpusSize("msmarco-passage", 8_841_823, 55.98, 54, 5.96),
    "beir/arguana": CorpusSize("arguana", 8_674, 166.80, 1_406, 192.98),
    "beir/climate-fever": CorpusSize("fever-wikipedia", 5_416_593, 84.76, 1_535, 20.13),
    "beir/dbpedia-entity/test": CorpusSize("dbpedia-entity", 4_635_922, 49.68, 400, 5.39),
    "beir/fever/test": CorpusSize("fever-wikipedia", 5_416_568, 84.76, 6_666, 8.13),
    "beir/fiqa/test": CorpusSize("fiqa", 57_638, 132.32, 648, 10.77),
    "beir/hotpotqa/test": CorpusSize("hotpotqa", 5_233_329, 46.30, 7_405, 17.61),
    "beir/nfcorpus/test": CorpusSize("nfcorpus", 3_633, 232.26, 323, 3.30),
    "beir/nq": CorpusSize("nq", 2_681_468, 78.88, 3_452, 9.16),
    "beir/quora/test": CorpusSize("quora", 522_931, 11.44, 10_000, 9.53),
    "beir/scidocs": CorpusSize("scidocs", 25_657, 176.19, 1_000, 9.38),
    "beir/scifact/test": CorpusSize("scifact", 5_183, 213.63, 300, 12.37),
    "beir/trec-covid": CorpusSize("trec-covid", 171_332, 160.77, 50, 10.60),
    "beir/webis-touche2020/v2": CorpusSize("webis-touche2020", 382_545, 292.37, 49, 6.55),
}


# Rows parsed for a local file's mean length: counting its lines reads it whole, parsing stops here, so that
# pricing a large local corpus at every sweep's planning costs a line count, not a JSON pass.
SAMPLE_ROWS = 20_000


@lru_cache(maxsize=64)
def measured_size(corpus_path: str, queries_path: str | None) -> CorpusSize | None:
    """A local BEIR collection's size from its files: documents and queries counted, words averaged over
    the first `SAMPLE_ROWS` of each (all of them for BEIR's smaller sets). None for files it cannot
    read: validating them is `check_inputs`'s job, with file and line."""
    try:
        docs, doc_words = jsonl_stats(corpus_path, lambda row: f"{row.get('title') or ''} {row.get('text', '')}")
        queries, query_words = (jsonl_stats(queries_path, lambda row: row.get("text", ""))
                                if queries_path and Path(queries_path).is_file() else (0, 0.0))
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return CorpusSize(f"file:{corpus_path}", docs, doc_words, queries, query_words)


def jsonl_stats(path: str, text_of) -> tuple[int, float]:
    """(non-empty lines, mean words of `text_of(row)` over the first `SAMPLE_ROWS` of them)."""
    rows = words = sampled = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            rows += 1
            if sampled < SAMPLE_ROWS:
                words += len(text_of(json.loads(line)).split())
                sampled += 1
    return rows, words / max(sampled, 1)


def collection_size(spec: Mapping[str, Any], root: str | None) -> CorpusSize | None:
    """Declared for an ir_datasets id, measured for a local BEIR directory, else None (unpriced)."""
    if spec.get("source") == "ir_datasets":
        return DECLARED.get(str(spec.get("id")))
    base = Path(spec["path"]) if spec.get("path") else Path(root or "") / (spec.get("dir") or spec["name"])
    if spec.get("source", "beir") == "beir" and (base / "corpus.jsonl").is_file():
        return measured_size(str(base / "corpus.jsonl"), str(base / "queries.jsonl"))
    return None


def encoding_flops(arch, paradigm, texts: int, mean_tokens: float) -> float:
    """Forward FLOPs of encoding `texts` texts of `mean_tokens` tokens (BOS included), with `paradigm`'s head."""
    n_lin = arch.num_hidden_layers * arch.linear_params_per_layer()
    head = paradigm.encoding_flops_per_token(arch)
    per_text = mean_tokens * (2 * n_lin + head) + 4 * arch.num_hidden_layers * arch.hidden_size * mean_tokens**2
    return texts * per_text


def suite_corpora(cfg: Mapping[str, Any]) -> tuple[list[tuple[dict, CorpusSize, int, bool]], list[str]]:
    """The evaluation's collections with a known size: (spec, size, passage length, whether this one
    encodes its corpus: False where an earlier collection shares it at that length, see `encodings`),
    and the names of those it could not size."""
    ev = cfg["eval"]
    seen: set[tuple[str, int]] = set()
    out, unpriced = [], []
    for spec in ev["collections"].values():
        size = collection_size(spec, ev.get("root"))
        if size is None:
            unpriced.append(spec["name"])
            continue
        p_len = int(spec.get("passage_max_len") or ev["passage_max_len"])
        out.append((spec, size, p_len, (size.corpus, p_len) not in seen))
        seen.add((size.corpus, p_len))
    return out, unpriced


def evaluation_flops(cfg: Mapping[str, Any]) -> tuple[float, list[str]]:
    """One evaluation of this cell's model on `eval`: (FLOPs, names of collections it could not price)."""
    arch = architecture(cfg["model"])
    paradigm = paradigm_of(cfg["paradigm"])
    ev = cfg["eval"]
    total = 0.0
    corpora, unpriced = suite_corpora(cfg)
    for spec, size, p_len, encodes in corpora:
        q_len = int(spec.get("query_max_len") or ev["query_max_len"])
        queries = size.queries
        if ev.get("subset"):
            queries = min(queries, int(ev["subset"]["queries"]))
        total += encoding_flops(arch, paradigm, queries, min(q_len, 1 + size.query_words * TOKENS_PER_WORD))
        if encodes:
            total += encoding_flops(arch, paradigm, size.docs, min(p_len, 1 + size.doc_words * TOKENS_PER_WORD))
    return total, unpriced


# A checkpoint's bytes per trainable parameter: fp32 weights, Adam's two moments and DeepSpeed's fp32
# copy (bench/results/checkpoint.json); while a new tag is written the older one is still there.
CHECKPOINT_BYTES_PER_TRAINABLE = 16.1
# A run file's gzipped bytes per hit (`qid Q0 docid rank score tag`; docs/evaluation.md, "Disk")
RUN_BYTES_PER_HIT = 11.0


def disk_plan(cfg: Mapping[str, Any], trainable: int) -> dict[str, float]:
    """A cell's disk, GB: its checkpoint at its largest (two tags while one is written), its final
    weights, its run files, and the encoding stores of its evaluations while they run (the final one,
    and the step-0 one its (backbone, paradigm) shares)."""
    ev = cfg["eval"]
    paradigm = paradigm_of(cfg["paradigm"])
    arch = architecture(cfg["model"])
    corpora, _ = suite_corpora(cfg)
    stored = []  # (documents, mean tokens) of each corpus the evaluation encodes
    for spec, size, p_len, encodes in corpora:
        if encodes:
            stored.append((size.docs, min(p_len, 1 + size.doc_words * TOKENS_PER_WORD)))
            paradigm.check_corpus(spec["name"], *stored[-1])
    hits = sum(min(size.queries, int((ev.get("subset") or {}).get("queries") or size.queries)) * int(spec["depth"])
               for spec, size, _, _ in corpora)
    return {"checkpoint": 2 * CHECKPOINT_BYTES_PER_TRAINABLE * trainable / 1e9, "final": 4 * trainable / 1e9,
            "runs": RUN_BYTES_PER_HIT * hits / 1e9,
            "eval_store": sum(n * paradigm.doc_bytes(arch, ev, tokens) for n, tokens in stored) / 1e9,
            "step0_store": sum(n * paradigm.doc_bytes(arch, ev, tokens, step0=True) for n, tokens in stored) / 1e9}


def stage_flops(model_cfg: Mapping[str, Any]) -> float:
    """The backbone's MNTP stage (0 for a backbone without one), as `mntp.json` will count it."""
    recipe = model_cfg.get("mntp")
    if not recipe:
        return 0.0
    tokens = int(recipe["steps"]) * int(recipe["batch_size"]) * int(recipe["block_len"])
    predicted = int(tokens * float(recipe["mask_rate"]))
    return float(mntp_flops(model_cfg, tokens, int(recipe["block_len"]), predicted,
                            recompute=bool(recipe.get("gradient_checkpointing"))))


def training_data_cost(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's training set's preparation, shared by every cell with the same data and teacher: BM25
    index and mining CPU-hours (where BM25 mines or teaches), teacher scoring FLOPs (a neural teacher's
    forward over each query's judged passages). `priced` is False where the collection has no known size."""
    from .data import training_spec
    from .identity import TEACHER_RUNTIME_KEYS, content_hash

    data, teacher = cfg["data"], cfg["data"]["teacher"]
    size = collection_size(training_spec(data), data.get("root"))
    key = content_hash({**{k: data.get(k) for k in ("name", "source", "id", "split", "negatives")},
                        "teacher": {k: v for k, v in teacher.items() if k not in TEACHER_RUNTIME_KEYS}})
    out = {"key": key, "index_key": content_hash({k: data.get(k) for k in ("name", "source", "id")}),
           "priced": size is not None, "bm25_index_cpu_hours": 0.0, "mining_cpu_hours": 0.0, "teacher_flops": 0.0}
    if size is None:
        return out
    mdocs = size.docs / 1e6
    if data["negatives"]["miner"] == "bm25" or teacher["name"] == "bm25":
        out["bm25_index_cpu_hours"] = BM25_INDEX_CORE_S_PER_MDOC * mdocs / 3600
        out["mining_cpu_hours"] = BM25_MINING_CORE_S_PER_QUERY_PER_MDOC * size.queries * mdocs / 3600
    if teacher.get("params"):  # a neural teacher: one forward per (query, judged passage) pair
        pairs = size.queries * (1 + int(data["negatives"]["keep"]))
        tokens = min(int(teacher.get("max_len") or 512), 3 + (size.query_words + size.doc_words) * TOKENS_PER_WORD)
        out["teacher_flops"] = 2.0 * float(teacher["params"]) * tokens * pairs
    return out


def gpu_hours(flops: float, planner: Mapping[str, Any]) -> float:
    return flops / (float(planner["peak_flops"]) * float(planner["utilization"])) / 3600


def price_study(cfgs: Sequence[Mapping[str, Any]], plans: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Adds MNTP, evaluation and total FLOPs and GPU-hours to each cell's plan (`mntp_*` is its backbone's
    stage, shared; `eval_*` its step-0 and final evaluations, the step-0 one shared by its (backbone,
    paradigm); `mining_*` and `teacher_*` its training set's preparation, shared by every cell with the
    same data and teacher), and returns the sweep's totals with each shared cost counted once."""
    totals = {"mntp_gpu_hours": 0.0, "train_gpu_hours": 0.0, "eval_gpu_hours": 0.0, "teacher_gpu_hours": 0.0}
    cpu = {"bm25_index_cpu_hours": 0.0, "mining_cpu_hours": 0.0}
    space = {"kept_gb": 0.0, "peak_gb": 0.0}  # after every cell is done; if every evaluation ran at once
    backbones: set[str] = set()
    step0: set[tuple[str, str]] = set()
    prepared: set[str] = set()
    for cfg, plan in zip(cfgs, plans, strict=True):
        planner = cfg["planner"]
        data = training_data_cost(cfg)
        plan.update(mining_cpu_hours=data["bm25_index_cpu_hours"] + data["mining_cpu_hours"],
                    teacher_gpu_hours=gpu_hours(data["teacher_flops"], planner), data_unpriced=not data["priced"])
        if data["key"] not in prepared:
            prepared.add(data["key"])
            totals["teacher_gpu_hours"] += plan["teacher_gpu_hours"]
            cpu["mining_cpu_hours"] += data["mining_cpu_hours"]
        if data["index_key"] not in prepared:
            prepared.add(data["index_key"])
            cpu["bm25_index_cpu_hours"] += data["bm25_index_cpu_hours"]
        mntp = stage_flops(cfg["model"])
        one_eval, unpriced = evaluation_flops(cfg)
        plan.update(mntp_flops=mntp, mntp_gpu_hours=gpu_hours(mntp, planner), eval_flops=2 * one_eval,
                    eval_gpu_hours=gpu_hours(2 * one_eval, planner), eval_unpriced=unpriced)
        plan["study_gpu_hours"] = plan["mntp_gpu_hours"] + plan["gpu_hours"] + plan["eval_gpu_hours"]
        plan["disk_gb"] = disk_plan(cfg, plan["params_trainable"])
        if cfg["model"]["name"] not in backbones:
            backbones.add(cfg["model"]["name"])
            totals["mntp_gpu_hours"] += plan["mntp_gpu_hours"]
        key = (cfg["model"]["name"], cfg["paradigm"]["name"])
        shared_step0 = key in step0
        step0.add(key)
        totals["eval_gpu_hours"] += gpu_hours(one_eval * (1 if shared_step0 else 2), planner)
        totals["train_gpu_hours"] += plan["gpu_hours"]
        disk = plan["disk_gb"]
        space["kept_gb"] += disk["final"] + disk["runs"] + disk["checkpoint"] / 2
        space["peak_gb"] += disk["final"] + disk["runs"] + disk["checkpoint"] + disk["eval_store"] \
            + (0 if shared_step0 else disk["step0_store"])
    totals["total_gpu_hours"] = sum(totals.values())
    return {**totals, **cpu, **{f"disk_{k}": v for k, v in space.items()}}
