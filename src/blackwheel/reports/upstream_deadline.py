"""pytest plugin: a test not started by the run's deadline is skipped, with a reason of its own.

Loaded into upstream's test run (``-p blackwheel.upstream_deadline``) by ``test-upstream
--deadline-s``. A run killed at a time limit writes no JUnit XML, so everything it proved is lost;
a run that skips what it has no time for ends on time with every count it has (``parse_junit``
counts these apart: ``not_run_deadline``). Works under pytest-xdist: each worker reads the same
absolute deadline from the environment.
"""

from __future__ import annotations

import os
import time

import pytest

DEADLINE_ENV = "BLACKWHEEL_TEST_DEADLINE"   # seconds since the epoch
DEADLINE_REASON = "blackwheel: not run, the run's deadline had passed"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and time.time() > float(deadline):
        pytest.skip(DEADLINE_REASON)
