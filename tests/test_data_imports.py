"""Imports in finetune/data point down (issue 27): media reads DICOM/NIfTI through medical, and medical
imports nothing of media; the modules of finetune.data.convert import only those below them. Every
import is read, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "finetune" / "data"


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(our module imported, line, inside a function) for every import of a finetune module in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _name(path) if path.name == "__init__.py" else _name(path).rpartition(".")[0]
    local_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from finetune.data import media` imports the module finetune.data.media
            names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        found += [(n, node.lineno, node.lineno in local_lines) for n in dict.fromkeys(names)
                  if n.split(".")[0] == "finetune"]
    return found


def _graph() -> dict[str, set[str]]:
    return {_name(p): {n for n, _, _ in _imports(p)} for p in sorted(DATA.rglob("*.py"))}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_medical_imports_nothing_of_media():
    """media.py reads DICOM/NIfTI through medical.py; medical.py imports no module that imports media
    (MediaError and the limits checks both need live below them, in schema)."""
    graph = _graph()
    medical, media = "finetune.data.medical", "finetune.data.media"
    assert media in graph[medical] or medical in graph[media], "neither imports the other: test is stale"
    assert media not in graph[medical], f"medical imports media: {sorted(graph[medical])}"
    stuck = [c for c in _cycles(graph) if media in c or medical in c]
    assert not stuck, f"import cycles through media/medical: {stuck}"


def test_medical_suffixes_are_defined_once():
    where = []
    for p in sorted((ROOT / "finetune").rglob("*.py")):
        for node in ast.parse(p.read_text(encoding="utf-8")).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == "MEDICAL_SUFFIXES" for t in targets):
                where.append(str(p.relative_to(ROOT)))
    assert where == ["finetune/data/medical.py"], where


def test_media_and_medical_import_our_modules_at_the_top():
    """An import of our own module inside a function hides a dependency (and dodged the cycle here)."""
    hidden = [f"{p.name}:{line} {name}" for p in (DATA / "media.py", DATA / "medical.py")
              for name, line, local in _imports(p) if local]
    assert not hidden, f"function-local imports of our modules: {hidden}"


def test_convert_modules_import_only_those_below_them():
    graph = {m: deps for m, deps in _graph().items() if m.startswith("finetune.data.convert")}
    assert len(graph) >= 8, sorted(graph)
    assert not _cycles(graph), _cycles(graph)
    records = graph["finetune.data.convert.records"]
    assert not {d for d in records if d.startswith("finetune.data.convert")}, records
