"""The decode loop: propose, score, accept, commit.

One loop serves every method. A *proposer* (the draft, or nothing) drafts k tokens; the
*verifier* (the target) scores ``[pending..., d_1..d_k]`` in one forward pass; an acceptance
rule (``cospec.acceptance``) turns that into ``accepted`` draft tokens plus one next token;
commit trims both KV caches to the committed sequence.

Invariant between steps: each model's KV cache holds a prefix of the committed sequence
``seq`` and never its last token. The last committed token is kept apart because it is the
input of the next forward pass; so every step emits at least one token (the verifier's).
A model whose cache lags (the draft after a fully accepted block lacks d_k) first catches up
on the tokens it is missing, in the same forward pass as its next input. One exception: a
rule's lookahead (CoSpec at the bonus position) makes the draft run that catch-up early,
last token included; its row after that token (``first``) then starts the next block.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from cospec import fast
from cospec.acceptance import AcceptanceRule, Proposal, Verdict
from cospec.cpu import fast_linear
from cospec.errors import CospecError
from cospec.sampling import GREEDY, SamplingConfig, probabilities, sample_on_device
from cospec.stats import DecodeStats

RUN_AHEAD = 8  # target-only decoding: tokens decoded per host synchronisation


@dataclass(frozen=True)
class Token:
    id: int
    from_draft: bool  # a draft token kept by the verifier (or by an arbiter override)


class LastHidden:
    """Captures the input of the model's output layer: the final (normed) hidden states of
    the rows whose logits are computed. Works for any HF causal LM with output embeddings,
    and costs nothing when not entered (no ``output_hidden_states`` for every layer)."""

    def __init__(self, model: torch.nn.Module, enabled: bool = True):
        self.head = model.get_output_embeddings() if enabled else None
        self.value: torch.Tensor | None = None

    def _hook(self, module, args):
        self.value = args[0]

    def __enter__(self):
        self._handle = self.head.register_forward_pre_hook(self._hook) if self.head else None
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()


@functools.cache
def _cache_name(model_class: type) -> str:
    """What this transformers version calls a forward's KV cache, in and out: ``cache``
    (5.24 on; ``past_key_values`` is then deprecated, removed in 5.40) or ``past_key_values``."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def call_lm(model: torch.nn.Module, cache, **inputs) -> tuple[object, object]:
    """``model(**inputs)`` with its KV cache ``cache`` (None at first) passed under the name
    this transformers version uses; returns (the model's output, the updated cache)."""
    name = _cache_name(type(model))
    out = model(**inputs, use_cache=True, **{name: cache})
    return out, getattr(out, name)


