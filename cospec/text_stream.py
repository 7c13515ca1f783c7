"""Generated text as it grows: incremental detokenization and stop strings.

Each committed token is detokenized incrementally (``TextStream``: tokenizers'
``DecodeStream``, O(1) a token); stop strings are looked for in the new text only
(``stop_at``), and a stream sends only what can no longer change (``safe_len``). The
server, the Python API's streams and ``cospec generate`` all read their text from here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

from tokenizers.decoders import DecodeStream


def stop_at(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index of the first stop string in ``text`` that begins at ``start`` or later, or
    None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def safe_len(text: str, stops: tuple[str, ...]) -> int:
    """How much of a growing ``text`` can be sent now: not a trailing incomplete character
    ("\\ufffd" from a split multi-byte sequence), nor a suffix that could start a stop
    string."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    hold = 0
    for s in stops:
        for j in range(min(len(s) - 1, n), hold, -1):
            if text.endswith(s[:j], 0, n):
                hold = j
                break
    return n - hold


class TextStream:
    """The text of a growing sequence of token ids (special tokens skipped), one id at a time.

    A fast tokenizer goes through tokenizers' ``DecodeStream``: each id costs a decode of a
    few ids, not of the whole sequence. ``DecodeStream`` holds back a character still
    incomplete (a multi-byte sequence split between tokens); ``add`` then shows it as a full
    decode does, as "\ufffd", from the ids not yet settled. A tokenizer without a ``tokenizers``
    backend (or whose decoder the stream refuses) is decoded whole at every id.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream = DecodeStream(skip_special_tokens=True) if self.backend is not None else None
        self.ids: list[int] = []
        self.text = ""    # the text of ids[:settled], final
        self.settled = 0

    def add(self, token_id: int) -> str:
        """Append ``token_id``; returns the text of every id so far, equal to
        ``tokenizer.decode(ids, skip_special_tokens=True)``. Its first ``len(self.text)``
        characters (before this call) never change."""
        self.ids.append(token_id)
        if self.stream is not None:
            try:
                piece = self.stream.step(self.backend, token_id)
            except Exception:  # a decoder whose text is not prefix-stable: decode it whole
                self.stream = None
            else:
                if piece is not None:
                    self.text += piece
                    self.settled = len(self.ids)
                    return self.text
                return self.text + self.tokenizer.decode(self.ids[self.settled:],
                                                         skip_special_tokens=True)
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def outside_vocab(ids: list[int], tokenizer) -> str | None:
    """What to say of the generated ``ids`` at or past the tokenizer's length (rows of the
    model's output layer beyond its vocabulary: padding, which the tokenizer decodes to no
    text), or None if there are none. The ids themselves are kept as generated."""
    vocab = len(tokenizer)
    outside = sum(i >= vocab for i in ids)
    if not outside:
        return None
    return (f"{outside} generated token id(s) are outside the tokenizer's vocabulary of size "
            f"{vocab} (the model's output layer is larger) and decode to no text")


def warn_outside_vocab(ids: list[int], tokenizer, stacklevel: int = 2) -> None:
    """One warning if any of the generated ``ids`` is outside the tokenizer's vocabulary
    (``outside_vocab``)."""
    said = outside_vocab(ids, tokenizer)
    if said:
        warnings.warn(said, stacklevel=stacklevel + 1)


def pieces(tokens: Iterable, tokenizer) -> Iterator[tuple[object, str]]:
    """(token, its share of the text) for each of ``tokens`` (each with an ``id``), decoded
    incrementally (``TextStream``, special tokens skipped). The shares join to
    ``tokenizer.decode(ids, skip_special_tokens=True)``: a token that ends inside a
    multi-byte character is held back, with "", until the one that completes the character
    (or the last token, at the end, which gets what is left). Ids at or past the tokenizer's
    length get "" too; once the tokens end, one warning counts them
    (``warn_outside_vocab``)."""
    stream = TextStream(tokenizer)
    held: list = []  # tokens whose text is not complete yet
    shown = text = ""
    for token in tokens:
        text = stream.add(token.id)
        if text.endswith("\ufffd"):
            held.append(token)
            continue
        for early in held:
            yield early, ""
        held = []
        yield token, text[len(shown):]
        shown = text
    for early in held[:-1]:
        yield early, ""
    if held:
        yield held[-1], text[len(shown):]
    warn_outside_vocab(stream.ids, tokenizer)
