"""The environment names of the deadline plugin (``upstream_deadline``), apart from the plugin.

The plugin imports pytest; ``test-upstream`` (and so every command of ``cli/reports.py``, ``doctor``
among them) needs only these names, and must start where pytest is not installed.
"""

DEADLINE_ENV = "BLACKWHEEL_TEST_DEADLINE"   # seconds since the epoch
DEADLINE_REASON = "blackwheel: not run, the run's deadline had passed"
NOT_RUN_OUT_ENV = "BLACKWHEEL_NOT_RUN_OUT"  # file: the node ids skipped for the deadline
ONLY_IDS_ENV = "BLACKWHEEL_ONLY_IDS"        # file: run only these node ids
VANISHED_OUT_ENV = "BLACKWHEEL_VANISHED_OUT"  # file: the listed node ids that collection no longer has
UNCOLLECTED_OUT_ENV = "BLACKWHEEL_UNCOLLECTED_OUT"  # file: the listed node ids whose file did not import
