"""Names that do not resolve at run time. A CUDA-only branch that uses a name its module does not
bind fails only on a GPU, which the CPU suite never reaches (``platform.synchronize`` kept using
``torch`` after ``platform/`` moved its imports into the functions, leaving ``torch`` only under
``if TYPE_CHECKING:``). Both checks read every branch without running it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pyflakes = pytest.importorskip("pyflakes", reason="pyflakes is a test dependency (pip install -e .[test])")
from pyflakes import checker, messages  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UNRESOLVED = (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)


def _sources():
    for folder in ("megatron_prolong", "tools", "benchmarks", "docker", "tests"):
        yield from sorted((ROOT / folder).rglob("*.py"))
    yield ROOT / "pretrain_prolong.py"


def _type_checking_names(tree: ast.Module) -> set[str]:
    """Names a module imports only under ``if TYPE_CHECKING:`` (valid in annotations alone)."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for stmt in ast.walk(node):
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    names.update((a.asname or a.name).split(".")[0] for a in stmt.names)
    return names


def _bound(fn) -> set[str]:
    """Names a function binds itself (arguments, imports, assignments)."""
    out = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    for node in ast.walk(fn):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
    return out


def _runtime_uses(fn, names: set[str]):
    """(line, name) of each load of ``names`` in ``fn``'s code (annotations excluded) that ``fn``
    (or a function inside it) does not bind."""
    bound = _bound(fn)
    annotations = set()
    for node in ast.walk(fn):
        for field in ("annotation", "returns"):
            if isinstance(getattr(node, field, None), ast.AST):
                annotations.update(id(n) for n in ast.walk(getattr(node, field)))
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in names \
                and node.id not in bound and id(node) not in annotations:
            yield node.lineno, node.id


def test_every_name_resolves():
    found = []
    for path in _sources():
        where = path.relative_to(ROOT)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for m in checker.Checker(tree, filename=str(path)).messages:
            if isinstance(m, UNRESOLVED):
                found.append(f"{where}:{m.lineno}: {m.message % m.message_args}")
        names = _type_checking_names(tree)
        if names:
            # outermost functions and methods; a nested function counts with the one around it
            scopes = [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
            for fn in (n for s in scopes for n in s.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
                found += [f"{where}:{line}: {name!r} is imported only under TYPE_CHECKING"
                          for line, name in _runtime_uses(fn, names)]
    assert not found, "\n".join(sorted(set(found)))
