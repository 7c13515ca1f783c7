"""The decode loop: propose, score, accept, commit.

One loop (``decode``) serves target-only decoding, SPD, the arbiter rules and the CoS
combinations. A *team* holds the models and their KV caches and says what a step does with
them: ``Speculation`` has the proposer (the draft, or nothing) draft k tokens and the
verifier (the target) score ``[pending..., d_1..d_k]`` in one forward pass;
``cospec.cos.Collaboration`` tests against a combination r of several models and lets them
take turns proposing. An acceptance rule (``cospec.acceptance``) turns the scored proposal
into ``accepted`` draft tokens plus one next token; commit trims the KV caches to the
committed sequence.

Invariant between steps: each model's KV cache holds a prefix of the committed sequence
``seq`` and never its last token. The last committed token is kept apart because it is the
input of the next forward pass; so every step emits at least one token (the verifier's).
A model whose cache lags (the draft after a fully accepted block lacks d_k) first catches up
on the tokens it is missing, in the same forward pass as its next input. One exception: a
rule's lookahead (CoSpec at the bonus position) makes the draft run that catch-up early,
last token included; its row after that token (``first``) then starts the next block.
CoS's alternate proposal is another: the verifiers, whose bonus the proposer is to score,
hold all of ``seq`` (their rows at the bonus position are already known).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from cospec import fast
from cospec.acceptance import AcceptanceRule, Proposal, Verdict
from cospec.cpu import fast_linear
from cospec.errors import CospecError
from cospec.sampling import GREEDY, SamplingConfig, probabilities, sample_on_device
from cospec.stats import DecodeStats

RUN_AHEAD = 4  # target-only decoding: tokens decoded per host read ...
QUEUED = 1     # ... and, on a GPU, such chunks launched past the one the host reads


@dataclass(frozen=True)
class Token:
    id: int
    from_draft: bool  # a draft token kept by the verifier (or by an arbiter override)


class HeldClock:
    """A generation's decode time, into ``stats.decode_s``, for loops that queue work on the
    device ahead of the tokens they yield: from ``start`` (a ``fast.clock`` reading) to the
    last token, less the time the caller held the tokens (``hand``)."""

    def __init__(self, device: torch.device, stats: DecodeStats, start: float) -> None:
        self.device, self.stats, self.start, self.held = device, stats, start, 0.0

    def hand(self, token: Token) -> Iterator[Token]:
        """Yield ``token`` with the clock stopped while the caller holds it; a caller that
        stops there (GeneratorExit) gets the time up to it counted."""
        paused = time.perf_counter()
        try:
            yield token
        except GeneratorExit:
            self.stats.decode_s += paused - self.start - self.held
            raise
        self.held += time.perf_counter() - paused

    def last(self, token: Token) -> Iterator[Token]:
        """Yield the generation's last ``token``, the clock stopped first: after the work
        still queued on the device (it is this generation's)."""
        self.stats.decode_s += fast.clock(self.device) - self.start - self.held
        yield token


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

    def forward(self, ids: list[int] | torch.Tensor, keep: int, prefill: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed ``ids`` (a list or a 1-d tensor) after the cached prefix; returns the last
        ``keep`` rows of logits [keep, V] (float32) and, if ``hidden``, of last hidden
        states [keep, d]. ``prefill``: these are the prompt's tokens but its last (as
        ``prefill`` feeds them), which a model's int8 copies leave to its own weights
        (``cpu.fast_linear``)."""
        x = (ids.view(1, -1).to(self.device) if isinstance(ids, torch.Tensor)
             else torch.tensor([ids], device=self.device))
        with (fast_linear(self.model, self.device, *x.shape, prefill=prefill),
              LastHidden(self.model, self.hidden) as h):
            out, self.cache = call_lm(self.model, self.cache, input_ids=x, logits_to_keep=keep)
        self.length += len(ids)
        hidden = h.value[0, -keep:].float() if self.hidden else None
        return out.logits[0, -keep:].float(), hidden

    def prefill(self, ids: list[int]) -> None:
        """Feed the prompt but its last token (the first step feeds that one)."""
        if ids:
            self.forward(ids, keep=1, prefill=True)

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


Row = tuple[torch.Tensor, torch.Tensor | None]  # one row of logits [1, V], hidden [1, d]


def _draw(row: torch.Tensor, sampling: SamplingConfig, gen: torch.Generator | None
          ) -> torch.Tensor:
    """A token from a logits row [V], on the device: argmax or a sample."""
    if sampling.greedy:
        return row.argmax().view(1)
    return sample_on_device(probabilities(row, sampling), gen)


def run_ahead(lm: CachedLM, seq: list[int], n: int, sampling: SamplingConfig,
              gen: torch.Generator | None, first: Row | None = None, extra: bool = False
              ) -> tuple[list[int], list[Row]]:
    """n tokens of ``lm`` after ``seq``, each fed straight back on the device: the tokens
    reach the host once, at the end (one synchronisation for n, not per token). Returns the
    tokens and the row [1, V] (hidden [1, d] or None) each was drawn from, then, with
    ``extra``, the row after the last of them; leaves the cache at ``len(seq) + n - 1``
    (``+ n`` with ``extra``). ``first``: ``lm``'s row after ``seq``, already computed (the
    cache then holds all of ``seq``), used instead of a forward pass."""
    if first is None:
        lm.crop(min(lm.length, len(seq) - 1))
    elif lm.length != len(seq):
        raise RuntimeError(f"cache at {lm.length}, the reused row needs {len(seq)}")
    pending: list[int] | torch.Tensor = seq[lm.length:]
    tokens, rows = [], []
    for i in range(n + extra):
        row = first if i == 0 and first is not None else lm.forward(pending, keep=1)
        rows.append(row)
        if i < n:
            pending = _draw(row[0][0], sampling, gen)
            tokens.append(pending)
    return (torch.cat(tokens).tolist() if tokens else []), rows


def propose(lm: CachedLM, seq: list[int], k: int, sampling: SamplingConfig,
            gen: torch.Generator | None, first: Row | None = None,
            extra: bool = False) -> Proposal:
    """The draft's k tokens after ``seq``, with their logits (and hidden states); with
    ``extra``, its logits at the bonus position too (``lookahead_logits``)."""
    tokens, rows = run_ahead(lm, seq, k, sampling, gen, first, extra)
    hidden = [h for _, h in rows[:k] if h is not None]
    return Proposal(tokens, torch.cat([r for r, _ in rows[:k]]) if k else None,
                    torch.cat(hidden) if hidden else None,
                    lookahead_logits=rows[k][0] if extra else None)


def score(lm: CachedLM, seq: list[int], prop: Proposal) -> None:
    """The verifier's rows for ``[pending..., d_1..d_k]`` in one forward pass, the last k + 1
    kept (``prop.target_logits`` [k + 1, V], ``prop.target_hidden``)."""
    k = len(prop.tokens)
    prop.target_logits, prop.target_hidden = lm.forward(seq[lm.length:] + prop.tokens, k + 1)


def lookahead(lm: CachedLM, prefix: list[int], bonus: int, sampling: SamplingConfig,
              gen: torch.Generator | None, known: Row | None) -> Proposal:
    """The draft's token after ``prefix`` (= seq + d_1..d_k), where the verifier's is
    ``bonus``. One forward over the tokens the cache lacks plus ``bonus``, two rows kept:
    row 0 is the lookahead, row 1 the draft's row after ``bonus`` (``Proposal.ahead``), which
    starts the next block when ``bonus`` is committed. That forward is the catch-up plain
    speculative decoding does at its next step anyway ([d_k, bonus]), so the lookahead costs
    no extra pass unless the draft's token is kept instead. ``known``: the row after
    ``prefix`` when it is already computed (k = 0 after a reused row)."""
    if known is not None:
        return Proposal(_draw(known[0][0], sampling, gen).tolist(), known[0], known[1])
    lm.crop(min(lm.length, len(prefix) - 1))
    rows, h = lm.forward(prefix[lm.length:] + [bonus], keep=2)
    return Proposal(_draw(rows[0], sampling, gen).tolist(), rows[:1],
                    None if h is None else h[:1],
                    ahead=(bonus, rows[1:], None if h is None else h[1:]))


def commit(target: CachedLM, draft: CachedLM, seq: list[int], prop: Proposal,
           verdict: Verdict) -> Row | None:
    """Trim each cache to what the verdict confirms (``seq`` not yet extended); returns the
    draft's row after the committed tokens when the lookahead already computed it."""
    target.crop(len(seq) + verdict.accepted)
    first = None
    ahead = prop.ahead  # the lookahead fed the verifier's bonus token too ...
    if (ahead is not None and verdict.accepted == len(prop.tokens)
            and ahead[0] == verdict.next_token):  # ... and it was committed
        first = ahead[1:]
    draft.crop(min(draft.length, len(seq) + verdict.accepted + (first is not None)))
    return first


