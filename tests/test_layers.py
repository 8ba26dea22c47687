"""The package's floor plan, enforced: no import cycle (imports inside functions included) and every
import points down the layers. A violation names the edge, its file and line."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "platform" / "openclaw"

LAYERS = ["foundation", "engine", "data", "tracking", "exports", "advice", "profiling", "runtime", "launch", "sweeps",
          "front"]
"""Bottom to top: a module may import modules of its own layer or below."""
FOUNDATION = {"openclaw.config", "openclaw.errors", "openclaw.constants", "openclaw.section", "openclaw.user_code",
              "openclaw.config_schema", "openclaw.config_files", "openclaw.config_tree"}
"""Plus every component's own config section, `openclaw.<component>[.<sub>].config`."""
FRONT = {"openclaw", "openclaw.sdk", "openclaw.cli", "openclaw.cli_args"}
FOUNDATION_THIRD_PARTY = {"pydantic", "pydantic_core", "yaml"}
RAY_PRIVATE = "openclaw.runtime.ray_private"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    """A module (`openclaw.x.y`) or a third-party import's dotted name (`ray.train`)."""
    where: str
    in_function: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PKG.parent / rel).with_suffix(".py").is_file() or (PKG.parent / rel / "__init__.py").is_file()


def edges_of(path: Path) -> list[Edge]:
    """Every import in the file, at any depth (functions and classes included)."""
    source, tree = module_name(path), ast.parse(path.read_text(), str(path))
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        where, nested = f"{path.relative_to(PKG.parent.parent)}:{getattr(node, 'lineno', 0)}", id(node) in functions
        if isinstance(node, ast.Import):
            out += [Edge(source, a.name, where, nested) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module != "__future__":
            for a in node.names:  # `from openclaw.engine import checkpoint` imports the module openclaw.engine.checkpoint
                full = f"{node.module}.{a.name}"
                out.append(Edge(source, full if is_module(full) else node.module, where, nested))
    return out


def package_edges() -> list[Edge]:
    return [e for path in sorted(PKG.rglob("*.py")) for e in edges_of(path)]


def layer(module: str) -> str:
    if module in FOUNDATION or module.endswith(".config"):
        return "foundation"
    if module in FRONT:
        return "front"
    return module.split(".")[1]


def violations(edges: list[Edge]) -> list[str]:
    """Every edge that breaks the layer rules, as 'source -> target (file:line): why'."""
    found = []
    for e in edges:
        src_layer, top = layer(e.source), e.target.split(".")[0]
        why = None
        if top == "openclaw":
            if LAYERS.index(layer(e.target)) > LAYERS.index(src_layer):
                why = f"{src_layer} may not import {layer(e.target)} (layers: {' < '.join(LAYERS)})"
        elif src_layer == "foundation" and top not in FOUNDATION_THIRD_PARTY and top not in sys.stdlib_module_names:
            why = f"foundation imports only {', '.join(sorted(FOUNDATION_THIRD_PARTY))} and the standard library"
        elif src_layer == "engine" and top in ("ray", "mlflow", "pyarrow"):
            why = "the engine is plain torch: no ray, mlflow or pyarrow"
        elif src_layer == "data" and (top == "mlflow" or (top == "ray" and e.source != "openclaw.data.prep")):
            why = "data never imports mlflow, and Ray only where preparation runs as Ray Data tasks (data.prep)"
        elif src_layer == "tracking" and e.target.startswith("ray.train"):
            why = "tracking never imports ray.train"
        if top == "ray" and ("._internal" in e.target or "._private" in e.target) and e.source != RAY_PRIVATE:
            why = f"only {RAY_PRIVATE} imports private Ray modules"
        if why:
            found.append(f"{e.source} -> {e.target} ({e.where}): {why}")
    return found


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The import cycles among openclaw's modules (strongly connected components of more than one)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.target.split(".")[0] == "openclaw" and e.target != e.source:
            graph.setdefault(e.source, set()).add(e.target)
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle():
    assert cycles(package_edges()) == []


def test_every_import_points_down_the_layers():
    assert violations(package_edges()) == []


def test_a_planted_violation_and_cycle_are_caught():
    edges = package_edges()
    planted = [Edge("openclaw.engine.engine", "ray.train", "planted:1", False),
               Edge("openclaw.engine.engine", "openclaw.tracking.tracker", "planted:2", True),
               Edge("openclaw.data.stream", "mlflow", "planted:3", False),
               Edge("openclaw.launch.session", "ray.train.v2._internal.execution.context", "planted:4", False),
               Edge("openclaw.config", "torch", "planted:5", False),
               Edge("openclaw.tracking.run", "openclaw.sweeps.launch", "planted:6", True)]
    found = violations(edges + planted)
    assert len(found) == len(planted), found
    for edge in planted:
        assert any(f"{edge.source} -> {edge.target} ({edge.where})" in v for v in found), edge
    looped = cycles(edges + planted)  # tracking.run -> sweep.launch -> ... -> tracking.run, through a function
    assert looped and any({"openclaw.tracking.run", "openclaw.sweeps.launch"} <= set(c) for c in looped)


def test_the_scan_sees_imports_inside_functions():
    found = [e for e in package_edges() if e.source == "openclaw.cli" and e.in_function]
    assert any(e.target == "openclaw.launch.session" for e in found), found


def test_files_and_functions_stay_small():
    """No file over 300 lines; no function over 60 (the README says why where one is longer)."""
    long_files = [f"{p.relative_to(PKG)}: {n}" for p in PKG.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > 300]
    long_functions = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long_functions.append(f"{p.relative_to(PKG)}:{node.lineno} {node.name}: {n}")
    assert long_files == [] and long_functions == []


def test_no_unused_import_undefined_name_or_unused_variable():
    """Pyflakes' checks (ruff's `F` rules, pyproject's `[tool.ruff]`) over the package, the tests, the
    benches, the jobs and the data scripts."""
    import subprocess
    root = PKG.parents[1]
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                          "platform", "tests", "bench", "jobs", "data", "deploy"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_subpackage_shadows_an_sdk_function():
    """`import openclaw.<x>` sets the attribute <x> on the package: a subpackage named like an SDK
    function (`openclaw.sweep`) would replace the function once anything imported it."""
    import openclaw
    subpackages = {p.parent.name for p in PKG.glob("*/__init__.py")} | {p.stem for p in PKG.glob("*.py")}
    assert not subpackages & set(openclaw.__all__), subpackages & set(openclaw.__all__)
    import openclaw.sweeps.launch  # noqa: F401
    assert callable(openclaw.sweep) and callable(openclaw.train) and callable(openclaw.load_model)


def test_the_ray_train_controller_unpickles_the_training_function_without_the_engine():
    """Ray Train pickles the training function and its config into the controller's arguments; the
    controller unpickles them at start and never calls the function. What openclaw hands it must not make
    it import torch or the training loop (about 2 s on the CPUs the workers are starting on)."""
    import subprocess

    from ray import cloudpickle

    from openclaw.launch import ray_setup
    from openclaw.runtime.inputs import LoopInputs
    inputs = LoopInputs(config={}, run_id="", run_dir="", data={}, secrets={}, tracking=None, control=None,
                        progress=None, job_start_time=0.0)
    blob = cloudpickle.dumps((ray_setup.train_loop, {"inputs": inputs}))
    probe = ("import pickle, sys; fn, cfg = pickle.loads(sys.stdin.buffer.read()); "
             "print([m for m in ('torch', 'openclaw.runtime.loop', 'mlflow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], input=blob, capture_output=True, check=True, cwd=PKG.parent)
    assert out.stdout.decode().strip() == "[]", out


def test_reading_a_config_imports_no_torch_ray_or_mlflow():
    """The CLI validates a config before anything heavy loads (exit 2 in moments on a typo)."""
    probe = ("import sys, openclaw.config; openclaw.config.load_config('jobs/configs/digits.yaml'); "
             "print([m for m in ('torch', 'ray', 'mlflow', 'pyarrow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True, cwd=PKG.parents[1],
                         env={**os.environ, "PYTHONPATH": str(PKG.parent)})
    assert out.stdout.decode().strip() == "[]", out
