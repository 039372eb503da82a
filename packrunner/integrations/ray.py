"""``packrunner serve`` on Ray Serve: one PackRunner per replica, many replicas and machines.

Two deployments (see docs/scale-out.md):

* :class:`RunnerReplica`: each replica owns one PackRunner (through the service's
  :class:`~packrunner.serve.engine.Engine`: deadlines, warm-up, drain, metrics). Its async
  ``__init__`` starts the runner and runs one full warm-up batch, so Ray routes to a replica only
  once it is warm; ``check_health`` fails when the runner is no longer live (Ray then replaces
  the replica); Ray's shutdown hook, ``async def __del__`` (called after Ray has stopped routing
  to the replica and waited for its ongoing requests), drains and closes the runner. There is
  no ``@serve.batch``: the packer is the batcher, and each request's sequences go to it as
  single samples.
* :class:`Ingress`: the service's own Starlette app (every HTTP route of ``packrunner serve``:
  OIP v2 REST with the binary extension, ``/v1/embeddings``, the TEI routes, ``/metrics``),
  built unchanged on a :class:`HandleEngine` whose ``run`` sends a request's sequences to a
  runner replica through a deployment handle. Ray's HTTP proxy forwards to it.

Start it with ``packrunner serve --ray`` or ``serve run packrunner.integrations.ray:app_builder``
(settings as ``key=value`` arguments, e.g. ``device=sim replicas=2``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any, cast

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.types import ASGIApp

from packrunner.config import RunnerConfig
from packrunner.errors import ConfigError
from packrunner.runner import Result
from packrunner.serve.app import build_app
from packrunner.serve.engine import BaseEngine, Engine, EngineState, InstrumentedDevice
from packrunner.serve.errors import ErrorKind, ServeError
from packrunner.serve.metrics import ServeMetrics
from packrunner.serve.model import load_model
from packrunner.serve.service import Service
from packrunner.serve.settings import ServeSettings

__all__ = [
    "APP_NAME",
    "HandleEngine",
    "Ingress",
    "RayBatchMetrics",
    "ReplicaLimits",
    "RunnerReplica",
    "app_builder",
    "build_application",
    "replica_limits",
    "serve_on_ray",
]

logger = logging.getLogger("packrunner.serve")

#: The Ray Serve application name ``packrunner serve --ray`` deploys.
APP_NAME = "packrunner"


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaLimits:
    """Ray Serve's concurrency knobs for a runner replica, derived from its batch shape.

    Attributes:
        max_ongoing_requests: Requests one replica works on at once.
        max_queued_requests: Requests each caller (ingress replica) queues for the deployment
            beyond that; past it the caller gets ``BackPressureError`` (answered 429).
        target_ongoing_requests: The autoscaling target per replica.
    """

    max_ongoing_requests: int
    max_queued_requests: int
    target_ongoing_requests: int


def replica_limits(config: RunnerConfig) -> ReplicaLimits:
    """The concurrency limits for a replica whose runner packs batches of ``config``.

    A replica packs only what it has been sent, so it must hold enough requests to fill its
    batches. In the worst case for packing every request carries one sequence, and a runner
    keeps up to two batches in flight (one on the device, one packed and waiting), with the
    next one filling behind them: ``4 * max_valid_num`` requests in flight keep a full batch
    forming while two run (Ray's default of 5 would leave batches a few samples full). The
    autoscaling target is two full batches' worth per replica (one running, one forming): more
    means requests wait a batch time in the queue, fewer means half-empty batches. Each caller
    may queue as many again before Ray answers back-pressure.
    """
    batch = config.max_valid_num
    return ReplicaLimits(
        max_ongoing_requests=4 * batch,
        max_queued_requests=4 * batch,
        target_ongoing_requests=2 * batch,
    )


class RayBatchMetrics:
    """Per-batch histograms exported through Ray's metrics system, one series per replica.

    ``ray.serve.metrics`` tags every series with the application, deployment and replica, so
    Prometheus scraping Ray's metrics export port on each node sees every replica's batches
    (series ``ray_packrunner_replica_*``). Built inside a replica.
    """

    def __init__(self, model: str, max_valid_num: int) -> None:
        prefix = "packrunner_replica"
        self.device_duration = serve.metrics.Histogram(
            f"{prefix}_device_duration_seconds",
            "One batch on the device.",
            boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0],
            tag_keys=("model",),
        )
        self.batch_samples = serve.metrics.Histogram(
            f"{prefix}_batch_samples",
            "Sequences packed into one batch.",
            boundaries=sorted({1, 2, 4, 8, 16, 24, 32, max_valid_num}),
            tag_keys=("model",),
        )
        self.batch_token_fill = serve.metrics.Histogram(
            f"{prefix}_batch_token_fill_ratio",
            "Real tokens over batch capacity, per batch (the packing gain).",
            boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0],
            tag_keys=("model",),
        )
        for histogram in (self.device_duration, self.batch_samples, self.batch_token_fill):
            # A fresh dict each: Ray adds the replica's own tags to the one it is given.
            histogram.set_default_tags({"model": model})


class RunnerReplica:
    """A replica that owns one PackRunner; Ray routes to it once its warm-up batch has run.

    Args:
        settings: The model, batch shape and runner settings (as for ``packrunner serve``).
        max_ongoing_requests: This deployment's ``max_ongoing_requests`` (the engine's own
            admission bound, so Ray's limit is the one that applies).
    """

    # Ray Serve awaits an async constructor (mypy insists __init__ returns None).
    async def __init__(self, settings: ServeSettings, max_ongoing_requests: int) -> None:  # type: ignore[misc]
        self._grace_s = settings.graceful_shutdown_timeout
        model = load_model(settings)
        config = model.config
        # Each batch is recorded twice: in the replica's own Prometheus registry (inside the
        # Engine) and in Ray's metrics system, which is what is scraped across replicas.
        observed = InstrumentedDevice(
            model.device,
            RayBatchMetrics(model.name, config.max_valid_num),
            config.mask_input_name,
        )
        self._metrics = ServeMetrics(model.name, config.max_valid_num)
        self._engine = Engine(
            dataclasses.replace(model, device=observed),
            self._metrics,
            max_concurrent_requests=max_ongoing_requests,
        )
        await self._engine.start()

    async def run(
        self, samples: Sequence[Mapping[str, Any]], timeout_s: float | None
    ) -> list[Result]:
        """Run one request's sequences (one sample each) within ``timeout_s`` seconds.

        The deadline is taken on the loop this call runs on (Ray may run user code on a loop
        of its own); the runner delivers each result to the loop that submitted it.

        Raises:
            ServeError: As :meth:`Engine.run` (picklable, so the caller gets it intact).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        with self._engine.admit():
            return await self._engine.run(samples, deadline)

    async def metrics(self) -> bytes:
        """This replica's own Prometheus exposition (runner statistics, batch histograms)."""
        return self._metrics.render()

    async def check_health(self) -> None:
        """Ray's health probe: raises when the runner is no longer live (no device left).

        A degraded runner (its last batch failed) stays in service: only a successful batch
        restores it, and a replacement replica would have to warm up from nothing.
        """
        health = self._engine.runner.health()
        if not health.live:
            raise RuntimeError(f"packrunner runner is not live: {health.reason}")

    async def __del__(self) -> None:
        """Ray Serve's shutdown hook: drain what is still admitted, then close the runner."""
        await _stop(getattr(self, "_engine", None), self._grace_s)


class HandleEngine(BaseEngine):
    """The service's engine interface over a deployment handle to the runner replicas.

    Each request's sequences go to one replica (Ray's router picks it), so they share that
    replica's batches. Failures become the :class:`ServeError` each protocol knows how to
    answer: the replica's own errors unchanged; Ray's back-pressure -> OVERLOADED (429); a
    replica that died with the request on it, or no replica running -> UNAVAILABLE (503 with
    ``Retry-After``: the request was not answered and may be sent again); an expired deadline
    -> DEADLINE (the replica's work is cancelled, which withdraws its unpacked samples).

    Args:
        handle: Handle to the :class:`RunnerReplica` deployment.
        metrics: The ingress's metrics (requests, rejections, timeouts).
        max_concurrent_requests: Requests this ingress replica admits at once.
    """

    def __init__(
        self, handle: DeploymentHandle[Any], metrics: ServeMetrics, *, max_concurrent_requests: int
    ) -> None:
        super().__init__(metrics, max_concurrent_requests=max_concurrent_requests)
        self._handle = handle

    @property
    def healthy(self) -> bool:
        """Always: Ray routes only to replicas that warmed up and pass their health check."""
        return True

    async def _start(self) -> None:
        """Nothing to start: each runner replica warms itself up before Ray routes to it."""

    async def run(
        self, samples: Sequence[Mapping[str, Any]], deadline: float | None
    ) -> list[Result]:
        loop = asyncio.get_running_loop()
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        # A unary method: a DeploymentResponse (not a generator).
        response = cast(DeploymentResponse[Any], self._handle.run.remote(list(samples), timeout))
        answered = False
        try:
            async with asyncio.timeout_at(deadline):
                results: list[Result] = await response
            answered = True
            return results
        except TimeoutError:
            self._metrics.timed_out.inc()
            raise ServeError(ErrorKind.DEADLINE, "deadline expired before the answer") from None
        except RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, ServeError):  # the replica's own answer (unpickled: a copy)
                raise cause from None
            raise ServeError(ErrorKind.BACKEND, f"runner replica failed: {cause!r}") from exc
        except BackPressureError as exc:
            raise ServeError(ErrorKind.OVERLOADED, f"overloaded: {exc}", retry_after_s=1) from None
        except (RayActorError, DeploymentUnavailableError) as exc:
            raise ServeError(
                ErrorKind.UNAVAILABLE,
                "the runner replica serving this request died before answering; it was not "
                f"answered and may be sent again ({type(exc).__name__})",
                retry_after_s=1,
            ) from None
        finally:
            if not answered:
                # Cancelled (client gone) or timed out: cancel the replica's work too, which
                # withdraws the samples it has not packed yet.
                response.cancel()

    async def close(self) -> None:
        """Nothing to close: Ray owns the replicas."""
        self.state = EngineState.STOPPED


