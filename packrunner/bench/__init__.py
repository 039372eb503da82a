"""What ``packrunner compare`` and ``packrunner bench`` run: PopRT's packed-BERT example, complete.

Modules: :mod:`.dataset` (PopRT's synthetic data), :mod:`.devices` (the device factory),
:mod:`.compare` (online runs, algorithms side by side), :mod:`.offline` (offline packing runs),
:mod:`.latency` (closed and open loops, percentiles), :mod:`.peer` (the ``batched`` library on
the same device), :mod:`.accuracy` (MAE per output), :mod:`.suite` (``bench``) and
:mod:`.report` (JSON, CSV, plots). The command line itself is :mod:`packrunner.cli`.
"""

from __future__ import annotations
