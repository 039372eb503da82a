"""The benchmark suite behind ``packrunner bench``: PopRT's packed-BERT example, complete.

Modules: :mod:`.latency` (closed and open loops, percentiles), :mod:`.offline` (offline packing
runs), :mod:`.peer` (the ``batched`` library on the same device), :mod:`.report` (tables, JSON,
CSV, plots) and :mod:`.main` (the command).
"""

from __future__ import annotations
