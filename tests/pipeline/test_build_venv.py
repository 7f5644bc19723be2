"""A build venv made with the machine's own Python gets what the package's own build declares.

Python 3.11's venv keeps the setuptools it bundles (65.5), and ``pip install setuptools`` does not
upgrade it; FlashInfer's pyproject needs >= 77 and fails its metadata step with "`project.license`
must be valid exactly by one definition". Network: the FlashInfer sdist (cached after the first
run) and the build requirements from the package index. About a minute.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from blackwheel.pipeline.build import build_requirements, install_build_requirements, unmet_requirements
from blackwheel.core.recipe import load_recipe, load_stack
from blackwheel.sources.fetch import Fetcher, safe_extract


def _metadata(python: Path, tree: Path) -> subprocess.CompletedProcess:
    """FlashInfer's own metadata step (what `plan` and `build` run first), nothing compiled."""
    return subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--no-deps",
                           "--no-index", "-q", str(tree)], capture_output=True, text=True)


@pytest.mark.network
@pytest.mark.slow
def test_a_venv_of_the_machines_python_gets_flashinfers_build_requirements(tmp_path):
    recipe = load_recipe("flashinfer")
    sdist = recipe.version(load_stack().pins["flashinfer"]).sdist
    tree = safe_extract(Fetcher.from_env(offline=False, mirror=None).fetch(sdist), tmp_path / "src")
    base = getattr(sys, "_base_executable", sys.executable)        # the machine's Python, not this venv's
    subprocess.run([base, "-m", "venv", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    needed = build_requirements(tree, recipe)
    assert any(r.startswith("setuptools") for r in needed), needed
    before = unmet_requirements(str(python), needed)
    if any(u.startswith("setuptools") for u in before):            # Python 3.11: the bundled 65.5
        failed = _metadata(python, tree)
        assert failed.returncode != 0 and "project.license" in failed.stderr + failed.stdout
    install_build_requirements(str(python), needed)
    assert unmet_requirements(str(python), needed) == []
    done = _metadata(python, tree)
    assert done.returncode == 0, done.stderr[-2000:]
