"""The Python API: load a target/draft pair once, then generate or stream with any method.

    import cospec
    pair = cospec.load_pair()                      # the shipped Qwen2.5-Coder 1.5B / 0.5B
    result = pair.generate("Write a haiku about caches.")    # spd-staged, k = 4
    print(result.text, result.stats.tau)
    for token in pair.stream("Count to five.", method="cos-we", lam=0.3):
        print(token.text, end="")

Methods are the command line's (``cospec generate --method``): ``target`` and ``draft``
alone, ``spd`` (exact speculative decoding), ``spd-staged`` (spd whose draft checks
prompt-lookup guesses first; the default), ``lookup`` and ``spd-lookup`` (prompt lookup),
the lossy ``cospec`` (learned arbiter), ``confidence`` and ``entropy``, and the CoS
combinations ``we``, ``cd``, ``we-sd``, ``cd-sd``, ``cos-we``, ``cos-cd``. Everything here
is a thin layer over ``cospec.models``, ``cospec.methods``, ``cospec.decoding`` and
``cospec.cos``; bad arguments raise ``CospecError`` with a message that says what to change.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Literal

import torch

from cospec import methods, models
from cospec.errors import CospecError
from cospec.sampling import SamplingConfig
from cospec.stats import DecodeStats
from cospec.text_stream import pieces

# every decoding method; ``hf-assisted`` (transformers' own loop, a benchmark peer) is not one
API_METHODS = tuple(m for m in methods.METHODS if m != "hf-assisted")
# keyword options of the methods, as ``MethodOptions`` names them (the rest is not per call)
OPTIONS = tuple(f.name for f in fields(methods.MethodOptions) if f.name != "extra_models")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Prompt = str | list[dict] | list[int]


@dataclass(frozen=True)
class Token:
    """One generated token as it is committed."""

    id: int
    text: str         # its share of the text ("" while a multi-byte character is incomplete)
    from_draft: bool  # a draft token that was kept (accepted, or an arbiter override)


@dataclass(frozen=True)
class Stats:
    """What one generation cost and how much of it the draft wrote."""

    tokens: int           # token ids generated (an EOS that ended it included)
    seconds: float        # prefill + decode
    tokens_per_s: float   # decode throughput: tokens / decode seconds (prefill excluded)
    tau: float            # mean acceptance length: 1 + accepted / steps (0 without steps)
    accepted: int         # draft tokens kept
    drafted: int          # draft tokens proposed
    steps: int            # verifier passes after the prefill
    prefill_s: float
    decode_s: float
    overrides: int        # mismatches where an arbiter kept the draft's token
    counters: DecodeStats = field(repr=False)  # every counter (per-position acceptance, ...)

    @classmethod
    def of(cls, s: DecodeStats) -> Stats:
        return cls(tokens=s.generated, seconds=s.prefill_s + s.decode_s,
                   tokens_per_s=s.tokens_per_s, tau=s.tau, accepted=s.accepted,
                   drafted=s.drafted, steps=s.steps, prefill_s=s.prefill_s,
                   decode_s=s.decode_s, overrides=s.overrides, counters=s)

    def to_dict(self) -> dict:
        return self.counters.to_dict()


@dataclass(frozen=True)
class Result:
    """A finished generation."""

    text: str                # the generated text, special tokens skipped
    token_ids: list[int]     # the generated ids (the prompt excluded, a final EOS included)
    stats: Stats
    from_draft: list[bool]   # per token: kept from the draft
    finish_reason: str       # "stop" (an EOS id) or "length" (max_new_tokens reached)


class Stream:
    """The tokens of one generation, as they are committed. Iterate once; ``stats`` is
    updated as it goes, ``text`` and ``token_ids`` grow with it; ``finish_reason`` is None
    until the last token has been read."""

    def __init__(self, pieces: Iterator[Token], counters: DecodeStats, eos: list[int]):
        self._pieces, self._counters, self._eos = pieces, counters, eos
        self._finished = False
        self.token_ids: list[int] = []
        self.from_draft: list[bool] = []
        self.text = ""

    def __iter__(self) -> Iterator[Token]:
        for token in self._pieces:
            self.token_ids.append(token.id)
            self.from_draft.append(token.from_draft)
            self.text += token.text
            yield token
        self._finished = True

    @property
    def stats(self) -> Stats:
        return Stats.of(self._counters)

    @property
    def finish_reason(self) -> str | None:
        """Why the generation ended: "stop" (an EOS id) or "length" (``max_new_tokens``
        reached); None while it has not (a stream not yet read to its end, or left early)."""
        if not self._finished:
            return None
        return "stop" if self.token_ids and self.token_ids[-1] in self._eos else "length"


def _detokenize(tokens: Iterator, tokenizer) -> Iterator[Token]:
    """``decoding.Token``s to ``Token``s with their share of the text
    (``text_stream.pieces``: a token ending inside a multi-byte character gets "", the one
    completing it the character; the shares join to the whole decode)."""
    return (Token(t.id, piece, t.from_draft) for t, piece in pieces(tokens, tokenizer))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise CospecError(message)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_token_id(x) -> bool:
    """An integer, numpy's and torch's integer scalars included (not a bool)."""
    return (isinstance(x, numbers.Integral) or isinstance(x, torch.Tensor) and x.dim() == 0
            and not x.dtype.is_floating_point and x.dtype != torch.bool) \
        and not isinstance(x, bool)


def _number(x) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _options(given: dict) -> methods.MethodOptions:
    """``MethodOptions`` from keyword options, each checked (``CospecError`` naming it)."""
    unknown = sorted(set(given) - set(OPTIONS))
    _check(not unknown, f"unknown option(s) {', '.join(unknown)}; the methods take "
                        f"{', '.join(OPTIONS)}")
    opts = methods.MethodOptions(**given)
    for name, ok, rule in (("lam", lambda v: 0 <= v <= 1, "in [0, 1]"),
                           ("mu", lambda v: v >= 0, ">= 0"),
                           ("delta", lambda v: v >= 0, ">= 0"),
                           ("entropy", lambda v: v >= 0, ">= 0")):
        value = getattr(opts, name)
        _check(_number(value) and ok(value), f"{name} must be {rule}, got {value!r}")
    _check(opts.threshold is None or _number(opts.threshold) and 0 <= opts.threshold <= 1,
           f"threshold must be None or in [0, 1], got {opts.threshold!r}")
    _check(opts.max_overrides is None or _is_int(opts.max_overrides)
           and opts.max_overrides >= 0,
           f"max_overrides must be None or an integer >= 0, got {opts.max_overrides!r}")
    _check(opts.arbiter is None or isinstance(opts.arbiter, str),
           f"arbiter must be the path of an arbiter file, got {opts.arbiter!r}")
    weights = opts.weights
    _check(isinstance(weights, list | tuple) and all(_number(w) for w in weights),
           f"weights must be a list of numbers, one per model, got {weights!r}")
    opts.weights = tuple(float(w) for w in weights)
    _check(isinstance(opts.every_mismatch, bool),
           f"every_mismatch must be True or False, got {opts.every_mismatch!r}")
    return opts


class Pair:
    """A loaded target (and draft) with their shared tokenizer; ``generate`` and ``stream``
    decode one prompt with any method. ``models``: the underlying ``cospec.models.Pair``."""

    def __init__(self, loaded: models.Pair):
        self.models = loaded

    @property
    def tokenizer(self):
        return self.models.tokenizer

    @property
    def target(self) -> torch.nn.Module:
        return self.models.target

    @property
    def draft(self) -> torch.nn.Module | None:
        return self.models.draft

    def __repr__(self) -> str:
        return f"Pair(target={self.models.target_name!r}, draft={self.models.draft_name!r})"

    def encode(self, prompt: Prompt, chat: bool = True) -> list[int]:
        """Prompt token ids. A string goes through the chat template as one user message
        (raw text with ``chat=False``); a list of ``{"role", "content"}`` messages through
        the chat template; a list of ints is used as it is."""
        tok = self.tokenizer
        _check(isinstance(chat, bool), f"chat must be True or False, got {chat!r}")
        if isinstance(prompt, str):
            return methods.encode_prompt(tok, prompt, chat=chat)
        _check(isinstance(prompt, list | tuple) and len(prompt) > 0,
               "prompt must be a non-empty string, list of chat messages or list of token ids")
        if all(_is_token_id(t) for t in prompt):
            ids = [int(t) for t in prompt]
            vocab = min(len(self.tokenizer),  # ids past it: the output layer's padding
                        self.target.get_output_embeddings().weight.shape[0])
            bad = [t for t in ids if not 0 <= t < vocab]
            _check(not bad, f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
            return ids
        for m in prompt:
            _check(isinstance(m, dict) and isinstance(m.get("role"), str)
                   and isinstance(m.get("content"), str),
                   f"chat message {m!r} must be a dict with string 'role' and 'content'")
        _check(chat, "chat messages go through the chat template: pass chat=True, or a string")
        _check(any(m["content"].strip() for m in prompt), "empty prompt")
        return methods.chat_ids(tok, prompt)

    def stream(self, prompt: Prompt, method: str = methods.DEFAULT_METHOD, k: int = 4,
               max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = 0, chat: bool = True,
               **options) -> Stream:
        """Decode ``prompt`` with ``method``; returns a ``Stream`` of ``Token``s.

        ``k``: draft tokens per step (gamma for the CoS methods). ``temperature`` 0 is greedy.
        ``options``: the method's settings, as ``cospec generate`` names them —
        ``lam`` (we*: r = lam q_draft + (1 - lam) p_target), ``weights``, ``mu`` (cd*),
        ``arbiter``, ``threshold``, ``every_mismatch``, ``max_overrides`` (cospec),
        ``delta`` (confidence), ``entropy`` (entropy)."""
        _check(method in API_METHODS,
               f"unknown method {method!r}; choose from {', '.join(API_METHODS)}")
        _check(method in methods.NO_DRAFT or self.draft is not None,
               f"method {method} needs a draft model: load_pair(draft=...) "
               "(load_pair(draft=False) loads the target alone)")
        _check(_is_int(k) and k >= 1, f"k (draft length) must be an integer >= 1, got {k!r}")
        _check(_is_int(max_new_tokens) and max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        _check(_number(temperature) and temperature >= 0,
               f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        _check(_number(top_p) and 0 < top_p <= 1,
               f"top_p must be in (0, 1], got {top_p!r}")
        _check(_is_int(top_k) and top_k >= 0, f"top_k must be an integer >= 0, got {top_k!r}")
        _check(seed is None or _is_int(seed) and -(2**63) <= seed < 2**63,
               f"seed must be an integer in [-2^63, 2^63) or None, got {seed!r}")
        opts = _options(options)
        for field_name, _, readers in methods.unread_options(opts, [method]):
            warnings.warn(f"{field_name} is read by {', '.join(readers)} only: method "
                          f"{method} ignores it", stacklevel=2)
        sampling = SamplingConfig(float(temperature), float(top_p), top_k)
        ids = self.encode(prompt, chat)
        models.check_context(self.models, len(ids), max_new_tokens)
        built = methods.build_method(method, self.models, opts, sampling)
        eos = methods.eos_ids(self.tokenizer, self.target)
        counters = DecodeStats()
        tokens = built.stream(ids, k=k, max_new_tokens=max_new_tokens, sampling=sampling,
                              eos_ids=eos, seed=seed, stats=counters)
        return Stream(_detokenize(tokens, self.tokenizer), counters, eos)

    def generate(self, prompt: Prompt, method: str = methods.DEFAULT_METHOD, k: int = 4,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = 0, chat: bool = True,
                 **options) -> Result:
        """Decode ``prompt`` to the end (an EOS id or ``max_new_tokens``); arguments as for
        ``stream``."""
        run = self.stream(prompt, method, k, max_new_tokens, temperature, top_p, top_k, seed,
                          chat, **options)
        for _ in run:
            pass
        text = self.tokenizer.decode(run.token_ids, skip_special_tokens=True)
        return Result(text, run.token_ids, run.stats, run.from_draft, run.finish_reason)


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    _check(isinstance(dtype, str) and dtype in DTYPES,
           f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_pair(target: str | os.PathLike | None = None,
              draft: str | os.PathLike | Literal[False] | None = None,
              device: str | None = None, dtype: torch.dtype | str | None = None,
              draft_weights: str = "model") -> Pair:
    """Load a target and a draft that share one vocabulary.

    Each is a shipped name (``qwen2.5-coder-1.5b``, ``qwen2.5-coder-0.5b``; None: the
    shipped pair), a Hugging Face folder (a string or a path), a ``.gguf`` file or a hub id such as
    ``Qwen/Qwen2.5-7B-Instruct`` (loaded by transformers through its cache; offline with
    ``HF_HUB_OFFLINE=1`` once cached). ``draft=False``: the target alone (method
    ``target``). ``device``: cpu or cuda (default: cuda if present); ``dtype``: a torch
    dtype or its name (default float32 on CPU, bfloat16 on GPU). ``draft_weights="int8"``:
    the draft's decode steps read int8 copies of its weights (on a CPU every forward after
    the prompt's prefill, ``cospec.cpu_int8``; on a GPU the fused layers; spd's output is
    still the target's, cospec and CoS use the int8 draft's)."""
    target, draft = (os.fspath(m) if isinstance(m, os.PathLike) else m for m in (target, draft))
    _check(target is None or isinstance(target, str) and target.strip() != "",
           f"target must be a model spec (a non-empty string or a path) or None, got "
           f"{target!r}")
    _check(draft is None or draft is False or isinstance(draft, str) and draft.strip() != "",
           f"draft must be a model spec (a non-empty string or a path), None (the shipped "
           f"draft) or False (no draft), got {draft!r}")
    _check(draft_weights in models.DRAFT_WEIGHTS, f"draft_weights must be one of "
           f"{', '.join(models.DRAFT_WEIGHTS)}, got {draft_weights!r}")
    loaded = models.load_pair(target or models.DEFAULT_TARGET,
                              None if draft is False else draft or models.DEFAULT_DRAFT,
                              device, _dtype(dtype))
    models.draft_weights(loaded, draft_weights)
    return Pair(loaded)
