"""``packrunner serve``: the pack-runner as a network inference service.

Open Inference Protocol (KServe v2) over HTTP (with Triton's binary tensor extension) and gRPC,
OpenAI-compatible ``/v1/embeddings``, TEI-style routes, Prometheus ``/metrics``; text in through
`tokenizers`. See docs/serving.md. Needs the ``serve`` extra; importing this package does not
(``packrunner.serve.cli`` builds the command line without it), the server classes load lazily.
"""

from __future__ import annotations

import typing

from packrunner.serve.settings import ServeSettings

if typing.TYPE_CHECKING:
    from packrunner.serve.app import Server
    from packrunner.serve.model import ServedModel, load_model

__all__ = ["ServeSettings", "ServedModel", "Server", "load_model"]


def __getattr__(name: str) -> typing.Any:
    if name == "Server":
        from packrunner.serve.app import Server

        return Server
    if name in ("ServedModel", "load_model"):
        from packrunner.serve import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