class Ingress:
    """The HTTP front end: the service's app, its engine calling runner replicas by handle.

    Args:
        settings: As for ``packrunner serve`` (the model here gives the routes its metadata and
            tokenizer; its device is never opened in the ingress).
        runner: Handle to the :class:`RunnerReplica` deployment.
    """

    # Ray Serve awaits an async constructor (mypy insists __init__ returns None).
    async def __init__(self, settings: ServeSettings, runner: DeploymentHandle[Any]) -> None:  # type: ignore[misc]
        self._grace_s = settings.graceful_shutdown_timeout
        model = load_model(settings)
        metrics = ServeMetrics(model.name, model.config.max_valid_num)
        self._engine = HandleEngine(
            runner, metrics, max_concurrent_requests=settings.max_concurrent_requests
        )
        self._service = Service(settings, model, self._engine, metrics)
        await self._engine.start()

    def __serve_build_asgi_app__(self) -> ASGIApp:
        """Ray Serve's late-bound ingress: the service's Starlette app, built unchanged."""
        return build_app(self._service)

    async def __del__(self) -> None:
        """Ray Serve's shutdown hook: new requests get 503 while admitted ones finish."""
        await _stop(getattr(self, "_engine", None), self._grace_s)


async def _stop(engine: BaseEngine | None, grace_s: float) -> None:
    """Drain and close a replica's engine (None: Ray calls ``__del__`` even after the
    constructor failed, before the engine existed)."""
    if engine is not None:
        await engine.drain(grace_s)
        await engine.close()


