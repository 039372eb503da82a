"""ServeSettings: every knob of ``packrunner serve``, validated once.

The command line (:mod:`packrunner.serve.cli`) fills it from flags and ``PACKRUNNER_*``
environment variables; tests and embedders build it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from packrunner.errors import ConfigError

__all__ = ["ServeSettings"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeSettings:
    """Configuration of one ``packrunner serve`` process.

    Attributes:
        model: Hugging Face checkpoint folder or ONNX file; None serves the embedded default
            model (random weights, QA head, with a generated WordPiece tokenizer).
        tokenizer: ``tokenizer.json`` for an ONNX ``model`` (text routes need one).
        name: Served model name (default: the model folder/file stem, or ``packrunner-bert``).
        host: Address both listeners bind.
        http_port: HTTP port (OIP REST, OpenAI, TEI routes, /metrics); 0 picks a free one.
        grpc_port: gRPC port (OIP); 0 picks a free one, None disables gRPC.
        api_key: Required as ``Authorization: Bearer <key>`` (HTTP) / ``authorization``
            metadata (gRPC) on inference routes; health and metrics stay open.
        max_concurrent_requests: Requests being served at once; beyond: 429 at once.
        max_queued_sequences: Sequences waiting to be packed (the runner's queue); beyond: 429.
        max_client_batch_size: Sequences in one request; beyond: 413 (v2), 422 (TEI), 400.
        max_input_length: Longest sequence in tokens (default and maximum: ``seq_len``).
        auto_truncate: Truncate over-long texts instead of refusing them.
        payload_limit: Largest request body in bytes; beyond: 413.
        request_timeout: Default end-to-end deadline in seconds (None: none). The effective
            deadline is the minimum of this, the gRPC deadline and v2 ``parameters.timeout``.
        graceful_shutdown_timeout: Seconds to drain accepted requests after SIGTERM/SIGINT.
        batch_size, seq_len, max_valid_num: The packed batch shape the model is built for.
        batch_timeout_us: The runner's partial-batch timeout.
        threads: onnxruntime intra-op threads (default: all cores).
        device: ``onnx`` (onnxruntime) or ``sim`` (SimulatedDevice, for load tests).
        sim_batch_latency_us: SimulatedDevice batch latency.
        access_log: Log one structured line per request (logger ``packrunner.serve.access``).
    """

    model: str | None = None
    tokenizer: str | None = None
    name: str | None = None
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int | None = 8001
    api_key: str | None = None
    max_concurrent_requests: int = 512
    max_queued_sequences: int = 8192
    max_client_batch_size: int = 32
    max_input_length: int | None = None
    auto_truncate: bool = False
    payload_limit: int = 4_000_000
    request_timeout: float | None = None
    graceful_shutdown_timeout: float = 30.0
    batch_size: int = 16
    seq_len: int = 256
    max_valid_num: int = 40
    batch_timeout_us: int = 15_000
    threads: int | None = None
    device: Literal["onnx", "sim"] = "onnx"
    sim_batch_latency_us: int = 0
    access_log: bool = False

    def __post_init__(self) -> None:
        positive = (
            "max_concurrent_requests",
            "max_queued_sequences",
            "max_client_batch_size",
            "payload_limit",
            "batch_size",
            "seq_len",
            "max_valid_num",
        )
        for field_name in positive:
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field_name} must be a positive int, got {value!r}")
        if self.max_input_length is not None and not 1 <= self.max_input_length <= self.seq_len:
            raise ConfigError(
                f"max_input_length must be in 1..seq_len={self.seq_len}, "
                f"got {self.max_input_length}"
            )
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ConfigError(f"request_timeout must be > 0, got {self.request_timeout}")
        if self.graceful_shutdown_timeout < 0:
            raise ConfigError("graceful_shutdown_timeout must be >= 0")
        if self.device not in ("onnx", "sim"):
            raise ConfigError(f"device must be 'onnx' or 'sim', got {self.device!r}")

    @property
    def input_limit(self) -> int:
        """The effective longest sequence."""
        return self.max_input_length if self.max_input_length is not None else self.seq_len
