"""What `curves` writes in words: the paper's findings as this sweep shows them, `summary.md` and
`fits.json`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from .scaling import Fit, Target


def budget_label(flops: float) -> str:
    return f"{flops:.3g} FLOPs"


def line_name(paradigm: str, loss: str, budget: float) -> str:
    """A line's key in `fits.json` and in the predictions stored for it: `<paradigm>/<loss>/<budget>`."""
    return f"{paradigm}/{loss}/{float(budget):.6g}"


def findings_rows(found: Sequence[Mapping[str, str]]) -> list[str]:
    """The findings as a markdown table: each, what the paper found, what this sweep shows."""
    return ["| finding | paper | this sweep |", "|---|---|---|",
            *(f"| {f['finding']} | {f['paper']} | {f['this sweep']} |" for f in found)]


def _verdict_scales(fit: Fit | None) -> str:
    if fit is None or fit.alpha_ci is None:
        return "undetermined (no interval)"
    lo, hi = fit.alpha_ci
    if lo > 0:
        return f"scales (α {fit.alpha:.2f}, 95% [{lo:.2f}, {hi:.2f}])"
    if hi < 0:
        return f"gets worse with size (α {fit.alpha:.2f}, 95% [{lo:.2f}, {hi:.2f}])"
    return f"not shown (α {fit.alpha:.2f}, 95% [{lo:.2f}, {hi:.2f}] includes 0)"


def findings(lines: Mapping[tuple, Mapping], target: Target) -> list[dict[str, str]]:
    """The paper's three findings and what this sweep's lines say of each, at its largest budget."""
    top = max(budget for _, _, budget in lines)

    def verdicts(loss: str) -> str:
        return "; ".join(f"{p}: {_verdict_scales(lines[p, loss, top]['fit'])}" for p in ("sparse", "dense")
                         if (p, loss, top) in lines)

    means: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for (paradigm, loss, budget), entry in lines.items():
        for p in entry["points"]:
            means[paradigm, loss, budget, p["params_non_embedding"]].append(p["metric"])
    pairs = [(loss, b, n) for (par, loss, b, n) in means if par == "sparse" and ("dense", loss, b, n) in means]
    sign = 1 if target.bounded else -1

    def mean(*key):
        return sum(means[key]) / len(means[key])

    ahead = [k for k in pairs if sign * mean("sparse", *k) > sign * mean("dense", *k)]
    sparse = (f"sparse ahead in {len(ahead)} of {len(pairs)} (loss, budget, size) triples" if pairs
              else "undetermined (no pair of sparse and dense cells)")
    return [
        {"finding": "1. clear scaling with model size under CL", "paper": "yes",
         "this sweep": verdicts("cl") or "no CL lines"},
        {"finding": "1b. KD about flat across sizes", "paper": "yes",
         "this sweep": (verdicts("kd") or "no KD lines") + " — flat if the interval includes 0"},
        {"finding": "2. sparse beats dense", "paper": "yes", "this sweep": sparse},
    ]


def _interval(low: float | None, high: float | None, fmt: str = ".3f") -> str:
    return "–" if low is None else f"[{low:{fmt}}, {high:{fmt}}]"


def table_head(title: str, *columns: str) -> list[str]:
    """A titled markdown table's first lines."""
    return ["", f"## {title}", "", f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]


def summary_markdown(sweep: str, metric: str, lines: Mapping, optima: Mapping, judged: Sequence[Mapping],
                     found: Sequence[Mapping[str, str]]) -> str:
    out = [f"# Scaling curves of sweep `{sweep}` — {metric}", "", *findings_rows(found)]
    out += table_head("Fits", "paradigm", "loss", "budget", "points", "sizes", "α", "95% interval", "E",
                      "residual RMSE", "interval from", "notes")
    for (paradigm, loss, budget), entry in lines.items():
        fit: Fit | None = entry["fit"]
        sizes = len({p["params_non_embedding"] for p in entry["points"]})
        head = f"| {paradigm} | {loss} | {budget_label(budget)} | {len(entry['points'])} | {sizes} |"
        if fit is None:
            out.append(f"{head} – | – | – | – | – | {entry['why']} |")
            continue
        ci = _interval(*(fit.alpha_ci or (None, None)))
        out.append(f"{head} {fit.alpha:.3f} | {ci} | {fit.E:.3f} | {entry['residuals']['rmse']:.4f} | "
                   f"{entry['resampled']} | {'; '.join(fit.notes)} |")
    checks = [(k, e["extrapolation"]) for k, e in lines.items() if e["fit"] is not None]
    out += table_head("Extrapolation check: fit on all sizes but the largest, predict the largest", "paradigm",
                      "loss", "budget", "largest size", "predicted", "95% interval", "measured", "error", "covered")
    for (paradigm, loss, budget), x in checks:
        if "why" in x:
            out.append(f"| {paradigm} | {loss} | {budget_label(budget)} | – | – | – | – | – | {x['why']} |")
            continue
        covered = "–" if x["covered"] is None else ("yes" if x["covered"] else "**no**")
        out.append(f"| {paradigm} | {loss} | {budget_label(budget)} | {x['x']:.3g} | {x['predicted']:.4f} | "
                   f"{_interval(x['low'], x['high'], '.4f')} | {x['observed']:.4f} | {x['error']:+.4f} | {covered} |")
    if optima:
        out += table_head("Compute-optimal size per budget (isoFLOP)", "paradigm", "loss", "budget", "optimal size",
                          "95% interval", "sizes tried", "note")
        for (paradigm, loss), rows in optima.items():
            for r in rows:
                note = "at the edge of the sizes tried: the optimum may lie beyond" if r["at_edge"] else ""
                tried = ", ".join(f"{s:.3g}" for s in r["sizes_tried"])
                out.append(f"| {paradigm} | {loss} | {budget_label(r['budget'])} | {r['size']:.3g} | "
                           f"{_interval(r['low'], r['high'], '.3g')} | {tried} | {note} |")
    if judged:
        out += table_head("Predictions stored before training", "cell", "model", "line", "predicted", "95% interval",
                          "measured", "verdict", "stored in")
        for p in judged:
            measured = "–" if p["observed"] is None else f"{p['observed']:.4f}"
            out.append(f"| {p['cell_id']} | {p['model']} | {p['line']} | {p['predicted']:.4f} | "
                       f"{_interval(p['low'], p['high'], '.4f')} | {measured} | {p['verdict']} | {p['stored']} |")
    return "\n".join(out) + "\n"


