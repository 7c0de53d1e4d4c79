"""The package's layering: no import cycle anywhere in src/, imports point down the layers, and every module
imports on its own in a fresh interpreter."""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"

#: Which layer each package of attnkit sits in: a package may import packages of lower layers only (and its own).
#: README "Development" shows the same picture.
LAYERS = {
    "data": 0,
    "functional": 0,
    "io": 0,
    "masks": 1,
    "measure": 1,
    "sparse": 1,
    "backends": 2,
    "distributed": 3,
    "integrations": 3,
    "nn": 4,
    "models": 5,
    "vision": 5,
    "explain": 6,
    "datasets": 7,
    "text": 7,
    "benchmark": 7,
    "ablation": 8,
    "serve": 8,
    "cli": 9,
}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _type_only(tree) -> set[int]:
    """Ids of the nodes inside ``if TYPE_CHECKING:`` blocks (imports for annotations only, never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _edges(mods):
    """Explicit imports between attnkit modules, at module level and inside functions (not type-only ones)."""

    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges = []
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        type_only = _type_only(tree)
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.startswith("attnkit")]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("attnkit"):
                targets = []
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    targets.append(full if full in mods else resolve(node.module))
            else:
                continue
            edges += [(m, t) for t in targets if t and t != m]
    return edges


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_no_import_cycles():
    nx = pytest.importorskip("networkx")
    graph = nx.DiGraph(_edges(_modules()))
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_imports_point_down_the_layers():
    mods = _modules()
    unknown = sorted({p for p in map(_package, mods) if p is not None and p not in LAYERS})
    assert not unknown, f"packages without a layer in tests/test_layering.py: {unknown}"
    upward = []
    for a, b in _edges(mods):
        pa, pb = _package(a), _package(b)
        if pa is None or pb is None or pa == pb:
            continue  # the root package re-exports; importing `attnkit` itself is the public API
        if LAYERS[pb] >= LAYERS[pa]:
            upward.append(f"{a} -> {b}")
    assert not upward, "imports that do not point down the layers:\n" + "\n".join(upward)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to import each module in a fresh process")
def test_every_module_imports_on_its_own():
    """Each module is imported first, alone, in a fresh child process (forked after torch is loaded)."""
    # Alembic's migration scripts run inside alembic's context, not as importable modules.
    names = sorted(m for m in _modules() if not m.endswith("__main__") and ".migrations." not in m)
    script = textwrap.dedent(
        """
        import os, sys, importlib, traceback
        import torch  # noqa: F401  (loaded once; attnkit is not)
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if status != 0:
                failed.append(name)
        print("FAILED:", failed)
        sys.exit(1 if failed else 0)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
