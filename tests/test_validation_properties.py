"""Property tests of sample validation through the public submit path.

Every generated sample is either accepted and then produces exactly the reference result of
the values it holds, or refused with InvalidSampleError at submit; either way the good samples
submitted around it get their own exact results.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from packrunner import (
    InvalidSampleError,
    PackRunner,
    RunnerConfig,
    SimulatedDevice,
    simulated_reference,
)
from packrunner.errors import MAX_SAMPLE_MESSAGE_CHARS
from tests._support import GatedDevice, assert_matches_reference

SEQ_LEN = 16
LIMITS = {"input_ids": 1000, "token_type_ids": 2, "position_ids": SEQ_LEN}
CONFIG = RunnerConfig(
    batch_size=4, seq_len=SEQ_LEN, max_valid_num=8, timeout_us=500, vocab_size=1000
)
SETTINGS = settings(
    max_examples=250,
    deadline=None,
    # The autouse thread-leak check is function scoped; it holds no per-example state.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

INTEGER_DTYPES = [np.dtype(f"{order}{code}") for code in "bhilqBHILQ" for order in "<>"]
OTHER_DTYPES = [
    np.dtype(t)
    for t in (bool, np.float16, np.float32, ">f8", np.complex64, object, "U4", "datetime64[s]")
]
WRAPPERS = ("array", "readonly", "strided", "subclass", "masked", "list", "tuple")


class TaggedArray(np.ndarray):
    """An ndarray subclass (as a framework's tensor type might be)."""


def runner() -> PackRunner:
    return PackRunner(SimulatedDevice(batch_size=4, seq_len=SEQ_LEN, batch_latency_us=0), CONFIG)


GOOD = {"input_ids": np.array([5, 6, 7], np.int32), "token_type_ids": np.array([0, 1, 1])}


@st.composite
def encoded_input(draw: st.DrawFn, length: int, limit: int) -> tuple[object, list[int] | None]:
    """(value to submit, the integers it holds or None when it must be refused)."""
    dtype = draw(st.sampled_from(INTEGER_DTYPES * 3 + OTHER_DTYPES))
    value = st.integers(0, limit - 1)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        value = st.integers(0, min(limit - 1, int(info.max)))
        if not draw(st.integers(0, 3)):  # a quarter of the arrays stray out of range
            low, high = max(int(info.min), -300), min(int(info.max), 3 * limit)
            value = st.integers(low, high) | st.sampled_from([int(info.min), int(info.max)])
    values = draw(st.lists(value, min_size=length, max_size=length))
    array = np.array(values, dtype=np.int64 if dtype.kind == "M" else dtype.newbyteorder("="))
    array = array.astype(dtype)
    wrapper = draw(st.sampled_from(WRAPPERS))
    valid = dtype.kind in "iu" and all(0 <= v < limit for v in values)
    submitted: object = array
    if wrapper == "readonly":
        array.setflags(write=False)
    elif wrapper == "strided":
        submitted = np.repeat(array, 2)[::2]  # a non-contiguous view
    elif wrapper == "subclass":
        submitted = array.view(TaggedArray)
    elif wrapper == "masked":
        masking = draw(st.booleans())
        mask = [masking and draw(st.booleans()) for _ in range(length)]
        # Whatever hides behind a mask is never sent: masked values mean refusal.
        submitted = np.ma.masked_array(array, mask=mask)
        valid = valid and not any(mask)
    elif wrapper in ("list", "tuple"):
        # Python scalars: ints (from integer and object arrays) are accepted when in range;
        # bools, floats, strings, datetimes are not.
        items = array.tolist()
        submitted = items if wrapper == "list" else tuple(items)
        valid = all(type(v) is int and 0 <= v < limit for v in items)
    return submitted, (values if valid else None)


@st.composite
def samples(draw: st.DrawFn) -> tuple[dict[str, object], dict[str, list[int]] | None]:
    """A sample and the integers it holds per input, or None when it must be refused."""
    length = draw(st.integers(0, SEQ_LEN + 2))
    sample: dict[str, object] = {}
    intended: dict[str, list[int]] = {}
    valid = 1 <= length <= SEQ_LEN
    names = ["input_ids"] + [
        name for name in ("token_type_ids", "position_ids") if draw(st.booleans())
    ]
    for name in names:
        # Now and then one input of another length.
        own_length = length
        if name != "input_ids" and not draw(st.integers(0, 9)):
            own_length = draw(st.integers(0, SEQ_LEN + 2))
        value, values = draw(encoded_input(own_length, LIMITS[name]))
        sample[name] = value
        if values is None or own_length != length:
            valid = False
        else:
            intended[name] = values
    return sample, (intended if valid else None)


def expected_result(intended: Mapping[str, list[int]]) -> dict[str, Any]:
    return simulated_reference(
        intended["input_ids"], intended.get("token_type_ids"), intended.get("position_ids")
    )


def check_samples(packer: PackRunner, config: settings) -> tuple[int, int]:
    """Run the property over ``packer``; return (accepted, refused) counts."""
    accepted = refused = 0

    @config
    @given(samples())
    def check(case: tuple[dict[str, object], dict[str, list[int]] | None]) -> None:
        nonlocal accepted, refused
        sample, intended = case
        before = packer.submit(GOOD)
        try:
            future = packer.submit(sample)
        except InvalidSampleError:
            assert intended is None, f"a valid sample was refused: {sample!r}"
            future = None
        after = packer.submit(GOOD)
        if future is not None:
            assert intended is not None, f"an invalid sample was accepted: {sample!r}"
            result = future.result(10)
            for name, value in expected_result(intended).items():
                np.testing.assert_array_equal(result[name], value)
            accepted += 1
        else:
            refused += 1
        assert_matches_reference(GOOD, before.result(10))
        assert_matches_reference(GOOD, after.result(10))

    check()
    return accepted, refused


def test_every_sample_is_either_exact_or_refused_at_submit_and_neighbours_are_unharmed() -> None:
    with runner() as packer:
        accepted, refused = check_samples(packer, SETTINGS)
    assert accepted > 20 and refused > 20, (accepted, refused)


def test_negative_control_the_property_catches_values_read_as_raw_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the old defect put back (values read as unsigned bytes), the property fails."""
    from packrunner._codec import SampleSchema

    read = SampleSchema._as_ids

    def as_unsigned(self: SampleSchema, name: str, value: object, length: int | None = None):
        values = read(self, name, value, length)
        if isinstance(value, np.ndarray) and value.dtype.kind == "i":
            unsigned = np.dtype(f"u{value.dtype.itemsize}")
            return np.asarray(value).view(unsigned).astype(np.int64)
        return values

    monkeypatch.setattr(SampleSchema, "_as_ids", as_unsigned)
    quick = settings(SETTINGS, max_examples=400, phases=[Phase.generate])
    with runner() as packer, pytest.raises(AssertionError):
        check_samples(packer, quick)


class Explodes(Exception):
    pass


class BadArray:
    def __array__(self, dtype: object = None, copy: object = None) -> Any:
        raise Explodes("__array__")


class BadLenArray(np.ndarray):
    def __len__(self) -> int:
        raise Explodes("__len__")

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise Explodes("__array__")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.array([1, -1], np.int8), "negative value \\(-1\\)"),
        (np.array([1, -200], np.int16), "negative value \\(-200\\)"),
        (np.array([1, 1000], ">i4"), "value 1000, must be < 1000"),
        (np.array([999, 3], ">i4"), None),  # byte-swapped this would be huge: must pass
        (np.array([2**63 + 5], np.uint64), "beyond any vocabulary"),
        (np.ma.masked_array([1, 2, 3], mask=[False, True, False]), "masked values"),
        (np.ma.masked_array([1, 2], mask=[True, True]), "masked values"),
        (np.ma.masked_array([1, 2], mask=[False, False]), None),
        (np.array([4, 2]).view(BadLenArray), None),  # read as stored, its methods never run
    ],
)
def test_values_are_read_as_the_numbers_they_are(value: object, message: str | None) -> None:
    with runner() as packer:
        if message is None:
            result = packer.execute({"input_ids": value})
            expected = simulated_reference(np.asarray(value).astype(np.int64))
            np.testing.assert_array_equal(result["start_logits"], expected["start_logits"])
        else:
            with pytest.raises(InvalidSampleError, match=message):
                packer.execute({"input_ids": value})


class BadIterList(list):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[Any]:
        raise Explodes("__iter__")


class BadMapping(Mapping[str, object]):
    def __init__(self, fail: str) -> None:
        self.fail = fail

    def __getitem__(self, key: str) -> object:
        if self.fail == "getitem":
            raise Explodes("__getitem__")
        return [1, 2, 3]

    def __iter__(self) -> Iterator[str]:
        if self.fail == "iter":
            raise Explodes("__iter__")
        return iter(["input_ids"])

    def __len__(self) -> int:
        if self.fail == "len":
            raise Explodes("__len__")
        return 1

    def __contains__(self, key: object) -> bool:
        if self.fail == "contains":
            raise Explodes("__contains__")
        return key == "input_ids"


class BadRepr:
    def __repr__(self) -> str:
        raise Explodes("__repr__")

    def __hash__(self) -> int:
        return 1


JUNK_VALUES = [
    BadArray(),
    BadIterList([1, 2]),
    [1, BadArray()],
    [[1], [2, 3]],
    "123",
    b"123",
    3,
    None,
    {1, 2},
    np.array([1 + 2j]),
    np.array(["1", "2"]),
    np.array([1, 2], dtype=object),
    np.array([[1, 2]]),
    np.array(5),
    np.array([True, False]),
    np.array([1.0, 2.0]),
]
JUNK_SAMPLES: list[object] = [
    BadMapping("iter"),
    BadMapping("getitem"),
    BadMapping("contains"),
    {BadRepr(): [1]},
    {"input_ids": [1], "x" * 10_000_000: [1]},
    [("input_ids", [1])],
    None,
]


@SETTINGS
@given(
    junk=st.sampled_from(JUNK_VALUES),
    where=st.sampled_from(["input_ids", "token_type_ids", "position_ids", "attention_mask"]),
)
def test_junk_values_raise_invalid_sample_error_only(junk: object, where: str) -> None:
    from packrunner._codec import BatchFeeder

    feeder = BatchFeeder(SimulatedDevice(batch_size=4, seq_len=SEQ_LEN), CONFIG)
    sample = {"input_ids": [1, 2], where: junk}
    with pytest.raises(InvalidSampleError) as info:
        feeder.prepare(sample)
    assert len(str(info.value)) <= MAX_SAMPLE_MESSAGE_CHARS
    if isinstance(junk, BadIterList) or (isinstance(junk, list) and isinstance(junk[-1], BadArray)):
        assert isinstance(info.value.__cause__, Explodes)  # the original failure is kept


def test_junk_samples_are_refused_at_submit_with_bounded_messages_and_serving_continues() -> None:
    with runner() as packer:
        for junk in JUNK_SAMPLES:
            with pytest.raises(InvalidSampleError) as info:
                packer.submit(junk)  # type: ignore[arg-type]
            assert len(str(info.value)) <= MAX_SAMPLE_MESSAGE_CHARS
            if isinstance(junk, BadMapping):
                assert isinstance(info.value.__cause__, Explodes)
        many_unknown = {f"name{i}": [1] for i in range(1_000_000)}
        many_unknown["input_ids"] = [1]
        with pytest.raises(InvalidSampleError, match="and 999995 more") as info:
            packer.submit(many_unknown)
        assert len(str(info.value)) <= MAX_SAMPLE_MESSAGE_CHARS
        assert_matches_reference(GOOD, packer.execute(GOOD))
        assert packer.stats().rejected_invalid == len(JUNK_SAMPLES) + 1


@SETTINGS
@given(
    original=st.lists(st.integers(0, 999), min_size=1, max_size=SEQ_LEN),
    dtype=st.sampled_from([np.int32, np.int64, ">i4", np.uint16]),
    scribble=st.sampled_from(["values", "negative", "huge"]),
    entry=st.sampled_from(["submit", "execute_async"]),
)
def test_the_callers_array_is_copied_at_submit(
    original: list[int], dtype: Any, scribble: str, entry: str
) -> None:
    """Writing into the submitted array afterwards changes nothing the device sees."""
    import asyncio

    device = GatedDevice(batch_size=4, seq_len=SEQ_LEN)
    ids = np.array(original, dtype=dtype)
    with PackRunner(device, CONFIG) as packer:

        async def via_async() -> dict[str, Any]:
            future = packer.execute_async({"input_ids": ids})
            overwrite()
            device.gate.set()
            return await future

        def overwrite() -> None:
            fill = {"values": 7, "negative": -1, "huge": 60_000}[scribble]
            if np.dtype(dtype).kind == "u" and fill < 0:
                fill = 0
            ids[:] = np.array(fill).astype(dtype)

        if entry == "submit":
            future = packer.submit({"input_ids": ids})
            overwrite()
            device.gate.set()
            result = future.result(10)
        else:
            result = asyncio.run(via_async())
    expected = simulated_reference(original)
    np.testing.assert_array_equal(result["start_logits"], expected["start_logits"])