def fits_json(metric: str, target: Target, lines: Mapping, optima: Mapping,
              judged: Sequence[Mapping]) -> dict[str, Any]:
    out: dict[str, Any] = {"metric": metric, "x": "params_non_embedding", "law": target.law, "lines": {}}
    for (paradigm, loss, budget), e in lines.items():
        key = line_name(paradigm, loss, budget)
        if e["fit"] is None:
            out["lines"][key] = {"why": e["why"]}
            continue
        out["lines"][key] = {**e["fit"].to_dict(), "interval_from": e["resampled"], "residuals": e["residuals"],
                             "extrapolation": e["extrapolation"]}
    out["compute_optimal"] = {f"{p}/{lo}": rows for (p, lo), rows in optima.items()}
    out["predictions"] = list(judged)
    return out


NOTE = "mlflow.note.content"  # the tag MLflow renders as a run's or an experiment's description
NOTE_LIMIT = 5000  # characters MLflow keeps of a tag value


def results_table(points: Sequence[Mapping[str, Any]], metric: str) -> list[str]:
    """The metric by model (rows) and paradigm × loss (× budget) (columns), mean over seeds. A column of
    a loss that learns from a teacher names it (`kd ← cross_encoder`), so cells taught by different
    teachers are never averaged together or taken for one another."""
    budgets = len({p["budget"] for p in points}) > 1

    def label(p: Mapping[str, Any]) -> str:
        teacher = p.get("teacher", "none")
        return (f"{p['paradigm']} {p['loss']}" + (f" ← {teacher}" if teacher != "none" else "")
                + (f" @ {p['budget']:.3g}" if budgets else ""))

    column = {p["cell_id"]: label(p) for p in points}
    models = sorted({(p["params_non_embedding"], p["model"]) for p in points})
    columns = sorted(set(column.values()))
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for p in points:
        cells[p["model"], column[p["cell_id"]]].append(p["metric"])
    out = [f"| model | non-embedding params | {' | '.join(columns)} |", "|---|---|" + "---|" * len(columns)]
    for n, model in models:
        row = [f"{sum(cells[model, c]) / len(cells[model, c]):.4f}" if cells[model, c] else "–" for c in columns]
        out.append(f"| {model} | {n:.3g} | {' | '.join(row)} |")
    return out


def description(sweep: str, metric: str, points: Sequence[Mapping[str, Any]], found: Sequence[Mapping[str, str]],
                parent: str) -> str:
    """The sweep's story for the MLflow UI (experiment and parent run): what it is, its results by axes,
    the findings and the curves."""
    models = sorted({p["model"] for p in points})
    budgets = sorted({p["budget"] for p in points})
    out = [f"**Sweep `{sweep}`**: {len(points)} finished cells, models {', '.join(models)} × paradigm × loss, "
           f"each trained under {' / '.join(budget_label(b) for b in budgets)}. Cells are nested under the run "
           f"`sweep {sweep}`; `python -m retrieval_scaling.curves sweep={sweep}` refreshes this text.", "",
           f"**{metric}** (mean over seeds)", "", *results_table(points, metric), "",
           *findings_rows(found), "",
           f"![scaling curves](get-artifact?path=curves%2Fscaling.png&run_uuid={parent})", "",
           "Fits, extrapolation checks and predictions: the artifact `curves/summary.md` of the parent run."]
    text = "\n".join(out)
    return text if len(text) <= NOTE_LIMIT else text[:NOTE_LIMIT - 40] + "\n\n… (cut: see curves/summary.md)"


def describe_sweep(uri: str, sweep: str, parent: str, grid: Mapping[str, str], cells: int) -> None:
    """The first description of a sweep, until `curves` writes its results: what it sweeps."""
    from .tracking_client import client

    c = client(uri)
    if NOTE in c.get_run(parent).data.tags:
        return
    axes = " × ".join(f"{k.removeprefix('grid.')} {v}" for k, v in grid.items())
    text = (f"**Sweep `{sweep}`**: {cells} cells, {axes}. Cells are nested under the run `sweep {sweep}`. Once "
            f"cells finish, `python -m retrieval_scaling.curves sweep={sweep}` (run by a local sweep when it ends) "
            "puts the results table, the findings and the scaling curves here.")
    set_description(c, sweep, parent, text)


def set_description(c, sweep: str, parent: str, text: str) -> None:
    """`text` as the description of the sweep's parent run and of its experiment, as the UI shows both."""
    c.set_tag(parent, NOTE, text)
    c.set_experiment_tag(c.get_experiment_by_name(sweep).experiment_id, NOTE, text)
