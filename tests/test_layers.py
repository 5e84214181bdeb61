"""The package's imports point down its layers (the table in finetune/__init__.py's docstring).

Every import of a package module is read from the source, function-local ones too. A module may
import from a lower layer, or from its own layer without a cycle; never from a higher one. Imports
inside functions are for optional or heavy dependencies only: of the package's own modules, only
the CLI (each command loads what it runs) and the family registry (each family loads its model
classes) import inside functions.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

#: modules that may import package modules inside functions, and why
LAZY = {"finetune.cli": "a command imports what it runs (torch, transformers) only when it runs",
        "finetune.families": "the registry imports a family's module (its model classes) when it is asked for"}


def layer_table(package: Path) -> dict[str, int]:
    """module prefix -> layer, from the first table of the package docstring: `  N  name name ...`
    lines (a longer indent continues the layer above), up to the first blank line after them."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    table: dict[str, int] = {}
    layer = None
    for line in doc.splitlines():
        m = re.match(r"^\s*(\d)\s{2,}(\S.*)$", line)
        if m:
            layer = int(m.group(1))
            names = m.group(2).split()
        elif layer is not None and line.strip():
            names = line.split()
        elif layer is not None:
            break
        else:
            continue
        table.update((name, layer) for name in names)
    return table


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name (without the package) -> file."""
    out = {}
    for p in sorted(package.rglob("*.py")):
        parts = p.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(package: Path, name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported package module, line, inside a function) for every import of the package in `path`."""
    top = package.name
    tree = ast.parse(path.read_text())
    local: set[int] = set()
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom)))
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    known = modules(package)
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = [top, *here][: len(here) + 2 - node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        for t in targets:
            if not (t == top or t.startswith(top + ".")):
                continue
            t = t[len(top) + 1:]
            while t and t not in known:  # `from finetune.x import name`: the module x
                t = t.rpartition(".")[0]
            if t and t != name:
                out.append((t, node.lineno, id(node) in local))
                break
    return out


def layer_of(name: str, table: dict[str, int]) -> int | None:
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in table:
            return table[".".join(parts[:k])]
    return None


def problems(package: Path, lazy: dict[str, str] = LAZY) -> list[str]:
    """Every violation: a module not in the table, an upward import, a function-local import of the
    package outside `lazy`, and each import cycle."""
    table = layer_table(package)
    mods = {n: p for n, p in modules(package).items() if n}
    found, graph = [], {n: set() for n in mods}
    for name, path in mods.items():
        mine = layer_of(name, table)
        if mine is None:
            found.append(f"{name}: not in the layer table of {package.name}/__init__.py")
            continue
        for target, line, inside in imports(package, name, path):
            theirs = layer_of(target, table)
            graph[name].add(target)
            if theirs is not None and theirs > mine:
                found.append(f"{name}:{line}: imports {target} (layer {theirs}) from layer {mine}")
            if inside and f"{package.name}.{name}" not in lazy:
                found.append(f"{name}:{line}: imports {target} inside a function")
    found += [f"import cycle: {' -> '.join(c + [c[0]])}" for c in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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


def test_imports_point_down_the_layers():
    assert problems(ROOT / "finetune") == []


def test_every_module_has_a_layer_and_the_table_names_real_modules():
    package = ROOT / "finetune"
    table, mods = layer_table(package), modules(package)
    assert table, "no layer table in finetune/__init__.py's docstring"
    assert sorted(k for k in table if not any(m == k or m.startswith(k + ".") for m in mods)) == []


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "pkg"
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


DOC = '"""Layers:\n\n    2  top\n    1  low other\n"""\n'


def test_the_checker_fails_on_a_planted_cycle_an_upward_and_a_hidden_import(tmp_path):
    pkg = _plant(tmp_path, {"__init__.py": DOC, "top.py": "from pkg import low\n",
                            "low.py": "from pkg import other\n", "other.py": "from pkg import low\n"})
    assert problems(pkg, lazy={}) == ["import cycle: low -> other -> low"]
    (pkg / "other.py").write_text("def f():\n    from pkg.top import x\n")
    assert problems(pkg, lazy={}) == ["other:2: imports top (layer 2) from layer 1",
                                      "other:2: imports top inside a function",
                                      "import cycle: low -> other -> top -> low"]
    (pkg / "other.py").write_text("")
    assert problems(pkg, lazy={}) == []


@pytest.mark.parametrize("text,expected", [("from . import low\n", "low"), ("from .low import x\n", "low"),
                                           ("import pkg.low as L\n", "low")])
def test_the_checker_reads_relative_and_aliased_imports(tmp_path, text, expected):
    pkg = _plant(tmp_path, {"__init__.py": DOC, "top.py": "", "low.py": text.replace("low", "top"), "other.py": ""})
    assert problems(pkg, lazy={}) == ["low:1: imports top (layer 2) from layer 1"]


def test_no_test_module_imports_another():
    """Fixtures live in conftest.py and shared helpers in the support modules beside the tests
    (media_samples, run_files, sync_counter, ...): a test module imports neither another test module
    nor a fixture from one."""
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: imports {n}" for n in names
                      if n.split(".")[0].startswith("test_")]
    assert found == []
