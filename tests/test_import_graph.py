"""The package's imports point one way: read from the source with ast, every ``import`` and ``from ... import`` counts,
at module level or inside a function (a lazy import only postpones a cycle to the first call), and no module on the
list below may reach itself again through them."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "rpsft"

# configuration below its checks and the budget controller; the command modules over the shared user-error wrapper
# (rpsft.terminal); evaluation files: suites (where files live) below loaders (rows, their hash) below data_files
# (`rpsft data eval-files`)
ONE_WAY = ("rpsft.config", "rpsft.budget", "rpsft.preflight", "rpsft.cli", "rpsft.rl.cli", "rpsft.eval.suites",
           "rpsft.eval.loaders", "rpsft.eval.data_files")


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """module -> the package's modules it imports (``rpsft.x.y``; a package is its ``__init__``)."""
    modules: dict[str, tuple[Path, bool]] = {}
    for path in root.rglob("*.py"):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)

    def known(name: str) -> str | None:  # a name's longest prefix that is a module of the package
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in modules.items():
        package = mod if is_pkg else mod.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(known(a.name) for a in node.names if a.name.split(".")[0] == root.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: `from . import x` in a module of package p is p.x, `..` one up
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != root.name:
                    continue
                # `from p import x` imports the module p.x where there is one, else the name x of p
                targets.update(known(f"{source}.{a.name}") if f"{source}.{a.name}" in modules else known(source)
                               for a in node.names)
        graph[mod] = {t for t in targets if t is not None and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_config_cli_and_eval_files_import_one_way():
    graph = import_graph()
    assert set(ONE_WAY) <= set(graph)  # the modules are where the list says (a rename must update it)
    bad = [c for c in cycles(graph) if set(c) & set(ONE_WAY)]
    assert not bad, "import cycles: " + "; ".join(" <-> ".join(c) for c in bad)
    # the direction itself
    assert "rpsft.config" in graph["rpsft.preflight"] and "rpsft.config" in graph["rpsft.budget"]
    assert "rpsft.eval.suites" in graph["rpsft.eval.loaders"] and "rpsft.eval.loaders" in graph["rpsft.eval.data_files"]
    assert "rpsft.terminal" in graph["rpsft.rl.cli"] and "rpsft.rl.cli" in graph["rpsft.cli"]


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    root = tmp_path / "rpsft"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from .sub import b\n")  # a -> sub.b (a module of sub)
    (root / "sub" / "__init__.py").write_text("X = 1\n")
    (root / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")  # b -> c, inside f
    (root / "c.py").write_text("import os\n\ndef g():\n    from . import a\n    from .sub import X\n")  # c -> a, sub
    (root / "d.py").write_text("import rpsft.c\nfrom rpsft import sub\n")  # absolute: d -> c, sub
    graph = import_graph(root)
    assert graph == {"rpsft": set(), "rpsft.a": {"rpsft.sub.b"}, "rpsft.sub": set(), "rpsft.sub.b": {"rpsft.c"},
                     "rpsft.c": {"rpsft.a", "rpsft.sub"}, "rpsft.d": {"rpsft.c", "rpsft.sub"}}
    assert cycles(graph) == [["rpsft.a", "rpsft.c", "rpsft.sub.b"]]
