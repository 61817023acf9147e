"""The package's shape: the model never imports the accelerated backends, checkpoints or tools, and no
two modules import each other, directly or around a loop (every import counts, lazy ones too)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"refqwen": ROOT / "refqwen", "refqwen.backends": ROOT / "backends"}


def modules() -> dict[str, Path]:
    """Module name -> file, for refqwen and refqwen.backends (installed from backends/)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if path.is_relative_to(ROOT / "refqwen" / "backends"):
                continue  # a development link to backends/, not a second copy
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def imports(path: Path, known) -> set[str]:
    """The refqwen modules a file imports (`from pkg import sub` names the submodule)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module in known:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(known)
            out |= subs or {node.module}
            if len(subs) < len(node.names):
                out.add(node.module)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_every_module_is_found():
    graph = import_graph()
    assert {"refqwen.model.model", "refqwen.model.ops", "refqwen.checkpoint.open", "refqwen.backends.numba_int8",
            "refqwen.trace"} <= set(graph)


def test_no_import_cycles():
    graph = import_graph()
    cycles = []

    def visit(name, path, on_path, done):
        on_path.add(name)
        for dep in sorted(graph[name]):
            if dep in on_path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep], on_path, done)
        on_path.discard(name)
        done.add(name)

    done = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name], set(), done)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_model_imports_only_the_model():
    """refqwen/model/ is the math a reader never has to leave: it imports only itself and the shared
    definitions (errors, quantization formats, array helpers, reading untrusted files), never backends,
    checkpoints or tools;
    Model.generate and Model.stream are conveniences over refqwen/generate.py."""
    allowed = ("refqwen.model", "refqwen.errors", "refqwen.quant", "refqwen.arrays", "refqwen.generate",
               "refqwen.files")
    for name, deps in import_graph().items():
        if name.startswith("refqwen.model"):
            bad = [d for d in deps if not d.startswith(allowed)]
            assert not bad, f"{name} imports {bad}"