class CachedLM:
    """A causal LM with its KV cache; ``length`` = number of tokens the cache covers."""

    def __init__(self, model: torch.nn.Module, hidden: bool = False):
        self.model, self.hidden = model, hidden
        self.device = next(model.parameters()).device
        self.cache = None
        self.length = 0

    def forward(self, ids: list[int] | torch.Tensor, keep: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed ``ids`` (a list or a 1-d tensor) after the cached prefix; returns the last
        ``keep`` rows of logits [keep, V] (float32) and, if ``hidden``, of last hidden
        states [keep, d]."""
        x = (ids.view(1, -1).to(self.device) if isinstance(ids, torch.Tensor)
             else torch.tensor([ids], device=self.device))
        with (fast_linear(self.model, self.device, x.numel()),
              LastHidden(self.model, self.hidden) as h):
            out, self.cache = call_lm(self.model, self.cache, input_ids=x, logits_to_keep=keep)
        self.length += len(ids)
        hidden = h.value[0, -keep:].float() if self.hidden else None
        return out.logits[0, -keep:].float(), hidden

    def prefill(self, ids: list[int]) -> None:
        if ids:
            self.forward(ids, keep=1)

    def reset(self) -> None:
        """Forget the cache (the next forward re-reads the whole sequence)."""
        self.cache, self.length = None, 0

    def crop(self, length: int) -> None:
        """Drop cached tokens beyond ``length`` (an O(1) slice of every layer)."""
        if length >= self.length:
            return
        self.cache.crop(length - self.length)  # negative: tokens to remove (transformers 4 and 5)
        if self.cache.get_seq_length() != length:
            raise RuntimeError(f"KV cache crop failed: wanted {length}, "
                               f"have {self.cache.get_seq_length()}")
        self.length = length


def cache_room(prompt_ids: list[int], max_new_tokens: int, k: int) -> int:
    """The most tokens a cache holds in one generation (a block of k drafts may run past
    ``max_new_tokens``), with a small margin."""
    return len(prompt_ids) + max_new_tokens + k + 3


def cached_lm(model: torch.nn.Module, hidden: bool = False, max_len: int = 2048):
    """The model with its KV cache: ``cospec.fast.StaticLM`` (static cache, CUDA graphs) on
    CUDA for the architectures it supports — same interface, same results — else
    ``CachedLM``. ``max_len`` bounds the tokens the cache will ever hold."""
    return fast.StaticLM(model, hidden, max_len) if fast.wanted(model) else CachedLM(model,
                                                                                      hidden)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


Row = tuple[torch.Tensor, torch.Tensor | None]  # one row of logits [1, V], hidden [1, d]


def _draw(row: torch.Tensor, sampling: SamplingConfig, gen: torch.Generator | None
          ) -> torch.Tensor:
    """The draft's token from its logits row [V], on the device: argmax or a sample."""
    if sampling.greedy:
        return row.argmax().view(1)
    return sample_on_device(probabilities(row, sampling), gen)


def propose(lm: CachedLM, seq: list[int], k: int, sampling: SamplingConfig,
            gen: torch.Generator | None, lookahead: bool = False,
            first: Row | None = None) -> Proposal:
    """Draft k tokens after ``seq``. Leaves the draft cache at ``len(seq) + k - 1``.

    Each drafted token stays on the device and feeds the next draft step directly; the k
    tokens reach the host once, at the end (one synchronisation per block, not per token).
    ``first``: the draft's row after ``seq``, already computed (the cache then holds all of
    ``seq``): the first step reuses it instead of a forward pass. ``lookahead``: also set
    ``draft_more`` (see ``_lookahead``).
    """
    if first is None:
        lm.crop(min(lm.length, len(seq) - 1))
    elif lm.length != len(seq):
        raise RuntimeError(f"draft cache at {lm.length}, the reused row needs {len(seq)}")
    pending: list[int] | torch.Tensor = seq[lm.length:]
    tokens, logits, hidden = [], [], []
    for i in range(k):
        row, h = first if i == 0 and first is not None else lm.forward(pending, keep=1)
        tok = _draw(row[0], sampling, gen)
        tokens.append(tok)
        logits.append(row)
        if h is not None:
            hidden.append(h)
        pending = tok
    ids = torch.cat(tokens) if tokens else None
    prop = Proposal(tokens=ids.tolist() if tokens else [],
                    draft_logits=torch.cat(logits) if logits else None,
                    draft_hidden=torch.cat(hidden) if hidden else None)
    if lookahead:
        prop.draft_more = functools.partial(_lookahead, lm, seq + prop.tokens, sampling, gen,
                                            None if k else first)
    return prop


def _lookahead(lm: CachedLM, prefix: list[int], sampling: SamplingConfig,
               gen: torch.Generator | None, known: Row | None, bonus: int) -> Proposal:
    """The draft's token after ``prefix`` (= seq + d_1..d_k), where the verifier's is
    ``bonus``. One forward over the tokens the cache lacks plus ``bonus``, two rows kept:
    row 0 is the lookahead, row 1 the draft's row after ``bonus`` (``Proposal.ahead``), which
    starts the next block when ``bonus`` is committed. That forward is the catch-up plain
    speculative decoding does at its next step anyway ([d_k, bonus]), so the lookahead costs
    no extra pass unless the draft's token is kept instead. ``known``: the row after
    ``prefix`` when it is already computed (k = 0 after a reused row)."""
    if known is not None:
        return Proposal(tokens=_draw(known[0][0], sampling, gen).tolist(),
                        draft_logits=known[0], draft_hidden=known[1])
    lm.crop(min(lm.length, len(prefix) - 1))
    rows, h = lm.forward(prefix[lm.length:] + [bonus], keep=2)
    return Proposal(tokens=_draw(rows[0], sampling, gen).tolist(), draft_logits=rows[:1],
                    draft_hidden=None if h is None else h[:1],
                    ahead=(bonus, rows[1:], None if h is None else h[1:]))


def generate(verifier: torch.nn.Module, proposer: torch.nn.Module | None,
             prompt_ids: list[int], rule: AcceptanceRule, *, k: int = 4,
             max_new_tokens: int = 128, sampling: SamplingConfig = GREEDY,
             eos_ids: Iterable[int] = (), seed: int | None = None,
             stats: DecodeStats | None = None) -> Iterator[Token]:
    """Yield tokens as they are committed (batch size 1).

    ``proposer=None`` is plain autoregressive decoding of ``verifier`` through the same loop:
    it runs ``RUN_AHEAD`` tokens ahead on the device (each token fed straight back, as the
    draft does) and commits them at once. ``stats`` (if given) is updated in place. Stops
    after an EOS id (which is yielded) or ``max_new_tokens`` tokens.
    """
    if not prompt_ids:
        raise CospecError("empty prompt: give at least one token")
    if k < 1 and proposer is not None:
        raise CospecError(f"k (draft length) must be >= 1, got {k}")
    stats = stats if stats is not None else DecodeStats()
    eos = set(eos_ids)
    hidden = rule.needs_hidden
    room = cache_room(prompt_ids, max_new_tokens, k)
    target = cached_lm(verifier, hidden, room)
    draft = cached_lm(proposer, hidden, room) if proposer is not None else None
    gen = None
    if seed is not None:
        gen = torch.Generator(device=target.device).manual_seed(seed)
    seq = list(prompt_ids)
    overrides = 0  # draft tokens kept by the arbiter in this generation
    first: Row | None = None  # the draft's row after seq, when the lookahead computed it
    with torch.inference_mode():
        t0 = _clock(target.device)
        target.prefill(seq[:-1])
        if draft is not None:
            draft.prefill(seq[:-1])
        stats.prefill_s += _clock(target.device) - t0
        while (left := max_new_tokens - (len(seq) - len(prompt_ids))) > 0:
            t0 = _clock(target.device)
            try:
                if draft is None:  # target only: run ahead, one host sync per chunk
                    prop = propose(target, seq, min(RUN_AHEAD, left), sampling, gen)
                    n_draft, verdict = 0, Verdict(len(prop.tokens) - 1, prop.tokens[-1])
                else:
                    n_draft = min(k, left - 1)
                    # the rule may ask for the draft's token at the bonus position
                    prop = propose(draft, seq, n_draft, sampling, gen, rule.lookahead, first)
                    logits, h = target.forward(seq[target.length:] + prop.tokens,
                                               keep=n_draft + 1)
                    prop.target_logits, prop.target_hidden = logits, h
                    prop.position = len(seq) - len(prompt_ids)
                    prop.overrides_so_far = overrides
                    verdict = rule(prop, sampling, gen)
            except BaseException:  # a half-done step: forget the caches, keep ``seq`` valid
                first = None
                target.reset()
                if draft is not None:
                    draft.reset()
                raise
            # commit: each cache keeps what the committed sequence confirms
            target.crop(len(seq) + verdict.accepted)
            first = None
            if draft is not None:
                ahead = prop.ahead  # the lookahead fed the verifier's bonus token too
                if (ahead is not None and verdict.accepted == len(prop.tokens)
                        and ahead[0] == verdict.next_token):  # ... and it was committed
                    first = ahead[1:]
                draft.crop(min(draft.length,
                               len(seq) + verdict.accepted + (first is not None)))
            new = prop.tokens[:verdict.accepted] + [verdict.next_token]
            seq.extend(new)
            for _ in range(1 if draft is not None else len(new)):  # a step per verifier pass
                stats.record_step(n_draft, verdict.accepted if draft is not None else 0)
            stats.arbiter_calls += verdict.arbiter_calls
            stats.overrides += verdict.overrides
            overrides += verdict.overrides
            stats.arbiter_s += verdict.arbiter_s
            cut = next((j + 1 for j, tok in enumerate(new) if tok in eos), len(new))
            stats.generated += cut
            stats.decode_s += _clock(target.device) - t0
            for j in range(cut):
                yield Token(new[j], draft is not None and (j < verdict.accepted
                                                           or verdict.next_from_draft))
            if cut < len(new) or new[cut - 1] in eos:
                return
