"""``python -m packrunner.serve``: the same as ``packrunner serve``."""

from __future__ import annotations

import sys

from packrunner.serve.cli import main

sys.exit(main())
