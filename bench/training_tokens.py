"""The batch sampler's memory per rank, from examples in memory (before) and from token arrays (after).

Synthetic training data with MS MARCO's shape: `--passages` passages (MS MARCO's length profile,
`scale.synthetic_corpus`) and one query of ~6 words per 17.6 passages (MS MARCO train: 503k queries,
8.84M passages), each with 1 positive and 30 hard negatives drawn from the passages, and teacher scores.
Each measurement is its own process, so its peak RSS is the sampler's alone:

- before: what a cell did until now, the examples as Python objects and every passage tokenized into
  Python lists (a dict keyed by query and passage);
- after: the token arrays (`training_tokens`), built once by another process, memory-mapped;
each then draws `--steps` batches of 64 queries × 16 passages. The batches of both are compared. Besides
the peak RSS, the JSON splits the RSS after drawing into private memory (RssAnon) and mapped file pages
(RssFile): the token arrays' pages that batches touched, which the page cache shares between ranks and
may evict.

    python bench/training_tokens.py [--passages 100000 1000000] [--out bench/results/training_tokens.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from record import write_result  # bench/ is on sys.path when a script runs
from scale import WordTokenizer, synthetic_corpus

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PASSAGES_PER_QUERY = 8_841_823 / 502_939
QUERIES_PER_STEP, GROUP, QUERY_LEN, PASSAGE_LEN = 64, 16, 32, 128


def peak_rss_gb() -> float:
    """This process's own peak RSS: VmHWM, not ru_maxrss, which keeps the parent's RSS at fork across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # KiB
    return float("nan")


def rss_parts_gb() -> dict[str, float]:
    """Now: private memory (RssAnon) and mapped file pages (RssFile: the page cache, shared and evictable)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 2**20
    return {"rss_anon_gb": out.get("RssAnon", float("nan")), "rss_file_gb": out.get("RssFile", float("nan"))}


def write_data(directory: Path, n_passages: int) -> None:
    """examples.jsonl and passages.jsonl as the training-data stage writes them."""
    rng = np.random.default_rng(0)
    texts = synthetic_corpus(n_passages, seed=0)
    n_queries = int(n_passages / PASSAGES_PER_QUERY)
    with (directory / "passages.jsonl").open("w") as out:
        for i, text in enumerate(texts):
            out.write(json.dumps({"_id": f"p{i}", "text": text}) + "\n")
    with (directory / "examples.jsonl").open("w") as out:
        for q in range(n_queries):
            judged = [f"p{i}" for i in rng.choice(n_passages, size=31, replace=False)]
            words = " ".join(f"w{w}" for w in rng.integers(20, 5000, int(rng.integers(3, 9))))
            out.write(json.dumps({"qid": f"q{q}", "query": words, "positives": judged[:1], "negatives": judged[1:],
                                  "teacher": {d: float(s) for d, s in zip(judged, rng.normal(size=31), strict=True)}})
                      + "\n")


class ExamplesSampler:
    """The batch sampler before token arrays (its code at the commit before them): examples as dicts and
    a key → token ids dict."""

    def __init__(self, examples: list[dict], tokens: dict[str, list[int]]):
        self.examples = [e for e in examples if len(e["negatives"]) >= GROUP - 1]
        self.tokens = tokens

    def batch(self, step: int):
        import torch

        from retrieval_scaling.encoders import encode_inputs
        from retrieval_scaling.train import Batch

        n, rng = len(self.examples), np.random.default_rng([0, 1_000_003, step])
        queries, passages, teacher = [], [], []
        for k in range(step * QUERIES_PER_STEP, (step + 1) * QUERIES_PER_STEP):
            ex = self.examples[np.random.default_rng([0, k // n]).permutation(n)[k % n]]
            pos = ex["positives"][rng.integers(len(ex["positives"]))]
            negs = rng.choice(len(ex["negatives"]), size=GROUP - 1, replace=False)
            group = [pos, *(ex["negatives"][i] for i in negs)]
            queries.append(self.tokens["q:" + ex["qid"]])
            passages.extend(self.tokens["d:" + d] for d in group)
            teacher.append([ex["teacher"][d] for d in group])
        q_ids, q_mask = encode_inputs(queries, 1, 0, QUERY_LEN, pad_to=QUERY_LEN)
        p_ids, p_mask = encode_inputs(passages, 1, 0, PASSAGE_LEN, pad_to=PASSAGE_LEN)
        return Batch(q_ids, q_mask, p_ids, p_mask, torch.tensor(teacher, dtype=torch.float32))


def draw(sampler, steps: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    for step in range(steps):
        batch = sampler.batch(step)
        for t in (batch.query_ids, batch.passage_ids, batch.teacher):
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def child(mode: str, directory: Path, steps: int) -> dict:
    from retrieval_scaling.train import BatchSampler
    from retrieval_scaling.training_data import load_examples
    from retrieval_scaling.training_tokens import TrainingTokens, hf_tokenize

    tokenize = hf_tokenize(WordTokenizer(), PASSAGE_LEN)
    start = time.perf_counter()
    if mode == "build":
        with (directory / "passages.jsonl").open() as handle:
            passages = ((r["_id"], r["text"]) for r in map(json.loads, handle))
            (directory / "tokens").mkdir()
            TrainingTokens.build(load_examples(directory), passages, tokenize).save(directory / "tokens")
        return {"seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb()}
    if mode == "before":
        from retrieval_scaling.training_data import load_passages

        examples, passages = load_examples(directory), load_passages(directory)
        # the cell's tokenization before token arrays: every text of the examples, into Python lists
        texts = {f"q:{e['qid']}": e["query"] for e in examples}
        texts.update({f"d:{d}": passages[d] for e in examples for d in (*e["positives"], *e["negatives"])})
        keys = list(texts)
        ids = tokenize([texts[k] for k in keys])
        del texts, passages
        digest = draw(ExamplesSampler(examples, dict(zip(keys, ids, strict=True))), steps)
    else:
        sampler = BatchSampler(TrainingTokens.load(directory / "tokens"), QUERIES_PER_STEP, GROUP, 0, QUERY_LEN,
                               PASSAGE_LEN, 1, 0)
        digest = draw(sampler, steps)
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb(), "batches_sha256": digest,
            **rss_parts_gb()}


def run(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"error: a benchmark step failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", nargs=2, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "training_tokens.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.steps)))
        return
    sizes = {}
    for n in args.passages:
        with tempfile.TemporaryDirectory(prefix="rs-tokens-") as tmp:
            write_data(Path(tmp), n)
            build = run("--child", "build", tmp, "--steps", str(args.steps))
            before = run("--child", "before", tmp, "--steps", str(args.steps))
            after = run("--child", "after", tmp, "--steps", str(args.steps))
        sizes[str(n)] = {"queries": int(n / PASSAGES_PER_QUERY), "build_s": build["seconds"],
                         "build_peak_rss_gb": build["peak_rss_gb"], "before_peak_rss_gb": before["peak_rss_gb"],
                         "after_peak_rss_gb": after["peak_rss_gb"], "after_rss_anon_gb": after["rss_anon_gb"],
                         "after_rss_file_gb": after["rss_file_gb"], "before_rss_anon_gb": before["rss_anon_gb"],
                         "identical_batches": before["batches_sha256"] == after["batches_sha256"]}
    write_result(args.out, {"benchmark": "training_tokens", "steps": args.steps,
                            "batch": f"{QUERIES_PER_STEP} x {GROUP}", "sizes": sizes})


if __name__ == "__main__":
    main()
