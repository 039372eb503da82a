"""Shape sets, the cost model and shape-aware planning, without any model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packrunner import (
    BatchCost,
    ConfigError,
    CostModel,
    PackAlgorithm,
    PackPlan,
    PackRunner,
    RunnerConfig,
    ShapeSet,
    SimulatedDevice,
    plan_batch,
    plan_shaped,
    simulated_reference,
)
from packrunner.cost import calibrate
from packrunner.devices.simulated import ORT_DEFAULT_MODEL_COST
from tests._support import make_sample

BUCKETS = ShapeSet.buckets([(64, 64), (32, 128), (16, 256)])
DYNAMIC = ShapeSet.dynamic(max_rows=64, max_width=256, max_tokens=4096, width_multiple=8)
PACKING = [PackAlgorithm.LOOKAHEAD, PackAlgorithm.FIRST_FIT, PackAlgorithm.NEXT_FIT]


# ---------------------------------------------------------------------------------- ShapeSet


def test_shape_sets_say_what_runs() -> None:
    fixed = ShapeSet.fixed(16, 256)
    assert fixed.is_single and not fixed.is_dynamic and (16, 256) in fixed
    assert (16, 128) not in fixed
    assert BUCKETS.compiled == ((64, 64), (32, 128), (16, 256))
    assert (BUCKETS.max_rows, BUCKETS.max_width, BUCKETS.max_tokens) == (64, 256, 4096)
    assert (32, 128) in BUCKETS and (32, 64) not in BUCKETS
    assert DYNAMIC.is_dynamic and not DYNAMIC.is_single
    assert (64, 64) in DYNAMIC and (3, 40) in DYNAMIC and (16, 256) in DYNAMIC
    assert (64, 128) not in DYNAMIC  # over the token budget
    assert (4, 30) not in DYNAMIC  # not a multiple of 8
    assert (65, 8) not in DYNAMIC and (1, 264) not in DYNAMIC
    assert "16x256" not in DYNAMIC
    assert DYNAMIC.round_width(1) == 8 and DYNAMIC.round_width(250) == 256
    assert DYNAMIC.rows_for(256) == 16 and DYNAMIC.rows_for(32) == 64
    assert set(DYNAMIC.calibration_shapes()) == {
        (16, 32),
        (64, 32),
        (8, 128),
        (32, 128),
        (4, 256),
        (16, 256),
    }
    assert BUCKETS.calibration_shapes() == BUCKETS.compiled


@pytest.mark.parametrize(
    "build",
    [
        lambda: ShapeSet.buckets([]),
        lambda: ShapeSet.fixed(0, 256),
        lambda: ShapeSet.buckets([(16, True)]),
        lambda: ShapeSet.dynamic(max_rows=4, max_width=256, max_tokens=100),
        lambda: ShapeSet.dynamic(max_rows=4, max_width=256, width_multiple=0),
    ],
)
def test_bad_shape_sets_are_refused(build: object) -> None:
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]


def test_a_device_declares_its_one_shape_by_default() -> None:
    assert SimulatedDevice(batch_size=4, seq_len=32).shapes == ShapeSet.fixed(4, 32)


def test_runner_refuses_a_config_shape_the_device_cannot_run() -> None:
    device = SimulatedDevice(shapes=BUCKETS, batch_latency_us=0)
    with pytest.raises(ConfigError, match="runner config"):
        PackRunner(device, RunnerConfig(batch_size=8, seq_len=256))
    with pytest.raises(ConfigError, match="stream"):
        PackRunner(device, RunnerConfig(algorithm=PackAlgorithm.STREAM, unpack_info_input_name="x"))


# -------------------------------------------------------------------------------- cost model


def test_fit_recovers_the_curve_and_measured_shapes_win() -> None:
    truth = BatchCost(2e-3, 5e-6, 8e-9)
    timings = {shape: [truth(shape)] * 3 for shape in DYNAMIC.calibration_shapes()}
    model = CostModel.from_timings(timings)
    assert model.calibrated
    for coefficient, expected in zip(
        (model.curve.fixed_s, model.curve.per_token_s, model.curve.per_token_width_s),
        (2e-3, 5e-6, 8e-9),
        strict=True,
    ):
        assert coefficient == pytest.approx(expected, rel=1e-6)
    assert model.estimate((40, 96)) == pytest.approx(truth((40, 96)), rel=1e-6)
    bumped = CostModel.from_timings({(16, 256): [1.0, 9.0, 2.0], (8, 128): [0.5]})
    assert bumped.estimate((16, 256)) == 2.0  # the median of what was measured


def test_fit_never_lets_cost_fall_as_a_batch_grows() -> None:
    # Noisy timings whose unconstrained fit has a negative attention term.
    curve = BatchCost.fit({(16, 256): 1.0, (64, 64): 1.3, (128, 32): 1.4, (1, 8): 0.1})
    assert min(curve.fixed_s, curve.per_token_s, curve.per_token_width_s) >= 0.0
    with pytest.raises(ValueError):
        BatchCost.fit({})
    with pytest.raises(ValueError):
        CostModel.from_timings({(1, 8): []})


def test_calibrate_times_a_synthetic_device() -> None:
    truth = BatchCost(1e-3, 2e-6, 3e-9)
    seen: list[tuple[int, int]] = []

    def measure(shape: tuple[int, int]) -> float:
        seen.append(shape)
        return truth(shape)

    model = calibrate(measure, BUCKETS.calibration_shapes(), runs=2)
    assert seen == [s for s in BUCKETS.compiled for _ in range(2)]
    assert model.estimate((16, 256)) == pytest.approx(truth((16, 256)))
    with pytest.raises(ValueError):
        calibrate(measure, BUCKETS.compiled, runs=0)


def test_prior_prefers_narrow_rows_for_the_same_slots() -> None:
    prior = CostModel.prior(DYNAMIC)
    assert not prior.calibrated
    assert prior.estimate((64, 64)) < prior.estimate((16, 256))
    assert prior.estimate((16, 256)) == pytest.approx(1.0)


# ------------------------------------------------------------------------------- planning


@st.composite
def queues(draw: st.DrawFn) -> tuple[list[int], ShapeSet, int]:
    shapes = draw(st.sampled_from([BUCKETS, DYNAMIC, ShapeSet.buckets([(4, 16), (2, 64)])]))
    count = draw(st.integers(1, 150))
    short = st.integers(1, min(24, shapes.max_width))
    long = st.integers(1, shapes.max_width)
    lengths = draw(st.lists(st.one_of(short, long), min_size=count, max_size=count))
    return lengths, shapes, draw(st.integers(1, 48))


def check_shaped_plan(plan: PackPlan, lengths: list[int], shapes: ShapeSet, cap: int) -> None:
    """A shaped plan holds the oldest sample, fits its shape, and overlaps nothing."""
    assert plan.shape is not None and plan.shape in shapes, plan.shape
    rows, width = plan.shape
    assert 0 in plan.chosen, "the oldest waiting sample was left out"
    assert len(set(plan.chosen)) == plan.num_samples <= cap
    assert list(plan.lengths) == [lengths[i] for i in plan.chosen]
    row, offset = np.divmod(plan.starts, width)
    assert (row < rows).all() and (offset + plan.lengths <= width).all(), "sample crosses a row"
    covered = np.zeros(rows * width, dtype=np.int64)
    for start, length in zip(plan.starts, plan.lengths, strict=True):
        covered[start : start + length] += 1
    assert covered.max() <= 1, "overlapping samples"
    if shapes.is_dynamic:  # no wasted rows, no wider than needed
        assert int(row.max()) == rows - 1
        assert width == shapes.round_width(int((offset + plan.lengths).max()))


@pytest.mark.parametrize("algorithm", [*PACKING, PackAlgorithm.PADDED])
@settings(max_examples=150, deadline=None)
@given(case=queues())
def test_shaped_plans_keep_the_invariants_and_the_oldest_first_bound(
    algorithm: PackAlgorithm, case: tuple[list[int], ShapeSet, int]
) -> None:
    lengths, shapes, cap = case
    cost = ORT_DEFAULT_MODEL_COST
    waiting = list(range(len(lengths)))
    dispatched_in: dict[int, int] = {}
    batch = 0
    while waiting:
        batch += 1
        queue = [lengths[i] for i in waiting]
        plan = plan_shaped(queue, algorithm=algorithm, shapes=shapes, cost=cost, max_valid_num=cap)
        check_shaped_plan(plan, queue, shapes, cap)
        for index in plan.chosen:
            dispatched_in[waiting[index]] = batch
        taken = set(plan.chosen)
        waiting = [original for k, original in enumerate(waiting) if k not in taken]
    assert sorted(dispatched_in) == list(range(len(lengths)))
    for original, number in dispatched_in.items():
        assert number <= original + 1  # the stated bound: p older samples -> p + 1 batches


def test_negative_control_the_shaped_plan_check_bites() -> None:
    lengths = [10, 10, 200]
    good = plan_shaped(
        lengths,
        algorithm=PackAlgorithm.LOOKAHEAD,
        shapes=BUCKETS,
        cost=ORT_DEFAULT_MODEL_COST,
        max_valid_num=40,
    )
    check_shaped_plan(good, lengths, BUCKETS, 40)
    too_narrow = PackPlan((2,), np.array([200]), np.array([0]), np.array([1]), True, (64, 64))
    with pytest.raises(AssertionError):
        check_shaped_plan(too_narrow, lengths, BUCKETS, 40)
    starved = PackPlan((1,), np.array([10]), np.array([0]), np.array([1]), True, (64, 64))
    with pytest.raises(AssertionError, match="oldest"):
        check_shaped_plan(starved, lengths, BUCKETS, 40)


def test_short_samples_go_into_narrow_rows_and_long_ones_into_wide_rows() -> None:
    def plan(lengths: list[int], shapes: ShapeSet, cap: int) -> PackPlan:
        return plan_shaped(
            lengths,
            algorithm=PackAlgorithm.LOOKAHEAD,
            shapes=shapes,
            cost=ORT_DEFAULT_MODEL_COST,
            max_valid_num=cap,
        )

    short = plan([20] * 200, BUCKETS, 200)
    assert short.shape == (64, 64) and short.num_samples == 64 * 3
    assert plan([250] * 40, BUCKETS, 40).shape == (16, 256)
    dynamic = plan([20] * 200, DYNAMIC, 200).shape
    assert dynamic is not None and dynamic[1] <= 64


def test_one_shape_plans_like_plan_batch() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 257, size=300).tolist()
    for algorithm in PACKING:
        shaped = plan_shaped(
            lengths,
            algorithm=algorithm,
            shapes=ShapeSet.fixed(16, 256),
            cost=ORT_DEFAULT_MODEL_COST,
            max_valid_num=40,
        )
        plain = plan_batch(
            lengths, algorithm=algorithm, batch_size=16, seq_len=256, max_valid_num=40
        )
        assert shaped.chosen == plain.chosen and shaped.shape == (16, 256)
        assert np.array_equal(shaped.starts, plain.starts)


# ---------------------------------------------------------- the runner on a simulated device


@pytest.mark.parametrize("shapes", [BUCKETS, DYNAMIC], ids=["buckets", "dynamic"])
@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.one_of(st.integers(1, 30), st.integers(1, 256)), max_size=120))
def test_runner_results_equal_the_single_sample_reference_at_every_shape(
    shapes: ShapeSet, lengths: list[int]
) -> None:
    rng = np.random.default_rng(len(lengths))
    samples = [make_sample(rng, n) for n in lengths]
    device = SimulatedDevice(shapes=shapes, latency=BatchCost(0.0, 0.0, 0.0))
    config = RunnerConfig(timeout_us=200, max_valid_num=64)
    with PackRunner(device, config) as runner:
        runner.warmup()
        results = [f.result() for f in [runner.submit(s) for s in samples]]
    for sample, result in zip(samples, results, strict=True):
        expected = simulated_reference(sample["input_ids"], sample["token_type_ids"])
        for name in ("start_logits", "end_logits"):
            assert np.array_equal(result[name], expected[name])


def test_warmup_calibrates_the_cost_model_from_device_times() -> None:
    latency = BatchCost(2e-4, 1e-7, 4e-10)
    device = SimulatedDevice(shapes=BUCKETS, latency=latency)
    with PackRunner(device, RunnerConfig()) as runner:
        assert not runner.cost_model.calibrated
        runner.warmup()
        model = runner.cost_model
    assert model.calibrated and set(model.measured) == set(BUCKETS.compiled)
    # Device times include the simulated sleep, never less (scheduling only adds).
    for shape in BUCKETS.compiled:
        assert model.estimate(shape) >= latency(shape) * 0.9
