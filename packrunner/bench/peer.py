"""The peer: the PyPI library ``batched`` (dynamic batching with padding) on the same device."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from packrunner._codec import BatchFeeder
from packrunner.config import PackAlgorithm, RunnerConfig
from packrunner.devices.base import Device
from packrunner.packing import plan_batch, unpack_outputs

__all__ = ["BatchedPeer"]


class BatchedPeer:
    """Serves samples through ``batched.dynamically`` with one padded sample per row.

    The batch function validates and pads up to ``batch_size`` samples with the same
    :class:`~packrunner._codec.BatchFeeder` packrunner uses, runs the device, and cuts outputs
    back: the comparison measures batching policy and engine, not feed-building code.

    Args:
        device: An opened device taking ``[batch_size, seq_len]`` feeds (padded model).
        config: Shapes and limits (its algorithm is taken as ``padded``); ``batch_size`` is
            also ``batched``'s batch size.
        timeout_ms: ``batched``'s timeout.
    """

    def __init__(self, device: Device, config: RunnerConfig, *, timeout_ms: float) -> None:
        import batched

        self.device = device
        self.config = replace(config, algorithm=PackAlgorithm.PADDED)
        self._feeder = BatchFeeder(device, self.config)
        self._fn = batched.dynamically(
            self._run_batch, batch_size=self.config.batch_size, timeout_ms=timeout_ms
        )

    def _run_batch(self, samples: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        prepared = [self._feeder.prepare(s) for s in samples]
        plan = plan_batch(
            [s.length for s in prepared],
            algorithm=PackAlgorithm.PADDED,
            batch_size=self.config.batch_size,
            seq_len=self.config.seq_len,
            max_valid_num=self.config.batch_size,
        )
        feeds = self._feeder.feeds(plan, [prepared[i] for i in plan.chosen])
        outputs = self.device.run(feeds)
        return unpack_outputs(plan, outputs, self._feeder.outputs, seq_len=self.config.seq_len)

    def execute(self, sample: Mapping[str, Any]) -> Any:
        """Blocking call through ``batched``."""
        return self._fn(sample)

    async def execute_async(self, sample: Mapping[str, Any]) -> Any:
        """Async call through ``batched``."""
        return await self._fn.acall(sample)

    def close(self) -> None:
        """Stop ``batched``'s thread and close the device."""
        processor: Any = self._fn
        processor.shutdown()
        self.device.close()


def run_all(peer: BatchedPeer, samples: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Submit every sample at once through ``acall`` and wait for all (the online mode)."""
    import asyncio

    async def go() -> list[Any]:
        return list(await asyncio.gather(*(peer.execute_async(s) for s in samples)))

    return asyncio.run(go())