class Team(Protocol):
    """The models of one generation with their KV caches, and what a step does with them:
    how tokens are proposed, how the distribution they are tested against is formed, what
    is committed and who proposes next. ``Speculation`` (a verifier and its draft: target
    only, SPD, CoSpec) and ``cospec.cos.Collaboration`` (a combination of models) are two."""

    def start(self, room: int) -> list[CachedLM]:
        """Make every model's cache (``room`` tokens at most); the first one's device runs
        the loop's clock and random generator. One cache alone: plain decoding of it."""
        ...

    def propose(self, seq: list[int], n: int, sampling: SamplingConfig,
                gen: torch.Generator | None) -> Proposal:
        """Up to ``n`` tokens after ``seq``, with what they were drawn from."""
        ...

    def score(self, seq: list[int], prop: Proposal, sampling: SamplingConfig) -> None:
        """One pass of whoever verifies ``prop``; fills its target side (``target_logits``,
        or ``target_probs``)."""
        ...

    def lookahead(self, seq: list[int], prop: Proposal, verdict: Verdict,
                  sampling: SamplingConfig, gen: torch.Generator | None) -> Proposal:
        """``prop`` with the draft's token at the bonus position (a rule with lookahead)."""
        ...

    def commit(self, seq: list[int], prop: Proposal, verdict: Verdict) -> list[int]:
        """Trim the caches to what ``verdict`` confirms (``seq`` not yet extended); returns
        the tokens to commit."""
        ...


