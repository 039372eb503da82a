"""The text encoder's limits and truncation, and the default model's generated tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packrunner.models import DEFAULT_CONFIG
from packrunner.serve.errors import ErrorKind, ServeError
from packrunner.serve.tokenizer import TextEncoder, build_default_tokenizer

TOKENIZER = build_default_tokenizer()
WORDS = st.lists(st.text("abcdefghij", min_size=1, max_size=7), min_size=1, max_size=40)


def test_default_tokenizer_matches_the_default_model() -> None:
    assert TOKENIZER.get_vocab_size() == DEFAULT_CONFIG.vocab_size
    vocab = TOKENIZER.get_vocab()
    assert {k: vocab[k] for k in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")} == {
        "[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103,
    }  # fmt: skip
    assert build_default_tokenizer().to_str() == TOKENIZER.to_str()  # deterministic
    assert TOKENIZER.encode("Hello, world").tokens == ["[CLS]", "hel", "##lo", ",", "wor",
                                                       "##ld", "[SEP]"]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(words=WORDS, limit=st.integers(3, 40), pair=st.booleans())
def test_truncation_keeps_the_template_and_the_prefix(
    words: list[str], limit: int, pair: bool
) -> None:
    encoder = TextEncoder(build_default_tokenizer(), limit)
    text = " ".join(words)
    item: str | tuple[str, str] = ("question", text) if pair else text
    full = TOKENIZER.encode(*((item,) if isinstance(item, str) else item)).ids
    (truncated,) = encoder.encode([item], truncate=True)
    assert len(truncated.ids) == min(len(full), limit)
    assert truncated.truncated == (len(full) > limit)
    assert truncated.ids[0] == 101 and truncated.ids[-1] == 102
    assert truncated.ids[:-1] == full[: len(truncated.ids) - 1]
    assert len(truncated.offsets) == len(truncated.special) == len(truncated.ids)
    if len(full) > limit:
        with pytest.raises(ServeError) as refused:
            encoder.encode([item], truncate=False)
        assert refused.value.kind is ErrorKind.VALIDATION
    else:
        assert encoder.encode([item], truncate=False)[0].ids == full


def test_empty_text_is_refused() -> None:
    with pytest.raises(ServeError) as empty:
        TextEncoder(build_default_tokenizer(), 8).encode(["ok", ""], truncate=True)
    assert empty.value.kind is ErrorKind.EMPTY
