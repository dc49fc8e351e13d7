"""The package never deserialises code: no pickle, no `torch.load` without `weights_only=True`, no
`trust_remote_code` it did not get from the user, `yaml.safe_load` only, no `eval` / `exec` / `compile`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gmmquant"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def test_there_is_something_to_check():
    assert len(SOURCES) > 30 and any(p.name == "cli.py" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_unsafe_deserialisation(path):
    source = path.read_text()
    tree = ast.parse(source)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems += [f"line {node.lineno}: imports {m}" for m in modules
                         if m.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle")]
    for node, owner, name in calls(tree):
        where = f"line {node.lineno}"
        if name in ("eval", "exec", "compile", "__import__") and isinstance(node.func, ast.Name):  # not model.eval()
            problems.append(f"{where}: {name}()")
        if owner == "torch" and name == "load":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                problems.append(f"{where}: torch.load without weights_only=True")
        if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
            problems.append(f"{where}: yaml.{name} (use yaml.safe_load)")
        for keyword in node.keywords:
            if keyword.arg == "trust_remote_code" and not (isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                problems.append(f"{where}: passes trust_remote_code={ast.unparse(keyword.value)}")
    problems += [f"mentions {word}" for word in ("pickle.load", "numpy.load(allow_pickle=True", "allow_pickle=True")
                 if word in source]
    assert not problems, f"{path.relative_to(PACKAGE)}: {problems}"
