"""Shared fixtures: an isolated blackwheel environment (recipes, cache, wheelhouse) per test."""

from __future__ import annotations

# setuptools first: torch.utils.cpp_extension imports it, and its distutils shim fails once anything
# has imported the standard library's distutils in this process.
import setuptools  # noqa: F401

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cuda_home() -> Path | None:
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    return home if (home / "bin" / "nvcc").exists() else None


def has_cuda_torch() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.version.cuda)


needs_nvcc_and_torch = pytest.mark.skipif(
    cuda_home() is None or not has_cuda_torch(),
    reason="needs nvcc 13 (CUDA_HOME) and a CUDA build of torch in this Python",
)


@pytest.fixture
def bw_env(tmp_path, monkeypatch):
    """Point every blackwheel location at tmp_path; returns it."""
    monkeypatch.setenv("BLACKWHEEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BLACKWHEEL_WHEELHOUSE", str(tmp_path / "wheelhouse"))
    monkeypatch.setenv("BLACKWHEEL_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("CUDA_HOME", str(cuda_home() or "/usr/local/cuda"))
    monkeypatch.delenv("BLACKWHEEL_MIRROR", raising=False)
    monkeypatch.delenv("BLACKWHEEL_OFFLINE", raising=False)
    return tmp_path


@pytest.fixture
def flash_attn_recipes(tmp_path, monkeypatch):
    """The real flash-attn recipe with a stack pinning this Python's torch (no download needed)."""
    from tests.cuda_ext import torch_version

    recipes = tmp_path / "recipes"
    (recipes / "stacks").mkdir(parents=True)
    shutil.copy(ROOT / "recipes" / "flash-attn.toml", recipes)
    shutil.copytree(ROOT / "recipes" / "profiles", recipes / "profiles")
    (recipes / "stacks" / "local.toml").write_text(
        f'name = "local"\ncuda = "13.0"\ndefault = true\n[pins]\ntorch = "{torch_version(sys.executable)}"\n'
        '"flash-attn" = "2.8.3.post2"\n')
    monkeypatch.setenv("BLACKWHEEL_RECIPES", str(recipes))
    monkeypatch.setenv("BLACKWHEEL_PATCHES", str(ROOT / "patches"))
    return recipes


def wait_until(seconds: float, condition) -> bool:
    """``condition()`` became true within ``seconds`` (checked every 50 ms): tests wait on
    conditions with a deadline, never on a sleep (a process ends a little after its signal)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
