"""The package's layers, read from the source with ``ast``: model types at the bottom, operations above them, the
command line on top, no import cycles, and kernels that know nothing of the model layer.

Every ``import`` and ``from ... import`` counts, at module level and inside functions alike (a lazy import is still
a dependency). ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_TYPES = {"flextron.space", "flextron.attention", "flextron.mlp", "flextron.layers", "flextron.model"}


def _modules(package: str) -> dict[str, Path]:
    """``{dotted name: path}`` of every module under ``package`` (``flextron/data/`` holds data files only)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports (absolute names; modules outside ``known`` kept as written)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if sub in known else target)
    return out


def _graph(package: str) -> dict[str, set[str]]:
    mods = _modules(package)
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def _is_cli(m: str) -> bool:
    """The command line: ``flextron.__main__`` and every module named ``flextron.cli*``."""
    return m == "flextron.__main__" or m.startswith("flextron.cli")


def _is_flextron(m: str) -> bool:
    return m == "flextron" or m.startswith("flextron.")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (restricted to its own modules) as a path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m] & graph.keys()):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    g = _graph("flextron")
    assert "flextron.model" in g["flextron"] and "flextron.attention" in g["flextron.model"]
    assert any(_is_cli(m) for m in g["flextron.__main__"])


def test_no_import_cycles():
    cycle = _cycle(_graph("flextron"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_model_types_import_only_model_types():
    g = _graph("flextron")
    bad = {m: sorted(n for n in g[m] if _is_flextron(n) and n not in MODEL_TYPES) for m in MODEL_TYPES}
    bad = {m: v for m, v in bad.items() if v}
    assert not bad, f"model-type modules import operations, the command line or the package itself: {bad}"


def test_operations_do_not_import_the_command_line():
    g = _graph("flextron")
    ops = [m for m in g if m != "flextron" and not _is_cli(m) and m not in MODEL_TYPES]
    bad = {m: sorted(n for n in g[m] if _is_cli(n) or n == "flextron") for m in ops}
    bad = {m: v for m, v in bad.items() if v}
    assert not bad, f"operation modules import the command line or the package itself: {bad}"


def test_kernels_import_neither_flextron_nor_transformers():
    g = _graph("flextron_kernels")
    bad = {m: sorted(n for n in deps if n.split(".")[0] in ("flextron", "transformers")) for m, deps in g.items()}
    bad = {m: v for m, v in bad.items() if v}
    assert not bad, f"flextron_kernels imports the model layer or transformers: {bad}"
