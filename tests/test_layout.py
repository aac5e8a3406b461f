"""The package layout's contract: two stages that meet only through the cache.

Every import in pipeline/ (module level and inside functions) is read from the source; the import graph has
no circle, ``pipeline.cache`` (the contract) imports neither stage, and neither stage imports the other or
the reports.  ``python tests/test_layout.py`` prints the graph.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pipeline"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the pipeline modules it imports}; `from pkg import name` counts as importing pkg.name when
    that is a module, else pkg."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[mod].update(t for t in targets if t in mods and t != mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
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


def _in(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_stages_meet_only_through_the_cache():
    graph = import_graph()
    assert graph["pipeline.cache"] <= {"pipeline.config", "pipeline.metrics", "pipeline.utils"}, \
        graph["pipeline.cache"]
    for mod, deps in graph.items():
        for dep in deps:
            if _in(mod, "pipeline.stage1"):
                assert not _in(dep, "pipeline.stage2") and not _in(dep, "pipeline.report"), (mod, dep)
            if _in(mod, "pipeline.stage2"):
                assert not _in(dep, "pipeline.stage1") and not _in(dep, "pipeline.report"), (mod, dep)


if __name__ == "__main__":
    g = import_graph()
    for m in sorted(g):
        print(f"{m:34s} -> {', '.join(sorted(d.removeprefix('pipeline.') for d in g[m])) or '-'}")
    found = cycles(g)
    print("circles:", found or "none")
    sys.exit(1 if found else 0)