class Speculation:
    """A verifier (the target) and its proposer (the draft), or the verifier alone."""

    def __init__(self, verifier: torch.nn.Module, proposer: torch.nn.Module | None,
                 hidden: bool = False):
        self.models, self.hidden = (verifier, proposer), hidden
        self.first: Row | None = None  # the draft's row after seq, when the lookahead made it

    def start(self, room: int) -> list[CachedLM]:
        self.target, self.draft = (None if m is None else cached_lm(m, self.hidden, room)
                                   for m in self.models)
        return [self.target] + ([self.draft] if self.draft is not None else [])

    def propose(self, seq: list[int], n: int, sampling: SamplingConfig,
                gen: torch.Generator | None) -> Proposal:
        return propose(self.draft, seq, n, sampling, gen, self.first)

    def score(self, seq: list[int], prop: Proposal, sampling: SamplingConfig) -> None:
        score(self.target, seq, prop)

    def lookahead(self, seq: list[int], prop: Proposal, verdict: Verdict,
                  sampling: SamplingConfig, gen: torch.Generator | None) -> Proposal:
        return prop.with_lookahead(lookahead(self.draft, seq + prop.tokens, verdict.next_token,
                                             sampling, gen, None if prop.tokens else self.first))

    def commit(self, seq: list[int], prop: Proposal, verdict: Verdict) -> list[int]:
        self.first = commit(self.target, self.draft, seq, prop, verdict)
        return prop.tokens[:verdict.accepted] + [verdict.next_token]


@contextlib.contextmanager
def _reset_on_error(lms: list[CachedLM]) -> Iterator[None]:
    """A step that raises leaves its caches half done: forget them (the committed sequence
    stays valid; a later forward re-reads it)."""
    try:
        yield
    except BaseException:
        for lm in lms:
            lm.reset()
        raise


def _count(stats: DecodeStats, prop: Proposal, verdict: Verdict, cut: int) -> None:
    """Add one step's counts to ``stats``: a verify pass (none for an alternate proposal,
    scored by the proposer), its drafted and accepted tokens, the arbiter's work, and the
    ``cut`` tokens yielded (up to an EOS)."""
    if prop.alternate:
        stats.drafted += len(prop.tokens)
        stats.accepted += verdict.accepted
    else:
        stats.record_step(len(prop.tokens), verdict.accepted)
        stats.arbiter_calls += verdict.arbiter_calls
        stats.overrides += verdict.overrides
        stats.arbiter_s += verdict.arbiter_s
    stats.generated += cut


@torch.inference_mode()
def decode(team: Team, prompt_ids: list[int], rule: AcceptanceRule, *, k: int = 4,
           max_new_tokens: int = 128, sampling: SamplingConfig = GREEDY,
           eos_ids: Iterable[int] = (), seed: int | None = None,
           stats: DecodeStats | None = None) -> Iterator[Token]:
    """Yield tokens as they are committed (batch size 1): each step ``team`` proposes up to
    k tokens, scores them, ``rule`` accepts a prefix and the team commits it.

    A team of one model is plain autoregressive decoding (``rule`` unused; ``_plain``): it
    decodes ``RUN_AHEAD`` tokens a host read, QUEUED such chunks ahead on a GPU.
    ``stats`` (if given) is updated in place. Stops after an EOS id (which is yielded) or
    ``max_new_tokens`` tokens. Inference mode holds while the loop runs, not between yields.
    """
    if not prompt_ids:
        raise CospecError("empty prompt: give at least one token")
    stats = stats if stats is not None else DecodeStats()
    eos, lms = set(eos_ids), team.start(cache_room(prompt_ids, max_new_tokens, k))
    device = lms[0].device
    gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
    seq = list(prompt_ids)
    t0 = fast.clock(device)
    for lm in lms:
        lm.prefill(seq[:-1])
    t1 = fast.clock(device)
    stats.prefill_s += t1 - t0
    if len(lms) == 1:
        yield from _plain(lms[0], seq, max_new_tokens, sampling, gen, eos, stats, t1)
        return
    overrides_before = stats.overrides  # ``stats`` may sum several generations
    while (left := max_new_tokens - (len(seq) - len(prompt_ids))) > 0:
        t0 = fast.clock(device)
        with _reset_on_error(lms):
            prop = team.propose(seq, min(k, left - 1), sampling, gen)               # propose
            team.score(seq, prop, sampling)                                          # score
            prop.position = len(seq) - len(prompt_ids)
            prop.overrides_so_far = stats.overrides - overrides_before
            verdict = rule(prop, sampling, gen)                                      # accept
            if verdict.wants_lookahead:  # the rule asks the draft at the bonus position
                prop = team.lookahead(seq, prop, verdict, sampling, gen)
                verdict = rule.at_bonus(prop, verdict)
            new = team.commit(seq, prop, verdict)                                    # commit
        seq.extend(new)
        cut = next((j + 1 for j, tok in enumerate(new) if tok in eos), len(new))
        _count(stats, prop, verdict, cut)
        stats.decode_s += fast.clock(device) - t0
        kept = verdict.accepted + verdict.next_from_draft
        for j in range(cut):
            yield Token(new[j], j < kept)
        if cut < len(new) or new[cut - 1] in eos:
            return


