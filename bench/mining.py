"""BM25 hard-negative mining at MS MARCO's shape, rehearsed on a CPU.

A synthetic corpus of `--docs` passages with MS MARCO's length profile (log-normal word counts, mean ~56,
Zipfian words; `scale.synthetic_corpus`) and `--queries` queries of ~3.4 terms (log-normal, 1 to 12),
drawn Zipfian from the word ranks after the 75 most frequent (what stop-word removal leaves of a real
vocabulary). Calibrated on real text: MS MARCO dev queries against real MS MARCO passages (the 4,103 of
shared/data) keep 3.5 terms after bm25s's stop words, whose postings sum to 0.107 × the corpus's
documents per query (median 0.080); these synthetic ones give about 0.1 (the JSON says how much).
Each step runs in its own process, so each peak RSS is that step's alone:

1. build: the BM25 index built once and saved (`BM25Index(...).save`): time, peak RSS, bytes on disk;
2. mine: every query's top `--depth` from the memory-mapped index, in batches of 10,000 (one mining
   part) on all threads, twice (the rate is the second pass's, as in a real run's many parts; the
   first pass's, which faults the index in, is reported beside it), against today's loop before it
   (bm25s scores every document for one query, then the top-k), on a sample of queries: queries/s per
   core of each, and identical top-k (scores and positions) on the sample. The speedup is the median
   over 10 rounds that alternate the loop (a tenth of the sample) with the batched kernel (a tenth of
   the queries, all threads) in one process: a shared host's speed drifts between separate steps;
3. share: two ranks mining their halves at once from the same saved index, against one rank alone:
   peak RSS and PSS (a shared page counted once across processes, from /proc/<pid>/smaps_rollup), of
   the whole process and of mining alone: the PSS of the index's mapped pages plus the anonymous memory
   the rank gained from loading the index on (not the interpreter, torch and numba's compiled kernels,
   which a rank holds whether it mines or not), both ranks measured while both still map the index;
4. the time MS MARCO's mining would take (8.84M passages, 503k queries), extrapolated linearly in the
   corpus size (a query's postings grow with it) from the measured rate.

    python bench/mining.py [--docs 1000000] [--queries 20000] [--out bench/results/mining.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from record import write_result  # bench/ is on sys.path when a script runs
from scale import WORDS, synthetic_corpus

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MSMARCO_PASSAGES, MSMARCO_QUERIES = 8_841_823, 502_939
ROUNDS = 10  # paired rounds of the loop and the batched kernel
STOP_RANKS = 75  # the most frequent word ranks, left out of queries as stop words would be


def peak_rss_gb() -> float:
    """This process's own peak RSS: VmHWM, not ru_maxrss, which keeps the parent's RSS at fork across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # KiB
    return float("nan")


def pss_gb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def anonymous_gb() -> float:
    """This process's anonymous memory (heap, arrays): private to it, unlike file pages it maps."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def mapped_pss_gb(directory: Path) -> float:
    """PSS of the file pages this process maps from `directory`: a page n processes share counts 1/n."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            inside = len(fields) >= 6 and fields[-1].startswith(str(directory))
        elif inside and fields[0] == "Pss:":
            total += int(fields[1])
    return total / 2**20


def synthetic_queries(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(3.6), 0.4, n).astype(int), 1, 12)
    words = rng.zipf(1.2, 3 * lengths.sum()) + STOP_RANKS
    words = words[words < WORDS - 3][:lengths.sum()]  # not the corpus's catch-all last word
    out, at = [], 0
    for length in lengths:
        out.append(" ".join(f"w{w}" for w in words[at:at + length]))
        at += length
    return out


def corpus_dict(n_docs: int) -> dict[str, str]:
    return {str(i): t for i, t in enumerate(synthetic_corpus(n_docs, seed=0))}


def child_build(args) -> dict:
    from retrieval_scaling.bm25 import BM25Index

    corpus = corpus_dict(args.docs)
    start = time.perf_counter()
    BM25Index(corpus).save(args.index)
    seconds = time.perf_counter() - start
    on_disk = sum(p.stat().st_size for p in Path(args.index).iterdir())
    return {"build_s": seconds, "build_peak_rss_gb": peak_rss_gb(), "index_bytes": on_disk}


