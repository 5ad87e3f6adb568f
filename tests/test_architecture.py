"""The package's shape, measured from its source: no import circles, no import inside a function except of an
optional dependency, no module over 500 lines and no function over 80, and no text about how it was built."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "gatelab"
# imported inside functions on purpose: dependencies a user may lack, or heavy ones that `--help` must not pay for
OPTIONAL = ("transformers", "triton", "submitit", "matplotlib", "scipy", "datasets", "gguf", "tqdm",
            "torch.nn.attention.flex_attention", "torch.distributed", "ctypes", "signal")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(SRC.rglob("*.py"))}


def imported(node: ast.AST, here: str) -> list[str]:
    """The gatelab modules an import statement names (relative imports resolved against module `here`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("gatelab")]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        pkg = here.split(".")[:-node.level] if not here.endswith("__init__") else here.split(".")
        base = ".".join(pkg + ([base] if base else []))
    if not base.startswith("gatelab"):
        return []
    return [f"{base}.{a.name}" for a in node.names] + [base]


def import_graph(mods: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the gatelab modules it imports at module level (the imports that run at import time)."""
    graph = {}
    for name, tree in mods.items():
        targets = set()
        for node in tree.body:
            for t in imported(node, name):
                if t in mods and t != name:
                    targets.add(t)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def function_imports(mods: dict[str, ast.Module]) -> list[str]:
    """Imports inside functions of anything but an optional dependency."""
    bad = []
    for name, tree in mods.items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
                    if not all(n.startswith(OPTIONAL) for n in names):
                        bad.append(f"{name}.{fn.name}: {ast.unparse(node)}")
    return bad


def long_functions(mods: dict[str, ast.Module]) -> list[str]:
    return [f"{name}.{fn.name}: {fn.end_lineno - fn.lineno + 1} lines" for name, tree in mods.items()
            for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            and fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_import_circles():
    assert cycles(import_graph(modules())) == []


def package_graph(mods: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Top-level package or module (gatelab.training, gatelab.model, ...) -> those it imports anywhere, inside
    functions included."""
    def top(name: str) -> str:
        return ".".join(name.split(".")[:2])

    graph = {top(name): set() for name in mods}
    for name, tree in mods.items():
        for node in ast.walk(tree):
            graph[top(name)].update(top(t) for t in imported(node, name) if t in mods and top(t) != top(name))
    return graph


# the layers, lowest first (README, "Layout"): each imports only those before it and the shared top-level modules
LAYERS = ("kernels", "attention", "model", "diagnostics", "training", "hf", "reproduce", "cli")


def test_no_circles_between_packages():
    """The layers import one way: no two packages (attention, training, diagnostics, hf, ...) import each other,
    not even inside a function, and none imports a layer above it."""
    graph = package_graph(modules())
    layers = [f"gatelab.{name}" for name in LAYERS]
    assert set(layers) <= graph.keys()
    assert cycles(graph) == []
    upward = [(a, b) for i, a in enumerate(layers) for b in sorted(graph[a]) if b in layers[i + 1:]]
    assert upward == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_imports_inside_functions_but_optional_dependencies():
    assert function_imports(modules()) == []


def test_modules_and_functions_are_short():
    mods = modules()
    long_modules = [f"{n}: {len((SRC.parent / n.replace('.', '/')).with_suffix('.py').read_text().splitlines())}"
                    for n in mods if (SRC.parent / n.replace(".", "/")).with_suffix(".py").exists()
                    and len((SRC.parent / n.replace(".", "/")).with_suffix(".py").read_text().splitlines())
                    > MAX_MODULE_LINES]
    assert long_modules == []
    assert long_functions(mods) == []


def test_attention_runs_through_attend_only():
    """Outside the attention package no module computes attention (SDPA, flex_attention) or imports a routing path
    (hard, soft, block_attention, flex; the random-subset cache and the soft mask's formula aside): the GPT and the Hugging Face adapter reach every mode through attend."""
    offenders = []
    for p in SRC.rglob("*.py"):
        if "attention" in p.relative_to(SRC).parts[:1]:
            continue
        text = p.read_text()
        if re.search(r"scaled_dot_product_attention\(|[^_]flex_attention\(", text):
            offenders.append(f"{module_name(p)} computes attention")
        for m in re.finditer(r"from gatelab\.attention\.(\w+) import ([^\n]+)", text):
            allowed = {"hard": "RandomMaskCache", "soft": "soft_gate_mask"}  # a cache and a formula, not paths
            if m[1] in ("soft", "block_attention", "flex", "hard") and m[2].strip() != allowed.get(m[1]):
                offenders.append(f"{module_name(p)} imports {m[0]}")
    assert offenders == []


def test_the_public_api_resolves():
    import gatelab
    for name in gatelab.__all__:
        assert getattr(gatelab, name) is not None, name
