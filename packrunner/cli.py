"""The ``packrunner`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from packrunner.benchmarking import compare_algorithms, format_comparison, seed_dataset
from packrunner.config import PackAlgorithm, RunnerConfig
from packrunner.device import Device
from packrunner.simulated import SEED_IPU_BATCH_LATENCY_US, SimulatedDevice

__all__ = ["main"]

DEFAULT_ALGORITHMS = "padded,next_fit,first_fit,lookahead"


def _compare(args: argparse.Namespace) -> int:
    algorithms = [PackAlgorithm(name) for name in args.algorithms.split(",")]
    samples = seed_dataset(
        args.iterations * args.batch_size,
        avg_seq_len=args.avg_seq_len,
        max_seq_len=args.max_seq_len,
    )
    config = RunnerConfig(
        batch_size=args.batch_size,
        seq_len=args.max_seq_len,
        timeout_us=args.timeout_microseconds,
        max_valid_num=args.max_valid_num,
    )

    def device_factory(algorithm: PackAlgorithm) -> Device:
        mode = "unpack_repack" if algorithm is PackAlgorithm.STREAM else "attention_mask"
        return SimulatedDevice(
            batch_size=args.batch_size,
            seq_len=args.max_seq_len,
            batch_latency_us=args.batch_latency_us,
            mode=mode,
            max_valid_num=args.max_valid_num,
        )

    title = (
        f"SimulatedDevice at {args.batch_latency_us / 1000:.1f} ms/batch, "
        f"[{args.batch_size}, {args.max_seq_len}], {len(samples)} seed samples, "
        f"timeout {args.timeout_microseconds} us, median of {args.repeats} interleaved runs"
    )
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    summaries = compare_algorithms(
        device_factory, config, samples, algorithms, repeats=args.repeats, progress=progress
    )
    print(format_comparison(summaries, title=title))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``packrunner`` command."""
    parser = argparse.ArgumentParser(prog="packrunner", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser(
        "compare", help="online packed vs padded throughput on the seed's synthetic data"
    )
    compare.add_argument("--iterations", type=int, default=100, help="batches' worth of samples")
    compare.add_argument("--batch_size", "--batch-size", type=int, default=16)
    compare.add_argument("--max_seq_len", "--max-seq-len", type=int, default=256)
    compare.add_argument("--avg_seq_len", "--avg-seq-len", type=int, default=128)
    compare.add_argument("--max_valid_num", "--max-valid-num", type=int, default=40)
    compare.add_argument(
        "--timeout_microseconds", "--timeout-microseconds", type=int, default=15_000
    )
    compare.add_argument(
        "--batch_latency_us", "--batch-latency-us", type=int, default=SEED_IPU_BATCH_LATENCY_US
    )
    compare.add_argument("--algorithms", default=DEFAULT_ALGORITHMS)
    compare.add_argument("--repeats", type=int, default=3)
    compare.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    compare.set_defaults(handler=_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``packrunner`` console script."""
    args = build_parser().parse_args(argv)
    handler = args.handler
    result: int = handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
