"""``packrunner serve``: flags (TEI's names where TEI has one), environment, entry point.

Every flag can also come from the environment: ``PACKRUNNER_`` + the flag in upper snake case
(``--api-key`` -> ``PACKRUNNER_API_KEY``); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import fields
from typing import Any

from packrunner.errors import PackRunnerError
from packrunner.serve.settings import ServeSettings

__all__ = [
    "ENV_PREFIX",
    "add_arguments",
    "main",
    "run",
    "settings_from_args",
    "settings_from_environment",
]

ENV_PREFIX = "PACKRUNNER_"
_DEFAULTS = ServeSettings()


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("", "none", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


# dest -> (flags, type or "flag", help)
_FLAGS: dict[str, tuple[tuple[str, ...], Any, str]] = {
    "model": (("--model", "--model-id"), str,
              "Hugging Face checkpoint folder or packed ONNX file (default: embedded model)"),
    "tokenizer": (("--tokenizer",), str, "tokenizer.json for an ONNX --model"),
    "name": (("--name", "--served-model-name"), str, "served model name"),
    "host": (("--host", "--hostname"), str, "address to bind (default 127.0.0.1)"),
    "http_port": (("--http-port", "--port", "-p"), int, "HTTP port (0: any free port)"),
    "grpc_port": (("--grpc-port",), _optional(int), "gRPC port (0: any free port; off: none)"),
    "api_key": (("--api-key",), str, "require 'Authorization: Bearer KEY' on inference routes"),
    "max_concurrent_requests": (("--max-concurrent-requests",), int,
                                "requests served at once; beyond: 429 at once"),
    "max_queued_sequences": (("--max-queued-sequences",), int,
                             "sequences waiting to be packed; beyond: 429"),
    "max_client_batch_size": (("--max-client-batch-size",), int, "sequences per request"),
    "max_input_length": (("--max-input-length",), int, "longest sequence (default: seq len)"),
    "auto_truncate": (("--auto-truncate",), "flag", "truncate over-long texts (else 4xx)"),
    "payload_limit": (("--payload-limit",), int, "largest request body in bytes (413)"),
    "request_timeout": (("--request-timeout",), _optional(float),
                        "default end-to-end deadline, seconds (504 / DEADLINE_EXCEEDED)"),
    "graceful_shutdown_timeout": (("--graceful-shutdown-timeout",), float,
                                  "seconds to drain after SIGTERM/SIGINT"),
    "batch_size": (("--batch-size",), int, "rows of the packed batch"),
    "seq_len": (("--seq-len",), int, "tokens per row of the packed batch"),
    "max_valid_num": (("--max-valid-num",), int, "most sequences in one batch"),
    "batch_timeout_us": (("--batch-timeout-us",), int, "partial-batch timeout (microseconds)"),
    "threads": (("--threads",), int, "onnxruntime intra-op threads"),
    "device": (("--device",), str, "onnx (onnxruntime) or sim (SimulatedDevice, load tests)"),
    "sim_batch_latency_us": (("--sim-batch-latency-us",), int, "SimulatedDevice batch latency"),
    "access_log": (("--access-log",), "flag", "one structured log line per request"),
}  # fmt: skip


def _env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` flags to ``parser`` (defaults from ``PACKRUNNER_*`` variables)."""
    for dest, (flags, kind, help_text) in _FLAGS.items():
        env = _env_name(dest)
        default = getattr(_DEFAULTS, dest)
        raw = os.environ.get(env)
        if kind == "flag":
            if raw is not None:
                default = _parse_bool(raw)
            parser.add_argument(
                *flags,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{help_text} [env {env}]",
            )
            continue
        if raw is not None:
            try:
                default = kind(raw)
            except ValueError:
                parser.error(f"{env}={raw!r}: {kind.__name__} expected")
        parser.add_argument(
            *flags, dest=dest, type=kind, default=default, help=f"{help_text} [env {env}]"
        )
    ray = parser.add_argument_group(
        "Ray Serve (--ray; the ray extra; see docs/scale-out.md)",
        "HTTP routes only: Ray's proxy listens on --host/--http-port; gRPC is not served",
    )
    ray.add_argument(
        "--ray", action="store_true", help="serve on Ray Serve, one PackRunner per replica"
    )
    ray.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join ('auto': the one `ray start` set up here; default: start one)",
    )
    ray.add_argument(
        "--replicas", type=int, default=1, help="runner replicas (autoscaling minimum)"
    )
    ray.add_argument(
        "--max-replicas", type=int, default=None, help="autoscale runner replicas up to this"
    )
    ray.add_argument(
        "--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per runner replica"
    )


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """The settings the parsed flags describe."""
    return ServeSettings(**{f.name: getattr(args, f.name) for f in fields(ServeSettings)})


def settings_from_environment() -> ServeSettings:
    """The settings ``PACKRUNNER_*`` variables describe (defaults for the rest)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args([]))


async def _serve(settings: ServeSettings) -> None:
    from packrunner.serve.app import Server

    async with Server(settings) as server:
        print(
            f"packrunner serve: ready http={settings.host}:{server.http_port} "
            f"grpc={settings.host}:{server.grpc_port} model={server.model.name}",
            file=sys.stderr,
            flush=True,
        )
        await server.serve_until_signal()


def run(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM / SIGINT; 0 after a graceful stop."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.access_log:
        logging.getLogger("packrunner.serve.access").setLevel(logging.WARNING)
    try:
        settings = settings_from_args(args)
    except PackRunnerError as exc:
        print(f"packrunner serve: {exc}", file=sys.stderr)
        return 2
    if args.ray:
        from packrunner.integrations.ray import serve_on_ray

        return serve_on_ray(
            settings,
            address=args.ray_address,
            replicas=args.replicas,
            max_replicas=args.max_replicas,
            replica_num_cpus=args.replica_cpus,
        )
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(settings))
    else:
        uvloop.run(_serve(settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m packrunner.serve``."""
    parser = argparse.ArgumentParser(prog="packrunner serve", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
