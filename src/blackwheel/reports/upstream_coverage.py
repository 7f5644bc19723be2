"""pytest plugin: deselect upstream tests that ask for more than a kernel set holds.

Loaded into upstream's own test run (``-p blackwheel.reports.upstream_coverage``) by ``test-upstream``.
``BLACKWHEEL_COVERAGE`` holds ``{file glob: {parameter: [values]}}``, the kernel set's declared
coverage in the tests' own parameter names; a test of a matching file whose parameter named there has
a value outside the list is deselected, and so is a test function named by the table's
``exclude-tests`` globs (what no parameter tells apart: an NVFP4 test, a module a test builds for itself). torch dtypes compare by name (``torch.bfloat16`` ->
``"bfloat16"``). Counts per file go to ``BLACKWHEEL_COVERAGE_REPORT``. Imports nothing heavy.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

COVERAGE_ENV = "BLACKWHEEL_COVERAGE"
REPORT_ENV = "BLACKWHEEL_COVERAGE_REPORT"


def normalized(value):
    """A parameter value as a declaration spells it.

    >>> normalized(0.0), normalized("NONE"), normalized(True)
    (0.0, 'NONE', True)
    """
    text = str(value)
    if text.startswith("torch.") and type(value).__name__ == "dtype":
        return text[len("torch."):]
    return value


def outside(params: dict, rules: dict) -> list[str]:
    """``name=value`` for each parameter the rules name whose value they do not list.

    >>> outside({"head_dim": 256, "q_dtype": "float16", "seed": 1}, {"head_dim": [64, 128], "q_dtype": ["float16"]})
    ['head_dim=256']
    """
    return [f"{k}={normalized(v)}" for k, v in params.items() if k in rules and normalized(v) not in rules[k]]


EXCLUDE = "exclude-tests"   # a coverage table's list of test function globs the set does not hold


def excluded(function: str, rules: dict) -> bool:
    """Whether a test function is named by the table's ``exclude-tests`` globs.

    >>> excluded("test_batch_decode_with_paged_kv_cache_nvfp4", {EXCLUDE: ["*_nvfp4"]})
    True
    """
    return any(fnmatch.fnmatchcase(function, g) for g in rules.get(EXCLUDE, ()))


def _rules_for(path: str, coverage: dict) -> dict:
    rules: dict = {}
    for glob, table in coverage.items():
        if fnmatch.fnmatch(path, glob) or fnmatch.fnmatch(path, f"*/{glob}"):
            rules.update(table)
    return rules


def pytest_collection_modifyitems(session, config, items):
    coverage = json.loads(os.environ.get(COVERAGE_ENV) or "{}")
    if not coverage:
        return
    keep, drop, counts = [], [], {}
    for item in items:
        path = Path(str(item.fspath)).as_posix()
        params = getattr(getattr(item, "callspec", None), "params", {})
        rules = _rules_for(path, coverage)
        function = getattr(item, "originalname", None) or item.name.split("[")[0]
        if excluded(function, rules) or outside(params, {k: v for k, v in rules.items() if k != EXCLUDE}):
            drop.append(item)
            key = path[path.rfind("tests/"):] if "tests/" in path else path
            counts[key] = counts.get(key, 0) + 1
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    if os.environ.get(REPORT_ENV):
        Path(os.environ[REPORT_ENV]).write_text(json.dumps(counts, indent=1, sort_keys=True))