def child_mine(args) -> dict:
    """Mine queries [lo, hi) of the query set from the saved index, a part of 10,000 at a time."""
    from retrieval_scaling.bm25 import BM25Index
    from retrieval_scaling.distributed import configure_threads
    from retrieval_scaling.search import search_positive_postings

    configure_threads(args.threads)
    tiny = [np.array([0, 1]), np.array([0], dtype=np.int32), np.ones(1, dtype=np.float32)]
    for array in tiny:
        array.flags.writeable = False  # as the memory-mapped index's arrays are: numba's same specialisation
    search_positive_postings(*tiny, 1, np.array([0, 1]), np.array([0]), 1)  # the kernels, compiled or loaded
    before_load = anonymous_gb()  # interpreter, torch, numba's kernels: what a rank holds whether it mines or not
    index = BM25Index.load(args.index)
    queries = synthetic_queries(args.queries, seed=1)[args.lo:args.hi]
    index.top_k(queries[:2], args.depth)  # compile (numba caches it on disk afterwards)
    passes = []
    for _ in range(2):  # the first pass faults the index's pages in; a real run's 503k queries are the second's
        start, done = time.perf_counter(), []
        for at in range(0, len(queries), 10_000):
            done.append(index.top_k(queries[at:at + 10_000], args.depth))
        passes.append(time.perf_counter() - start)
    first_pass, seconds = passes
    postings = np.diff(np.asarray(index.indptr))
    work = np.mean([postings[t].sum() for t in index.query_tokens(queries[:2000])]) / index.n_docs
    if args.peers > 1:
        rendezvous(Path(args.index).parent / "mined", args.peers)  # PSS splits pages among the ranks mapping them
    out = {"queries": len(queries), "seconds": seconds, "first_pass_seconds": first_pass,
           "peak_rss_gb": peak_rss_gb(), "pss_gb": pss_gb(),
           "mining_pss_gb": anonymous_gb() - before_load + mapped_pss_gb(Path(args.index).resolve()),
           "postings_per_query_over_docs": float(work)}
    if args.peers > 1:
        rendezvous(Path(args.index).parent / "measured", args.peers)  # each keeps its pages until all measured
    if args.sample_out:
        np.savez(args.sample_out, scores=done[0][0][:args.sample], positions=done[0][1][:args.sample])
    return out


def rendezvous(directory: Path, peers: int) -> None:
    """Wait until `peers` processes have arrived in `directory`."""
    directory.mkdir(exist_ok=True)
    (directory / str(os.getpid())).touch()
    while len(list(directory.iterdir())) < peers:
        time.sleep(0.05)


