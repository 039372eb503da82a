"""Online packing algorithms side by side on SimulatedDevice (PopRT's IPU timing, 8.6 ms/batch).

Prints, for padded, next_fit, first_fit and packrunner's default (lookahead), the deterministic
samples per [16, 256] batch when the whole PopRT dataset is queued before the first batch forms
(n = 1600 and 16000), then the measured online throughput through ``execute_async`` with each
algorithm's ratio to padded (median of interleaved repeats).

    python -m benchmarks.online_algorithms [--iterations 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys

from packrunner import PackAlgorithm, RunnerConfig, SimulatedDevice, plan_batch
from packrunner.bench.compare import compare_algorithms, format_comparison, poprt_dataset

ALGORITHMS = [
    PackAlgorithm.PADDED,
    PackAlgorithm.NEXT_FIT,
    PackAlgorithm.FIRST_FIT,
    PackAlgorithm.LOOKAHEAD,
    PackAlgorithm.STREAM,
]


def queued_samples_per_batch(lengths: list[int], algorithm: PackAlgorithm) -> float:
    """Samples per batch when every sample is queued before the first batch forms."""
    queue = list(lengths)
    batches = 0
    while queue:
        plan = plan_batch(queue, algorithm=algorithm, batch_size=16, seq_len=256, max_valid_num=40)
        taken = set(plan.chosen)
        queue = [length for i, length in enumerate(queue) if i not in taken]
        batches += 1
    return len(lengths) / batches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-latency-us", type=int, default=8_600)
    args = parser.parse_args()

    print("Samples per [16, 256] batch, whole PopRT dataset queued (token limit 32.07):")
    print(f"{'algorithm':<11} {'n=1600':>8} {'n=16000':>8}")
    for algorithm in ALGORITHMS:
        row = [
            queued_samples_per_batch([len(s["input_ids"]) for s in poprt_dataset(n)], algorithm)
            for n in (1600, 16000)
        ]
        print(f"{algorithm.value:<11} {row[0]:>8.2f} {row[1]:>8.2f}")
    print()

    samples = poprt_dataset(args.iterations * 16)

    def device(algorithm: PackAlgorithm) -> SimulatedDevice:
        mode = "unpack_repack" if algorithm is PackAlgorithm.STREAM else "attention_mask"
        return SimulatedDevice(batch_latency_us=args.batch_latency_us, mode=mode)

    summaries = compare_algorithms(
        device,
        RunnerConfig(timeout_us=15_000),
        samples,
        ALGORITHMS,
        repeats=args.repeats,
        progress=lambda line: print(line, file=sys.stderr),
    )
    title = (
        f"Online, SimulatedDevice {args.batch_latency_us / 1000:.1f} ms/batch, {len(samples)} "
        f"samples, median of {args.repeats} interleaved runs"
    )
    print(format_comparison(summaries, title=title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
