"""The shape of the code (docs/ARCHITECTURE.md): stage layers, imports at the top, one settings table."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import grimp
from importlinter.cli import lint_imports

from blackwheel.core.settings import ENV_VARS, env_table

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "blackwheel"
# The only imports a function may hold: optional or heavy dependencies, each with a reason beside it.
LATE_IMPORTS_ALLOWED = {"torch", "matplotlib", "rich", "psutil", "keyring", "pip"}


def test_the_stage_layers_hold():
    """``lint-imports`` with pyproject.toml's contract: no stage imports one above it, no cycle between stages."""
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_no_module_imports_itself_through_others():
    """No cycle between modules either (the layers above only see between stages)."""
    graph = grimp.build_graph("blackwheel")
    cycles = []

    def visit(module: str, path: tuple[str, ...]) -> None:
        for nxt in sorted(graph.find_modules_directly_imported_by(module)):
            if nxt in path:
                cycles.append(" -> ".join(path[path.index(nxt):] + (nxt,)))
            elif nxt not in done:
                visit(nxt, path + (nxt,))
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph.modules):
        if module not in done:
            visit(module, (module,))
    assert cycles == []


def _late_imports(path: Path):
    lines = path.read_text().splitlines()
    for func in ast.walk(ast.parse(path.read_text())):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node, lines[node.lineno - 1], lines[node.lineno - 2]


def test_imports_are_at_the_top_except_optional_heavy_ones_with_a_reason():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node, line, above in _late_imports(path):
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            reason = "#" in line or above.strip().startswith("#")
            relative = getattr(node, "level", 0)
            if relative or (module or "").split(".")[0] not in LATE_IMPORTS_ALLOWED or not reason:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: {line.strip()}")
    assert offenders == []


def test_every_blackwheel_variable_is_in_the_settings_table_and_the_readme():
    used = set()
    for path in [*SRC.rglob("*.py"), ROOT / "noxfile.py", *(ROOT / "tests").rglob("*.py")]:
        used |= set(re.findall(r"\bBLACKWHEEL_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    listed = {v.name for v in ENV_VARS}
    assert sorted(used - listed) == []
    assert env_table() in (ROOT / "README.md").read_text()


# Import names of what pyproject.toml lists beyond the core dependencies (optional and test extras),
# and of what a build Python brings (torch, numpy): none may be needed to start a command.
NOT_CORE = {"pytest", "_pytest", "matplotlib", "twine", "hypothesis", "pypiserver", "passlib", "build",
            "cyclonedx", "jsonschema", "tvm_ffi", "pynvml", "importlinter", "grimp", "psutil", "einops",
            "torch", "numpy", "setuptools", "wheel", "keyring"}


def test_every_command_starts_with_only_the_core_dependencies():
    """`pip install blackwheel` gives packaging, pyelftools and rich: every command's module must import
    with those alone (``doctor`` once failed for want of pytest, through the deadline plugin's names)."""
    script = (
        "import importlib.abc, sys\n"
        f"NOT_CORE = {sorted(NOT_CORE)!r}\n"
        "class Absent(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in NOT_CORE:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Absent())\n"
        "from blackwheel.cli import LISTED, make_parser\n"
        "for command in LISTED:\n"
        "    make_parser(command)\n"
        "print(len(LISTED))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) >= 19