def _plain(lm: CachedLM, seq: list[int], budget: int, sampling: SamplingConfig,
           gen: torch.Generator | None, eos: set[int], stats: DecodeStats, start: float
           ) -> Iterator[Token]:
    """Plain autoregressive decoding of ``lm`` after ``seq`` (its cache holding all of it
    but the last token): at most ``budget`` tokens, up to and including an id in ``eos``.

    Tokens are drawn in chunks of RUN_AHEAD, each fed straight back on the device; the host
    reads a chunk's tokens through pinned memory. On a GPU, QUEUED newer chunks are launched
    before it waits for a chunk, so the GPU does not idle while the host reads, yields and
    launches (on the CPU nothing runs ahead of the host). The chunks queued past an EOS are
    dropped. ``stats``: a step a token read; ``decode_s`` counts from ``start`` (a clock
    reading) to the end, the chunks past an EOS included, less the time the caller held the
    tokens."""
    ahead = _queued(lm.device)
    clock = HeldClock(lm.device, stats, start)
    queued: collections.deque = collections.deque()  # (host copy, its event) a chunk
    pending: list[int] | torch.Tensor = seq[-1:]
    launched = produced = 0
    while produced < budget:
        with _reset_on_error([lm]):
            while launched < budget and len(queued) <= ahead:  # launch chunks
                drawn = []
                for _ in range(min(RUN_AHEAD, budget - launched)):
                    pending = _draw(lm.forward(pending, keep=1)[0][0], sampling, gen)
                    drawn.append(pending)
                queued.append(fast.to_host(torch.cat(drawn)))
                launched += len(drawn)
            host, done = queued.popleft()  # read the oldest
            if done is not None:
                done.synchronize()
        for tok in host.tolist():
            stats.record_step(0, 0)
            stats.generated += 1
            produced += 1
            if tok in eos or produced == budget:
                yield from clock.last(Token(tok, False))
                return
            yield from clock.hand(Token(tok, False))


def _queued(device: torch.device) -> int:
    """Chunks ``_plain`` launches past the one it reads: QUEUED on a GPU, where kernels run
    behind the host; 0 elsewhere (a CPU forward is done when it returns)."""
    return QUEUED if device.type == "cuda" else 0


def warm_up_budgets(k: int) -> list[int]:
    """max_new_tokens of short warm-up generations that between them run every step shape a
    timed generation at draft length k can meet: a budget b opens with a block of
    min(k, b - 1) drafts (``decode`` shortens a generation's last block to the tokens left),
    so 1..k + 1 give each verify of 1..k + 1 rows once. On a GPU each new shape is a CUDA
    graph captured, so a timed run that met one first would time its capture too."""
    return list(range(1, k + 2))


def generate(verifier: torch.nn.Module, proposer: torch.nn.Module | None,
             prompt_ids: list[int], rule: AcceptanceRule, *, k: int = 4,
             max_new_tokens: int = 128, sampling: SamplingConfig = GREEDY,
             eos_ids: Iterable[int] = (), seed: int | None = None,
             stats: DecodeStats | None = None) -> Iterator[Token]:
    """``decode`` with ``verifier`` checking ``proposer``'s k drafts by ``rule`` (SPD,
    CoSpec); ``proposer=None`` is plain autoregressive decoding of ``verifier``."""
    if k < 1 and proposer is not None:
        raise CospecError(f"k (draft length) must be >= 1, got {k}")
    return decode(Speculation(verifier, proposer, rule.needs_hidden), prompt_ids, rule, k=k,
                  max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids,
                  seed=seed, stats=stats)
