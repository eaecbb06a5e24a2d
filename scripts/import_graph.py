"""Print quantloop's package-level import graph and any cycle in it.

Every `import quantloop.x...` / `from quantloop.x... import` in the package,
at module level or inside a function, counts as an edge from the importing
module's package (quantloop/<package>/ or a top-level module) to the imported
one. Exit code 1 when the graph has a cycle.

    python scripts/import_graph.py          # edges and cycles
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "quantloop"


# The layers, top to bottom: a package may import only packages below it.
LAYERS = ["pipelines", "serve", "report", "agents", "tools", "search", "knowledge", "backends", "eval", "benchmarks", "data",
          "models", "gguf", "specs", "tracking", "locks", "schemas", "fileio", "faults", "memory", "paths", "names", "errors"]


def unit_of(module: str, modules: bool = False) -> str:
    """'quantloop.gguf.export' -> 'gguf' (or the whole name with modules=True); 'quantloop.schemas' -> 'schemas'."""
    parts = module.split(".")
    if modules:
        return module
    return parts[1] if len(parts) > 1 else "quantloop"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("quantloop.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "quantloop":  # `from quantloop import x`: a module or package, or a name such as __version__
                out |= {f"quantloop.{a.name}" for a in node.names
                        if (ROOT / a.name).is_dir() or (ROOT / f"{a.name}.py").is_file()}
            elif node.module.startswith("quantloop."):
                out.add(node.module)
    return out


def package_graph(modules: bool = False) -> dict[str, set[str]]:
    """Edges between packages (or, with modules=True, between modules)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        src = unit_of(module_name(path), modules)
        if src == "quantloop":
            continue
        for mod in imported_modules(path):
            dst = unit_of(mod, modules)
            if dst not in (src, "quantloop"):
                graph.setdefault(src, set()).add(dst)
        graph.setdefault(src, set())
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one package (Tarjan): each is a set of packages that
    import one another round a cycle."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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


def upward_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports that point up the LAYERS list (or name a package the list does not know)."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted((s, d) for s, ds in graph.items() for d in ds if rank.get(s, -1) >= rank.get(d, -1))


def main() -> int:
    graph = package_graph()
    order = {name: i for i, name in enumerate(LAYERS)}
    for src in sorted(graph, key=lambda p: order.get(p, -1)):
        print(f"{src:10s} -> {', '.join(sorted(graph[src], key=lambda p: order.get(p, -1))) or '-'}")
    cyc = cycles(graph) + cycles(package_graph(modules=True))
    for c in cyc:
        print("cycle among: " + ", ".join(c))
    up = upward_edges(graph)
    for s, d in up:
        print(f"upward import: {s} -> {d}")
    print(f"{len(cyc)} import cycle(s) (packages and modules), {len(up)} upward import(s)")
    return 1 if cyc or up else 0


if __name__ == "__main__":
    sys.exit(main())
