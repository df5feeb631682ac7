"""A stages job rank's training passages: a Python dict per process against the shared, memory-mapped store.

A synthetic corpus of `--docs` MS MARCO-shaped passages (`scale.synthetic_corpus`) is written as a BEIR
`corpus.jsonl`. Each mode runs in its own process, as one rank would: `dict` reads the corpus as the
stages job did (`readers.read_corpus`), `store` maps the `PassageStore` written once beforehand. Both then
read every text once (what building the BM25 index or MNTP does) and look up 100,000 random ids (what
the teacher does). Reported per mode: seconds to load, private memory (RssAnon) and peak RSS (VmHWM)
after the reads; and the store's bytes on disk and the time to write it.

    python bench/passages.py [--docs 1000000] [--out bench/results/passages.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from record import write_result  # bench/ is on sys.path when a script runs
from scale import synthetic_corpus

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def status_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20  # KiB
    return float("nan")


def child(mode: str, directory: Path, docs: int) -> dict:
    start = time.perf_counter()
    if mode == "dict":
        from retrieval_scaling.readers import read_corpus

        corpus = read_corpus(directory / "corpus.jsonl")
    else:
        from retrieval_scaling.passages import PassageStore

        corpus = PassageStore(directory / "store")
    loaded = time.perf_counter() - start
    chars = sum(len(t) for t in corpus.values())
    rng = np.random.default_rng(0)
    looked = sum(len(corpus[f"d{i}"]) for i in rng.integers(0, docs, 100_000))
    return {"load_s": loaded, "read_s": time.perf_counter() - start - loaded, "chars": chars, "looked_up": looked,
            "rss_anon_gb": status_gb("RssAnon"), "peak_rss_gb": status_gb("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--child", default="")
    parser.add_argument("--dir", default="")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "passages.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.dir), args.docs)))
        return
    from retrieval_scaling.passages import write_store

    with tempfile.TemporaryDirectory(prefix="rs-passages-") as tmp:
        directory = Path(tmp)
        texts = synthetic_corpus(args.docs, seed=0)
        with (directory / "corpus.jsonl").open("w") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
        (directory / "store").mkdir()
        start = time.perf_counter()
        write_store(directory / "store", ((f"d{i}", t) for i, t in enumerate(texts)), "bench corpus")
        write_s = time.perf_counter() - start
        del texts
        on_disk = sum(p.stat().st_size for p in (directory / "store").iterdir())
        runs = {}
        for mode in ("dict", "store"):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", tmp, "--docs", str(args.docs)],
                                  capture_output=True, text=True, env={**os.environ}, check=True)
            runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["dict"]["chars"] == runs["store"]["chars"] and runs["dict"]["looked_up"] == runs["store"]["looked_up"]
    write_result(args.out, {"benchmark": "passages", "docs": args.docs, "store_write_s": write_s,
                            "store_bytes": on_disk, **{f"{m}_{k}": v for m, r in runs.items() for k, v in r.items()
                                                      if k not in ("chars", "looked_up")},
                            "same_texts": True})


if __name__ == "__main__":
    main()
