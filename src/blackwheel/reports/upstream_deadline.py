"""pytest plugin: a test not started by the run's deadline is skipped, with a reason of its own.

Loaded into upstream's test run (``-p blackwheel.upstream_deadline``) by ``test-upstream
--deadline-s``. A run killed at a time limit writes no JUnit XML, so everything it proved is lost;
a run that skips what it has no time for ends on time with every count it has (``parse_junit``
counts these apart: ``not_run_deadline``). Works under pytest-xdist: each worker reads the same
absolute deadline from the environment.

Each test it skips is named, one node id a line, in ``NOT_RUN_OUT_ENV``'s file; a later run given
that list (``ONLY_IDS_ENV``) runs those tests and no others (``test-upstream --rest-of``). A listed id
that collection no longer has (upstream renamed a parametrization) would not run and not be counted
without a word: those are named in ``VANISHED_OUT_ENV``'s file. A listed id whose file did not import
is not vanished: the file's failure is counted, and the id is named in ``UNCOLLECTED_OUT_ENV``'s file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from .upstream_env import (DEADLINE_ENV, DEADLINE_REASON, NOT_RUN_OUT_ENV, ONLY_IDS_ENV, UNCOLLECTED_OUT_ENV,
                           VANISHED_OUT_ENV)

COLLECTED = pytest.StashKey[set]()         # every node id collected, before any plugin deselects
BROKEN = pytest.StashKey[set]()            # the files whose collection failed (an import error)


def pytest_itemcollected(item):
    # seen here rather than in modifyitems: there coverage and -k have already dropped some, and
    # a test they drop still exists. Only a --rest-of run needs them.
    if os.environ.get(VANISHED_OUT_ENV):
        item.config.stash.setdefault(COLLECTED, set()).add(item.nodeid)


class _BrokenFiles:
    """Notes each file whose collection failed (the collect report hook is not given the config)."""

    def __init__(self, config):
        self.config = config

    def pytest_collectreport(self, report):
        if report.failed:
            self.config.stash.setdefault(BROKEN, set()).add(report.nodeid.split("::")[0])


def pytest_configure(config):
    if os.environ.get(VANISHED_OUT_ENV):
        config.pluginmanager.register(_BrokenFiles(config), "blackwheel-broken-files")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    only = os.environ.get(ONLY_IDS_ENV)
    if not only:
        return
    wanted = set(Path(only).read_text().split("\n")) - {""}
    items[:] = [item for item in items if item.nodeid in wanted]   # not coverage's deselection: no count
    out = os.environ.get(VANISHED_OUT_ENV)
    if out:     # each xdist worker collects alike and writes the same lists: whole, by rename, so any one wins
        missing = wanted - config.stash.get(COLLECTED, set())
        broken = config.stash.get(BROKEN, set())
        uncollected = {i for i in missing if i.split("::")[0] in broken}
        _write_ids(out, missing - uncollected)
        if os.environ.get(UNCOLLECTED_OUT_ENV):
            _write_ids(os.environ[UNCOLLECTED_OUT_ENV], uncollected)


def _write_ids(out: str, ids) -> None:
    part = Path(f"{out}.{os.getpid()}")
    part.write_text("".join(f"{i}\n" for i in sorted(ids)))
    os.replace(part, out)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and time.time() > float(deadline):
        out = os.environ.get(NOT_RUN_OUT_ENV)
        if out:     # one short append a line: xdist workers write the same file without mixing lines
            with open(out, "a") as f:
                f.write(item.nodeid + "\n")
        pytest.skip(DEADLINE_REASON)