_RUNNER_DEPLOYMENT = serve.deployment(name="PackRunnerReplica")(RunnerReplica)
# Ray Serve's late-bound ingress: the app comes from Ingress.__serve_build_asgi_app__.
_INGRESS_DEPLOYMENT = serve.deployment(name="PackRunnerIngress")(serve.ingress()(Ingress))


def build_application(
    settings: ServeSettings,
    *,
    replicas: int = 1,
    max_replicas: int | None = None,
    replica_num_cpus: float = 1.0,
    ingress_replicas: int = 1,
    ingress_num_cpus: float = 1.0,
) -> serve.Application:
    """The Ray Serve application: ``ingress_replicas`` front ends over runner replicas.

    Args:
        settings: As for ``packrunner serve`` (``host``, ports and gRPC are Ray's, not these).
        replicas: Runner replicas; with ``max_replicas``, the autoscaling minimum.
        max_replicas: Autoscale between ``replicas`` and this on ongoing requests per replica
            (target: :func:`replica_limits`); None: a fixed count.
        replica_num_cpus: CPUs Ray reserves per runner replica (onnxruntime's threads; set
            ``settings.threads`` to match). Use 0 with an accelerator or SimulatedDevice.
        ingress_replicas: HTTP front-end replicas.
        ingress_num_cpus: CPUs Ray reserves per front-end replica.

    Raises:
        ConfigError: A count or CPU reservation is out of range.
    """
    if replicas < 1 or ingress_replicas < 1:
        raise ConfigError(f"replicas must be >= 1, got {replicas} and {ingress_replicas}")
    if max_replicas is not None and max_replicas < replicas:
        raise ConfigError(f"max_replicas={max_replicas} is below replicas={replicas}")
    if replica_num_cpus < 0 or ingress_num_cpus < 0:
        raise ConfigError("CPU reservations must be >= 0")
    limits = replica_limits(
        RunnerConfig(
            batch_size=settings.batch_size,
            seq_len=settings.seq_len,
            max_valid_num=settings.max_valid_num,
        )
    )
    scaling: dict[str, Any]
    if max_replicas is None:
        scaling = {"num_replicas": replicas}
    else:
        scaling = {
            "autoscaling_config": {
                "min_replicas": replicas,
                "max_replicas": max_replicas,
                "target_ongoing_requests": limits.target_ongoing_requests,
            }
        }
    grace = settings.graceful_shutdown_timeout
    runner = _RUNNER_DEPLOYMENT.options(
        max_ongoing_requests=limits.max_ongoing_requests,
        max_queued_requests=limits.max_queued_requests,
        graceful_shutdown_timeout_s=grace,
        ray_actor_options={"num_cpus": replica_num_cpus},
        **scaling,
    ).bind(settings, limits.max_ongoing_requests)
    ingress = _INGRESS_DEPLOYMENT.options(
        num_replicas=ingress_replicas,
        # The service's own admission answers 429 beyond max_concurrent_requests: Ray must let
        # that many through rather than queue them in its proxy.
        max_ongoing_requests=settings.max_concurrent_requests,
        graceful_shutdown_timeout_s=grace,
        ray_actor_options={"num_cpus": ingress_num_cpus},
    )
    application: serve.Application = ingress.bind(settings, runner)
    return application


