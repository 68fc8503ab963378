"""The layer rule (docs/architecture.md): lightning_modules <- app_custom <- cxrfl <- jobs, bench.
Every import of every module is read with `ast` (also the ones inside functions): no upward import,
no import cycle, no NVFlare below app_custom; and the NVFlare-free entry points load no nvflare module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"lightning_modules": 0, "app_custom": 1, "cxrfl": 2, "jobs": 3, "bench": 3}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for top in LAYERS:
        for path in sorted((ROOT / top).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The absolute module names `path` imports; `from pkg import name` counts as pkg.name when that is a module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            found = [s for s in subs if s in MODULES]
            names.update(found or [node.module])
    return names


def _layer(module: str) -> int | None:
    return LAYERS.get(module.split(".")[0])


def test_the_walk_sees_every_layer_and_would_catch_an_upward_import(tmp_path):
    assert {m.split(".")[0] for m in MODULES} == set(LAYERS)
    upward = tmp_path / "bad.py"
    upward.write_text("def f():\n    from cxrfl.cli import main\n")
    assert "cxrfl.cli" in _imports(upward)  # a lazy import inside a function counts too


def test_no_module_imports_a_higher_layer_or_nvflare_below_app_custom():
    problems = []
    for module, path in MODULES.items():
        own = _layer(module)
        for imported in _imports(path):
            target = _layer(imported)
            if target is not None and target > own:
                problems.append(f"{module} imports {imported} (a higher layer)")
            if own == 0 and imported.split(".")[0] in ("nvflare", "cxrfl"):
                problems.append(f"{module} imports {imported}")
    assert not problems, "\n".join(problems)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_there_is_no_import_cycle():
    graph = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself
    assert _cycles(graph) == []


@pytest.mark.parametrize("code", [
    "import lightning_modules, lightning_modules.config, lightning_modules.factory, lightning_modules.data.datamodule",
    "import cxrfl.central, cxrfl.run_folder, cxrfl.options",
    "from cxrfl.cli import main\ntry:\n    main(['central', '--help'])\nexcept SystemExit:\n    pass",
])
def test_nvflare_free_entry_points_load_no_nvflare_module(code):
    probe = code + "\nimport sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'nvflare'))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
