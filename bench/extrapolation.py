"""Coverage of the leave-largest-out prediction interval on synthetic lines whose law is known.

    python bench/extrapolation.py [--draws 100] [--bootstrap 200] [--out bench/results/extrapolation.json]

Each draw is one line of cells: nDCG-like means on a known law ((1 − m)/m = E + A·N^−α), each cell
scored on the same queries (a shared query difficulty, sd 0.15, plus per-cell noise, sd 0.05). The
line is refitted without its largest size, which it then predicts (`resampling.leave_largest_out`).
Reports, per setting, how often the 95 % interval covered the measured value, the median absolute
error and the median interval width. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from record import write_result  # bench/ is on sys.path when a script runs

from retrieval_scaling.resampling import leave_largest_out, synthetic_line
from retrieval_scaling.scaling import Target

SETTINGS = {  # name: (sizes, seeds per size, E, A, α)
    "3 sizes, 1 seed (the paper's grid)": ([1e9, 3e9, 8e9], 1, 0.3, 40.0, 0.3),
    "4 sizes, 1 seed": ([1e6, 3e6, 1e7, 3e7], 1, 0.3, 40.0, 0.3),
    "4 sizes, 3 seeds": ([1e6, 3e6, 1e7, 3e7], 3, 0.3, 40.0, 0.3),
    "5 sizes, 1 seed (saturating fit)": ([1e6, 3e6, 1e7, 3e7, 1e8], 1, 0.3, 40.0, 0.3),
}
QUERIES = 300
NDCG = Target("ndcg", bounded=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--out", default="bench/results/extrapolation.json")
    args = parser.parse_args()
    results = {}
    for name, (sizes, seeds, E, A, alpha) in SETTINGS.items():
        rng, start = np.random.default_rng(0), time.time()
        lines = (synthetic_line(rng, sizes, target=NDCG, E=E, A=A, alpha=alpha, queries=QUERIES, seeds=seeds)
                 for _ in range(args.draws))
        checks = [leave_largest_out(cells, NDCG, args.bootstrap, i) for i, cells in enumerate(lines)]
        results[name] = {"coverage": float(np.mean([c["covered"] for c in checks])),
                         "median_abs_error": float(np.median([abs(c["error"]) for c in checks])),
                         "median_interval_width": float(np.median([c["high"] - c["low"] for c in checks])),
                         "seconds": round(time.time() - start, 1)}
    write_result(args.out, {"draws": args.draws, "bootstrap": args.bootstrap, "queries": QUERIES,
                            "nominal_level": 0.95, "settings": results})


if __name__ == "__main__":
    main()
