"""Fault runs write what they did into ``faults.json`` (BLACKWHEEL_FAULTS_OUT, else a tmp folder):
per case the seed, the points, trials, survived, lost and anything left behind."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import pytest

from tests.faults import faultkit


@pytest.fixture(scope="session")
def fault_results(tmp_path_factory):
    out = Path(os.environ.get("BLACKWHEEL_FAULTS_OUT") or tmp_path_factory.mktemp("faults"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "faults.json"
    data = {"seed": faultkit.SEED, "trials_per_point": faultkit.TRIALS, "points_per_case": faultkit.POINTS,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "gpu": "none used"},
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": {}}

    def record(case: str, **fields) -> None:
        data["cases"][case] = fields
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")   # after each case: partial runs count

    record.path = path
    yield record
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Read-only inputs shared by the kill and race cases: the mirror, the Sources, and a bundle of both."""
    from blackwheel.sources.bundle import write_bundle
    from blackwheel.sources.fetch import Fetcher

    w = faultkit.make_world(tmp_path_factory.mktemp("world"))
    w["bundle"] = w["tmp"] / "sources.bwb"
    write_bundle([w["sdist"], w["app"]], Fetcher(w["tmp"] / "writer-cache", w["mirror"], offline=True), w["bundle"], {})
    return w


@pytest.fixture(scope="session")
def light_project(tmp_path_factory):
    """The generated CUDA extension without torch's headers in its units (tests/cuda_ext.py): recipe,
    patch, stack pinning this Python's torch, and a mirror holding its sdist."""
    from tests import cuda_ext
    from tests.conftest import has_cuda_torch

    if not has_cuda_torch():
        pytest.skip("needs a CUDA build of torch in this Python")
    return cuda_ext.make_project(tmp_path_factory.mktemp("light"), sys.executable, light=True)
