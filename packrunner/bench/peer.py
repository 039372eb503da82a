"""The peer: the PyPI library ``batched`` (dynamic batching with padding) on the same device."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from packrunner.config import PackAlgorithm
from packrunner.device import Device
from packrunner.packing import build_feeds, plan_batch, unpack_outputs

__all__ = ["BatchedPeer"]


class BatchedPeer:
    """Serves samples through ``batched.dynamically`` with one padded sample per row.

    The batch function pads up to ``batch_size`` samples into the device's fixed shape with the
    same vectorised feed builder packrunner uses, runs the device, and cuts outputs back: the
    comparison measures batching policy and engine, not feed-building code.

    Args:
        device: An opened device taking ``[batch_size, seq_len]`` feeds (padded model).
        batch_size: Rows (and ``batched``'s batch size).
        seq_len: Tokens per row.
        timeout_ms: ``batched``'s timeout.
    """

    def __init__(self, device: Device, *, batch_size: int, seq_len: int, timeout_ms: float) -> None:
        import batched

        self.device = device
        self.batch_size = batch_size
        self.seq_len = seq_len
        inputs = device.input_specs
        self._token_inputs = [
            n for n in inputs if n not in ("attention_mask", "position_ids", "unpack_info")
        ]
        self._position = "position_ids" if "position_ids" in inputs else None
        self._mask = "attention_mask" if "attention_mask" in inputs else None
        self._fn = batched.dynamically(
            self._run_batch, batch_size=batch_size, timeout_ms=timeout_ms
        )

    def _run_batch(self, samples: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        lengths = [len(s["input_ids"]) for s in samples]
        plan = plan_batch(
            lengths,
            algorithm=PackAlgorithm.PADDED,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            max_valid_num=self.batch_size,
        )
        token_inputs = {
            name: [
                np.asarray(samples[i].get(name, np.zeros(lengths[i])), dtype=np.int32)
                for i in plan.chosen
            ]
            for name in self._token_inputs
        }
        feeds = build_feeds(
            plan,
            token_inputs,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            position_input=self._position,
            mask_input=self._mask,
        )
        specs = self.device.input_specs
        cast = {name: feeds[name].astype(specs[name].dtype) for name in feeds}
        outputs = self.device.run(cast)
        results = unpack_outputs(plan, outputs, self.device.output_specs, seq_len=self.seq_len)
        return results

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