def child_loop(args) -> dict:
    """Today's loop before the index was saved and batched: bm25s scores every document for one query,
    then its top-k, one query after the other. Timed in rounds that alternate with the batched kernel
    on the saved index (all threads), so each round's ratio is taken at one moment of the host's speed."""
    import bm25s
    import numba

    from retrieval_scaling.bm25 import BM25Index, _tokenizer
    from retrieval_scaling.topk import top_k_rows

    corpus = corpus_dict(args.docs)
    tokenizer = _tokenizer()
    retriever = bm25s.BM25(k1=1.5, b=0.75)
    retriever.index(tokenizer.tokenize(list(corpus.values()), return_as="tuple", show_progress=False),
                    show_progress=False)
    del corpus
    numba.set_num_threads(max(1, min(args.batched_threads, numba.config.NUMBA_NUM_THREADS)))
    index = BM25Index.load(args.index)
    every = synthetic_queries(args.queries, seed=1)
    index.top_k(every, args.depth)  # compiled, and the index's pages faulted in
    queries = every[:args.sample]
    scores = np.empty((len(queries), args.depth), dtype=np.float32)
    positions = np.empty((len(queries), args.depth), dtype=np.int64)
    rounds, per_round = [], -(-len(queries) // ROUNDS)
    batched_block = len(every) // ROUNDS
    for r in range(ROUNDS):
        start = time.perf_counter()
        for row in range(r * per_round, min(len(queries), (r + 1) * per_round)):
            tokens = tokenizer.tokenize([queries[row]], update_vocab=False, return_as="ids", show_progress=False)[0]
            full = retriever.get_scores(tokens) if tokens else np.zeros(args.docs, dtype=np.float32)
            scores[row], positions[row] = (x[0] for x in top_k_rows(full[None, :], args.depth))
        loop_s = time.perf_counter() - start
        start = time.perf_counter()
        index.top_k(every[r * batched_block:(r + 1) * batched_block], args.depth)
        batched_s = time.perf_counter() - start
        rounds.append({"loop_qps": per_round / loop_s, "batched_qps": batched_block / batched_s})
    np.savez(args.sample_out, scores=scores, positions=positions)
    return {"queries": len(queries), "seconds": sum(len(queries) / ROUNDS / r["loop_qps"] for r in rounds),
            "rounds": rounds}


def run_child(step: str, args, **extra) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", step, "--docs", str(args.docs), "--queries", str(args.queries),
           "--depth", str(args.depth), "--sample", str(args.sample), "--index", str(args.index),
           "--threads", str(extra.get("threads", args.threads))]
    for key in ("lo", "hi", "sample_out", "peers", "batched_threads"):
        if key in extra:
            cmd += [f"--{key.replace('_', '-')}", str(extra[key])]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def result_of(proc: subprocess.Popen) -> dict:
    stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"error: a benchmark step failed (exit {proc.returncode})")
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--depth", type=int, default=100)  # data.negatives.depth for MS MARCO
    parser.add_argument("--sample", type=int, default=1000)  # queries the one-query loop is timed and checked on
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--index", default="")
    parser.add_argument("--child", default="")
    parser.add_argument("--lo", type=int, default=0)
    parser.add_argument("--hi", type=int, default=None)
    parser.add_argument("--sample-out", default="")
    parser.add_argument("--peers", type=int, default=1)  # ranks mining at once, measured together
    parser.add_argument("--batched-threads", type=int, default=1)  # the loop step's paired batched rounds
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "mining.json"))
    args = parser.parse_args()
    if args.child:
        step = {"build": child_build, "mine": child_mine, "loop": child_loop}[args.child]
        print(json.dumps(step(args)))
        return

    with tempfile.TemporaryDirectory(prefix="rs-mining-") as tmp:
        args.index = Path(tmp) / "index"
        build = result_of(run_child("build", args))
        one = result_of(run_child("mine", args, sample_out=Path(tmp) / "batched.npz"))
        loop = result_of(run_child("loop", args, threads=1, sample_out=Path(tmp) / "loop.npz",
                                   batched_threads=args.threads))
        half = args.queries // 2
        pair = [run_child("mine", args, threads=max(1, args.threads // 2), lo=lo, hi=hi, peers=2)
                for lo, hi in ((0, half), (half, args.queries))]
        two = [result_of(p) for p in pair]
        with np.load(Path(tmp) / "batched.npz") as a, np.load(Path(tmp) / "loop.npz") as b:
            identical = bool(np.array_equal(a["positions"], b["positions"])
                             and np.array_equal(a["scores"], b["scores"]))

    batched_qps_core = one["queries"] / one["seconds"] / args.threads
    loop_qps_core = loop["queries"] / loop["seconds"]  # one thread
    scale = MSMARCO_PASSAGES / args.docs
    result = {
        "benchmark": "mining", "docs": args.docs, "queries": args.queries, "depth": args.depth,
        "threads": args.threads, **build,
        "batched_queries_per_s": one["queries"] / one["seconds"], "batched_queries_per_s_per_core": batched_qps_core,
        "batched_queries_per_s_first_pass": one["queries"] / one["first_pass_seconds"],
        "loop_queries_per_s_per_core": loop_qps_core, "speedup_per_core": batched_qps_core / loop_qps_core,
        "speedup_machine_unpaired": (one["queries"] / one["seconds"]) / loop_qps_core,
        # the median over rounds that alternate the two: what the host's drift between steps cannot skew
        "speedup_machine": statistics.median(r["batched_qps"] / r["loop_qps"] for r in loop["rounds"]),
        "speedup_machine_rounds": [round(r["batched_qps"] / r["loop_qps"], 2) for r in loop["rounds"]],
        "identical_top_k_on_sample": identical, "sample_queries": args.sample,
        "postings_per_query_over_docs": one["postings_per_query_over_docs"],
        "one_rank_peak_rss_gb": one["peak_rss_gb"], "one_rank_pss_gb": one["pss_gb"],
        "two_ranks_peak_rss_gb": [r["peak_rss_gb"] for r in two], "two_ranks_pss_gb": [r["pss_gb"] for r in two],
        "two_ranks_pss_over_one": sum(r["pss_gb"] for r in two) / one["pss_gb"],
        "two_ranks_rss_over_one": sum(r["peak_rss_gb"] for r in two) / one["peak_rss_gb"],
        "one_rank_mining_pss_gb": one["mining_pss_gb"], "two_ranks_mining_pss_gb": [r["mining_pss_gb"] for r in two],
        "two_ranks_mining_pss_over_one": sum(r["mining_pss_gb"] for r in two) / one["mining_pss_gb"],
        # before: every rank built its own index, so each rank's peak was at least the build's
        "two_ranks_peak_rss_gb_before": 2 * build["build_peak_rss_gb"],
        "msmarco_build_h_extrapolated": build["build_s"] * scale / 3600,
        "msmarco_mining_cpu_h_extrapolated": MSMARCO_QUERIES / batched_qps_core * scale / 3600,
        "msmarco_loop_cpu_h_extrapolated": MSMARCO_QUERIES / loop_qps_core * scale / 3600,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
