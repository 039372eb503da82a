"""Text -> token ids for the text routes: a `tokenizers` wrapper and the default model's tokenizer.

The embedded default model has random weights and a 30522-row vocabulary but no tokenizer of its
own. :func:`default_tokenizer_path` builds a deterministic BERT-style WordPiece tokenizer whose
vocabulary has exactly that many entries (special tokens at BERT's ids, then characters, then
letter n-grams with and without the ``##`` continuation prefix), so every text route works with
no ``--model``; the file is cached beside the default model.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tokenizers import Encoding, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing

from packrunner.errors import ConfigError
from packrunner.models import DEFAULT_CONFIG, default_cache_dir
from packrunner.serve.errors import ErrorKind, ServeError

__all__ = ["TextEncoder", "TokenizedText", "build_default_tokenizer", "default_tokenizer_path"]

_T = TypeVar("_T")
_SPECIAL = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}


def build_default_tokenizer(vocab_size: int = DEFAULT_CONFIG.vocab_size) -> Tokenizer:
    """A deterministic BERT-style uncased WordPiece tokenizer with exactly ``vocab_size`` ids."""
    vocab: dict[str, int] = {}
    unused = itertools.count()
    specials = {index: token for token, index in _SPECIAL.items()}
    for index in range(max(_SPECIAL.values()) + 1):
        vocab[specials.get(index) or f"[unused{next(unused)}]"] = index
    chars = [c for c in string.printable if not c.isspace() and not c.isupper()]
    letters = string.ascii_lowercase
    pieces = itertools.chain(
        chars,
        (f"##{c}" for c in chars),
        (a + b for a, b in itertools.product(letters, repeat=2)),
        (f"##{a}{b}" for a, b in itertools.product(letters, repeat=2)),
        ("".join(t) for t in itertools.product(letters, repeat=3)),
        (f"##{''.join(t)}" for t in itertools.product(letters, repeat=3)),
    )
    for piece in pieces:
        if len(vocab) == vocab_size:
            break
        vocab.setdefault(piece, len(vocab))
    if len(vocab) != vocab_size:
        raise ValueError(f"cannot build a vocabulary of {vocab_size} pieces")
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", _SPECIAL["[CLS]"]), ("[SEP]", _SPECIAL["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def default_tokenizer_path(cache_dir: Path | None = None) -> Path:
    """``tokenizer.json`` of the default model, built on first use (atomically)."""
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    path = directory / f"default-wordpiece-{DEFAULT_CONFIG.vocab_size}.tokenizer.json"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{id(path)}.tmp")
        build_default_tokenizer().save(str(partial))
        partial.replace(path)
    return path


@dataclass(frozen=True, slots=True)
class TokenizedText:
    """One tokenised input: ids, token types, and each token's character span."""

    ids: list[int]
    type_ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[bool]
    sequence_ids: list[int | None]
    tokens: list[str]
    truncated: bool


class TextEncoder:
    """Tokenises text for the model, enforcing ``max_input_length``.

    Args:
        tokenizer: A `tokenizers` tokenizer (its own truncation/padding settings are cleared).
        max_input_length: Longest sequence, special tokens included.
    """

    def __init__(self, tokenizer: Tokenizer, max_input_length: int) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.max_input_length = max_input_length

    @classmethod
    def from_file(cls, path: Path, max_input_length: int) -> TextEncoder:
        """Load a ``tokenizer.json``."""
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ConfigError(f"cannot load tokenizer {path}: {exc}") from exc
        return cls(tokenizer, max_input_length)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(
        self,
        texts: Sequence[str | tuple[str, str]],
        *,
        truncate: bool,
        add_special_tokens: bool = True,
    ) -> list[TokenizedText]:
        """Tokenise a batch (plain texts, or (question, context) pairs).

        Raises:
            ServeError: VALIDATION if an input is empty, or longer than ``max_input_length``
                tokens and ``truncate`` is false.
        """
        for index, text in enumerate(texts):
            if not (text if isinstance(text, str) else all(text)):
                raise ServeError(ErrorKind.EMPTY, f"input {index} is empty")
        # One encode() per text rather than encode_batch(): the batch form fans out to a rayon
        # thread pool whose workers compete with the device's threads for the same cores, and a
        # request carries at most --max-client-batch-size short texts.
        encodings: list[Encoding] = []
        for text in texts:
            first, pair = text if isinstance(text, tuple) else (text, None)
            encodings.append(
                self._tokenizer.encode(first, pair, add_special_tokens=add_special_tokens)
            )
        out = []
        limit = self.max_input_length
        for index, encoding in enumerate(encodings):
            length = len(encoding.ids)
            if length > limit and not truncate:
                raise ServeError(
                    ErrorKind.VALIDATION,
                    f"input {index} has {length} tokens, more than max_input_length={limit}; "
                    "shorten it or set truncate",
                )
            # Each Encoding attribute builds a new Python list: read each one once.
            special = encoding.special_tokens_mask
            keep, tail = length, None
            if length > limit:
                # Keep the closing [SEP]: truncate the text, not the template.
                tail = length - 1 if add_special_tokens and special[-1] else None
                keep = limit - 1 if tail is not None else limit
            out.append(
                TokenizedText(
                    ids=_cut(encoding.ids, keep, tail),
                    type_ids=_cut(encoding.type_ids, keep, tail),
                    offsets=_cut(encoding.offsets, keep, tail),
                    special=[bool(m) for m in _cut(special, keep, tail)],
                    sequence_ids=_cut(encoding.sequence_ids, keep, tail),
                    tokens=_cut(encoding.tokens, keep, tail),
                    truncated=length > limit,
                )
            )
        return out


def _cut(values: list[_T], keep: int, tail: int | None) -> list[_T]:
    """The first ``keep`` values, then the one at ``tail`` if given."""
    return values[:keep] + ([values[tail]] if tail is not None else [])
