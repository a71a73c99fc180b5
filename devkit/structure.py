"""Figures of the code's structure, rerunnable: ``python -m devkit.structure``.

Import cycles among the ``ml`` package's modules and the local stack's (every import, at the
top or inside a function: both make the modules depend on each other) and among the top-level
folders, every edit of ``sys.path``, the longest functions and modules, and how many files
declare each run parameter's default.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in it); ``package`` is a folder of
    the repository (``ml``, ``devkit/stack``)."""
    modules = {p.stem for p in package.glob("*.py")}
    prefix = ".".join(package.relative_to(REPO).parts)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == prefix:
                    names = [alias.name for alias in node.names]
                elif node.module.startswith(prefix + "."):
                    names = [node.module[len(prefix) + 1 :].split(".")[0]]
            elif isinstance(node, ast.Import):
                names = [
                    a.name[len(prefix) + 1 :].split(".")[0]
                    for a in node.names
                    if a.name.startswith(prefix + ".")
                ]
            edges[path.stem] |= {n for n in names if n in modules and n != path.stem}
    return edges


#: The repository's top-level code folders, each imported by its name from the root.
PACKAGES = ("ml", "dags", "plugins", "devkit", "deploy", "benchmarks", "tests")
#: The code that runs the pipeline and its stack (where run parameters could be declared).
RUN_CODE = ("ml", "dags", "plugins", "devkit", "deploy")


def python_files(folders: tuple[str, ...] = PACKAGES) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def package_graph() -> dict[str, set[str]]:
    """Top-level folder -> the other top-level folders its code imports."""
    edges: dict[str, set[str]] = {name: set() for name in PACKAGES}
    for path in python_files():
        owner = path.relative_to(REPO).parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported = [node.module]
            elif isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            else:
                continue
            edges[owner] |= {n.split(".")[0] for n in imported} & set(PACKAGES) - {owner}
    return edges


def path_edits(paths: list[Path]) -> list[str]:
    """``file:line`` of every change to the import path in code: ``sys.path`` assigned,
    sliced or called (insert, append, extend, remove), ``site.addsitedir``. Code here runs as
    modules from the repository root, so none is needed."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            target = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                target = node.func.value if node.func.attr != "addsitedir" else node.func
            elif isinstance(node, ast.Assign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                target = next((t for t in targets if "sys.path" in ast.unparse(t)), None)
            text = ast.unparse(target) if target is not None else ""
            if text in ("sys.path", "site.addsitedir") or text.startswith("sys.path["):
                shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                found.append(f"{shown}:{getattr(node, 'lineno', 0)}")
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other (strongly connected, more than one)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def longest_functions(paths: list[Path], top: int = 5) -> list[tuple[int, str]]:
    sizes = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno:
                lines = node.end_lineno - node.lineno + 1
                sizes.append((lines, f"{path.relative_to(REPO)}:{node.name}"))
    return sorted(sizes, reverse=True)[:top]


def longest_modules(paths: list[Path], top: int = 5) -> list[tuple[int, str]]:
    sizes = [(len(p.read_text().splitlines()), str(p.relative_to(REPO))) for p in paths]
    return sorted(sizes, reverse=True)[:top]


def _literal(node: ast.expr | None) -> bool:
    """A value written out in the code: a number, string or bool (``-1`` and tuples of them
    too); ``None`` means "not given" and a name or ``PARAMETERS[...]`` refers to the schema."""
    if isinstance(node, ast.UnaryOp):
        return _literal(node.operand)
    if isinstance(node, ast.Tuple):
        return all(_literal(item) for item in node.elts)
    return isinstance(node, ast.Constant) and node.value is not None


def declared_defaults(tree: ast.AST) -> set[str]:
    """Names given a literal default in a signature (``name=3``) or a class or module field
    (``name: float = 3.0``); keyword arguments of calls are uses, not declarations."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if _literal(node.value):
                names.add(node.target.id)
        elif isinstance(node, ast.arguments):
            positional = node.posonlyargs + node.args
            pairs = list(
                zip(positional[len(positional) - len(node.defaults) :], node.defaults, strict=True)
            )
            pairs += [
                (a, d)
                for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True)
                if d is not None
            ]
            names.update(arg.arg for arg, default in pairs if _literal(default))
    return names


def default_declarations(names: list[str], paths: list[Path]) -> dict[str, int]:
    """How many files give each run parameter its default: ml/params.py's schema (one entry
    per parameter) plus every other file that writes a literal default for that name; 1 is
    the goal."""
    schema = REPO / "ml" / "params.py"
    declared = [declared_defaults(ast.parse(p.read_text())) for p in paths if p != schema]
    return {name: 1 + sum(name in found for found in declared) for name in names}


def report() -> dict[str, object]:
    from ml.params import PARAMETERS

    python = python_files(RUN_CODE)
    counts = default_declarations(sorted(PARAMETERS), python)
    return {
        "ml_import_cycles": cycles(import_graph(REPO / "ml")),
        "stack_import_cycles": cycles(import_graph(REPO / "devkit" / "stack")),
        "package_import_cycles": cycles(package_graph()),
        "import_path_edits": path_edits(python_files()),
        "longest_functions": longest_functions(python),
        "longest_modules": longest_modules(python),
        "run_parameters": len(counts),
        "parameters_with_a_default_in_more_than_one_file": {
            k: v for k, v in counts.items() if v > 1
        },
    }


if __name__ == "__main__":
    json.dump(report(), sys.stdout, indent=1)
    print()
