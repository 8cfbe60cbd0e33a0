"""The layout rules of docs/architecture.md, checked on the source with ``ast``: no import cycles anywhere in the
package, dependencies only down the data path, and a package root that holds sub-packages, not modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "geomprobe"

# What each part of the library may import (besides itself). ``errors`` is the only shared leaf; everything
# else points down the data path: probe -> metrics -> engine -> linalg, metrics -> stats, report reads runs.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "linalg": {"errors"},
    "stats": {"errors"},
    "engine": {"errors", "linalg"},
    "load": {"errors"},
    "runs": {"errors"},
    "optim": {"errors"},
    "trajectory": {"errors"},
    "metrics": {"errors", "engine", "linalg", "stats"},
    "views": {"errors", "engine", "linalg", "metrics"},
    "probe": {"errors", "engine", "linalg", "stats", "metrics", "views", "runs"},
    "report": {"errors", "runs", "trajectory"},
    "doctor": {"errors", "engine", "load"},
    "integrations": {"errors", "probe"},
    "demo": {"errors", "probe", "optim"},
}
# Top-level modules allowed beside the sub-packages; everything else lives in a folder of the data path.
TOP_LEVEL_MODULES = {"__init__.py", "errors.py", "doctor.py"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``geomprobe`` module this file imports, lazy (function-level) imports included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "geomprobe"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "geomprobe":
                continue
            for alias in node.names:  # ``from pkg import submodule`` depends on the submodule
                sub = f"{target}.{alias.name}"
                out.add(sub if _exists(sub) else target)
    return out


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {t for t in _imports(p) if t in modules and t != m} for m, p in modules.items()}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_has_no_import_cycles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_data_path():
    bad = []
    for module, targets in _graph().items():
        part = _part(module)
        if part is None or part.startswith("__"):
            continue  # the package root re-exports the public API
        part = part.removesuffix(".py")
        assert part in ALLOWED, f"{module}: part {part!r} has no place in ALLOWED; add it with its dependencies"
        for t in targets:
            tp = _part(t)
            if tp is not None and tp != part and tp not in ALLOWED[part]:
                bad.append(f"{module} imports {t} ({part} -> {tp})")
    assert not bad, "imports against the data path:\n" + "\n".join(sorted(bad))


def test_nothing_in_the_library_imports_the_cli():
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                 if any(t.startswith("geomprobe.cli") for t in _imports(p))]
    assert not offenders


def test_the_package_root_holds_sub_packages_and_few_modules():
    modules = {p.name for p in PACKAGE.glob("*.py")}
    assert modules <= TOP_LEVEL_MODULES, f"modules at the package root: {sorted(modules - TOP_LEVEL_MODULES)}"
    for d in PACKAGE.iterdir():
        if d.is_dir() and not d.name.startswith(("_", ".")):
            assert (d / "__init__.py").is_file(), f"{d.name}/ has no __init__.py"


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert _find_cycle(graph) == expected


def test_the_rule_check_sees_an_upward_import(tmp_path, monkeypatch):
    # The checker itself must fail on the kind of import it exists to catch.
    fake = tmp_path / "geomprobe"
    (fake / "linalg").mkdir(parents=True)
    (fake / "metrics").mkdir()
    for d in (fake, fake / "linalg", fake / "metrics"):
        (d / "__init__.py").write_text("")
    (fake / "metrics" / "spectrum.py").write_text("")
    (fake / "linalg" / "lanczos.py").write_text("def f():\n    from ..metrics import spectrum\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="linalg -> metrics"):
        test_imports_point_down_the_data_path()


def test_every_sub_package_is_installed():
    # pyproject lists packages explicitly (cli/ is mapped into geomprobe.cli); a folder missing there would
    # import from a source tree and vanish from a wheel.
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")} | {"geomprobe.cli"}
    found |= {"geomprobe.docs"}  # docs/ mapped in as package data (docs/metrics.md, read by `geomprobe explain`)
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"
