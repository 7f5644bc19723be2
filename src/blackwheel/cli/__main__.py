"""``python -m blackwheel.cli``: the console entry point, for a Python without the script installed."""

import sys

from . import main

sys.exit(main())
