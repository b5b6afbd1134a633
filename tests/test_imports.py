"""The import graph of ``streamrl/``: no cycles, and the layers import downward only.

Every ``import`` statement counts, those inside functions included (a lazy import dodges a cycle at import time,
it does not remove one); only imports under ``if TYPE_CHECKING:`` are left out (they never run).
"""

import ast
from pathlib import Path

import streamrl
from streamrl.pipeline import _strongly_connected

PACKAGE = Path(streamrl.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], package: str) -> set[str]:
    """The modules (of ``modules``) that ``path``, a module of ``package``, imports, wherever the import statement
    is (type-checking blocks excepted)."""
    tree = ast.parse(path.read_text())
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    skipped = {id(n) for node in guarded for statement in node.body for n in ast.walk(statement)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, modules, name if path.name == "__init__.py" else name.rpartition(".")[0]) - {name}
            for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (the pipeline's own Tarjan)."""
    components = _strongly_connected({node: sorted(nxt for nxt in targets if nxt in graph)
                                      for node, targets in graph.items()})
    return [sorted(c) for c in components if len(c) > 1]


def test_no_import_cycle_inside_streamrl():
    assert cycles(import_graph()) == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "b.py").write_text("import pkg.a\nif TYPE_CHECKING:\n    import pkg.c\n")
    (tmp_path / "c.py").write_text("import pkg.b\n")
    modules = {"pkg.a", "pkg.b", "pkg.c"}
    graph = {f"pkg.{n}": imports_of(tmp_path / f"{n}.py", modules, "pkg") for n in "abc"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_lower_layers_never_import_the_execution_layer_and_it_never_imports_a_hook():
    graph = import_graph()
    for name, imported in graph.items():
        layer = name.split(".")[1] if name.count(".") else ""
        if layer in ("envs", "transforms", "modules", "objectives", "replay"):
            assert not {m for m in imported if m.startswith("streamrl.execution")}, name
        if layer == "execution":
            assert not {m for m in imported if m.startswith("streamrl.hooks")}, name