#: ``serve run packrunner.integrations.ray:app_builder key=value ...``: these keys go to
#: :func:`build_application`, every other one to :class:`ServeSettings`.
_APPLICATION_KEYS = {
    "replicas": int,
    "max_replicas": int,
    "replica_num_cpus": float,
    "ingress_replicas": int,
    "ingress_num_cpus": float,
}


def app_builder(args: dict[str, str]) -> serve.Application:
    """Ray Serve's application builder (``serve run packrunner.integrations.ray:app_builder``).

    ``args`` are the ``key=value`` pairs of ``serve run``: :func:`build_application`'s keyword
    arguments and :class:`ServeSettings` fields (``device=sim``, ``batch_size=16`` ...), typed
    as the defaults are. Unset settings come from ``PACKRUNNER_*`` as for ``packrunner serve``.

    Raises:
        ConfigError: An unknown key or a value of the wrong type.
    """
    from packrunner.serve.cli import settings_from_environment

    options: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    fields = {field.name: field for field in dataclasses.fields(ServeSettings)}
    base = settings_from_environment()
    for key, text in args.items():
        try:
            if key in _APPLICATION_KEYS:
                options[key] = _APPLICATION_KEYS[key](text)
            elif key in fields:
                overrides[key] = _parse_like(getattr(base, key), text)
            else:
                raise ConfigError(f"unknown argument {key}={text!r}")
        except ValueError as exc:
            raise ConfigError(f"{key}={text!r}: {exc}") from None
    return build_application(dataclasses.replace(base, **overrides), **options)


def _parse_like(default: object, text: str) -> object:
    if text.lower() in ("none", "off", ""):
        return None
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def serve_on_ray(
    settings: ServeSettings,
    *,
    address: str | None,
    replicas: int,
    max_replicas: int | None,
    replica_num_cpus: float,
) -> int:
    """``packrunner serve --ray``: deploy on a Ray cluster, serve until SIGTERM / SIGINT.

    With ``address`` None a local Ray instance is started (and stopped at the end); otherwise
    the cluster at ``address`` (``auto``: the one ``ray start`` set up on this node) is joined
    and left running. Ray's HTTP proxy listens on ``settings.host:settings.http_port``. On a
    signal the application is deleted gracefully: Ray stops routing to the replicas, waits for
    their requests (up to ``graceful_shutdown_timeout``), then closes each runner. 0 after that.
    """
    started_here = address is None
    if started_here:  # Ray's own services on loopback; the proxy binds settings.host
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    else:
        ray.init(address=address)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.http_port})
        application = build_application(
            settings,
            replicas=replicas,
            max_replicas=max_replicas,
            replica_num_cpus=replica_num_cpus,
        )
        serve.run(application, name=APP_NAME, route_prefix="/")
        if settings.grpc_port is not None:
            logger.info("packrunner serve --ray: gRPC is not served on Ray (HTTP only)")
        # Installed after ray.init, which sets a SIGTERM handler of its own in the driver.
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        print(
            f"packrunner serve --ray: ready http={settings.host}:{settings.http_port} "
            f"replicas={replicas}" + (f"..{max_replicas}" if max_replicas else ""),
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
        serve.delete(APP_NAME)
    finally:
        if started_here:
            serve.shutdown()
            ray.shutdown()
    return 0
