"""Integrations of packrunner with other serving systems.

* :mod:`packrunner.integrations.ray`: ``packrunner serve`` on Ray Serve, one PackRunner per
  replica, many replicas and machines (the ``ray`` extra; see docs/scale-out.md).

Importing this package needs nothing beyond packrunner; each integration module needs its extra.
"""

__all__: list[str] = []
