"""PopRT's packed_bert_example.py, complete: ``python -m benchmarks.packed_bert [flags]``.

Same as ``packrunner bench``; see ``packrunner bench --help`` for the flags (PopRT's names).
"""

from __future__ import annotations

import sys

from packrunner.bench.main import main

if __name__ == "__main__":
    sys.exit(main())
