"""Speculative decoding with the whole block on the device: the host queues blocks without
waiting for their verdicts.

``decode`` (``cospec.decoding``) reads each block's verdict on the host before it can start
the next: the GPU idles while the host synchronises, decides and launches. Here every
quantity a block needs lives on the device: the committed sequence ``seq`` [room], its
length ``L`` [1], the drafts, the acceptance. A block is:

1. the draft's first step over the last two committed tokens, seq[L-2:L] at positions L-2,
   L-1 (one shape whether the draft lags by one token or, after a fully accepted block, two;
   re-writing the K/V of seq[L-2] is harmless), then k - 1 one-token steps, each fed the
   argmax of the one before: d_1..d_k;
2. the target's verify over [seq[L-1], d_1..d_k] at positions L-1..L+k-1;
3. a = the drafts matching the target's argmax before the first mismatch; the target's
   argmax at row a follows them. seq[L:L+k+1] takes d_1..d_k with that token at index a
   (what lies beyond a is overwritten by later blocks) and L += a + 1.

Both caches keep the invariant of ``decode``: their slots below the committed length hold
the committed tokens (the target's stale slot L+a is re-written by the next verify, the
draft's by its next first step). So the tokens are plain greedy decoding's, as spd's are.
The host reads each block's (a, window) back through pinned memory, a block behind (AHEAD),
to stop at an EOS or at ``max_new_tokens``; the blocks queued past the stop are dropped.

On a GPU the whole block is one CUDA graph, on static ``seq`` and ``length`` buffers: the host
launches a block, not a step. It is captured on a pair's first block (after two runs of it on
a side stream, whose ``length`` updates are undone) and kept for the engines and k. With
``graph=False`` (or COSPEC_BLOCK_GRAPH=0) a block is k + 1 replays of the engines' step graphs
and a dozen small kernels between them, each launched by the host (on the real pair on an
H200 the one graph was 2-4 % faster, results/gpu/h200/speed-fused-block-graph).

Three variants keep this shape: ``guessed_block`` (spd-staged: the first draft step also
checks prompt-lookup guesses), ``ruled_block`` (greedy CoSpec and CoS: the token at each
position is a choice from both models' rows, ``cospec.block_choice``; the token after a
fully kept block waits, pending, for the draft's row that the next block's first step
computes anyway) and ``sampled_block`` (spd at T > 0: draws and the rejection test on the
device, the host loop's distribution-exact rule; ``guessed_sampled_block`` for spd-staged,
``ruled_sampled_block`` for CoS).

Batch 1, prompts of two or more tokens, models on ``fast.StaticLM`` engines. ``stream``
yields the tokens as the blocks' verdicts return; spd, spd-staged, cos-we and cos-cd,
greedy or sampled, and greedy cospec (and the heuristics) (``methods.Method.stream``:
``cospec eval``, ``generate``, the API) take it wherever they can (``serves``;
COSPEC_SPD_BLOCK=0: never).
On that path, cospec eval's speed pass on an H200, spd made 1.12x / 1.26x target-only on
GSM8K / HumanEval against the host loop's 1.09x / 1.20x, and 1.19x / 1.32x against
1.16x / 1.32x on another machine (results/gpu/h200/spd-block-user-path).
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch

from cospec import fast
from cospec.block_choice import ArbiterChoice, Choice, CombinationChoice
from cospec.cos import Combination
from cospec.decoding import HeldClock, Token
from cospec.errors import CospecError
from cospec.lookup import device_guesses
from cospec.sampling import (
    GREEDY,
    SamplingConfig,
    draw,
    first_rejection,
    probabilities,
    recovery,
    rejection_test,
    residual,
)
from cospec.settings import choice
from cospec.stats import DecodeStats

# Blocks queued past the last one whose verdict the host has read (the default). On an H100
# (real pair, k = 4, same runs) 1 against 2: GSM8K tied (spd-graph 871 / 868 tok/s), HumanEval,
# whose shorter answers end more often, 3-4 % faster (spd-graph 903 / 877, spd-staged with
# the int8 draft 1,328 / 1,279): fewer blocks decoded past an EOS, and one queued block
# already keeps the device busy (results/gpu/h100/block-ahead).
AHEAD = 1
# prompt-lookup guesses a spd-staged block's first draft step checks (``guessed_block``): of
# 2, 4 and 6 on an H100, 6 gained most on HumanEval and lost nothing on GSM8K
# (results/gpu/h100/staged-device-real-pair)
GUESSES = 6
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def block(draft_step: Step, target_step: Step, seq: torch.Tensor, length: torch.Tensor,
          span: torch.Tensor) -> torch.Tensor:
    """One block on the device (the module docstring's 1-3): the steps map ids [n] and a
    start position [1] to (logits [n, V], hidden); span is arange(k + 1) on the device, made
    once a call. Writes the block's tokens into seq and advances length [1] in place; returns
    the verdict [k + 2]: a, then the window."""
    k = len(span) - 1
    logits, _ = draft_step(seq.index_select(0, length - 2 + span[:2]), length - 2)
    drafts = [logits[1].argmax().view(1)]
    for i in range(1, k):
        logits, _ = draft_step(drafts[-1], length - 1 + i)
        drafts.append(logits[0].argmax().view(1))
    accepted, window = verify(target_step, seq, length, span, torch.cat(drafts))
    return torch.cat([accepted, window])


def verify(target_step: Step, seq: torch.Tensor, length: torch.Tensor, span: torch.Tensor,
           d: torch.Tensor, proposed: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The module docstring's 2-3 for the proposals d [len(span) - 1]: the target's verify
    at positions L-1.., a = the proposals matching its argmax before the first mismatch
    (within the first ``proposed`` [1], if given), the window written into seq and length
    advanced by a + 1. Returns (a [1], the window [len(span)])."""
    logits, _ = target_step(torch.cat([seq.index_select(0, length - 1), d]), length - 1)
    best = logits.argmax(-1)                                              # [len(span)]
    keep = best[:len(d)] == d
    if proposed is not None:
        keep = keep & (span[:len(d)] < proposed)
    accepted = keep.long().cumprod(0).sum().view(1)
    return accepted, commit(seq, length, span, d, accepted, best.index_select(0, accepted))


def commit(seq: torch.Tensor, length: torch.Tensor, span: torch.Tensor, d: torch.Tensor,
           accepted: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """A block's commit: the window [len(span)], the proposals d with nxt [1] at
    ``accepted`` [1], written into seq from length (what lies past a + 1 is overwritten by
    later blocks), and length advanced by a + 1. Returns the window."""
    window = torch.cat([d, d[:1]]).index_copy(0, accepted, nxt)
    seq.index_copy_(0, length + span, window)
    length.add_(accepted + 1)
    return window


def sampled_steps(draft_step: Step, last: torch.Tensor, start: torch.Tensor, n: int,
                  sampling: SamplingConfig, gen: torch.Generator | None,
                  raw: list[torch.Tensor] | None = None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """n one-row draft steps from token ``last`` [1] at position ``start`` [1], each fed the
    token drawn from the step before: (the n tokens [1] each, their rows of the draft's
    processed distribution [1, V] each). ``raw``, if given, takes each step's logits [1, V]
    as a float32 copy (a step's logits may be a static graph output that the next step
    overwrites), for a combination of the models' rows."""
    tokens, rows = [], []
    for i in range(n):
        logits, _ = draft_step(last, start + i)
        if raw is not None:
            raw.append(logits[:1].to(torch.float32, copy=True))
        rows.append(probabilities(logits[:1], sampling))
        last = draw(rows[-1], gen)
        tokens.append(last)
    return tokens, rows


def sampled_verify(target_step: Step, seq: torch.Tensor, length: torch.Tensor,
                   span: torch.Tensor, d: torch.Tensor, q: torch.Tensor,
                   sampling: SamplingConfig, gen: torch.Generator | None,
                   proposed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``verify`` for proposals d [len(span) - 1] drawn from the draft's rows q [len(d), V]:
    the target's processed p at positions L-1.., d_i stands while u_i q_i(d_i) < p_i(d_i)
    (``rejection_test``; within the first ``proposed`` [1], if given), and the token at the
    first rejection a is drawn from norm(max(0, p_a - q_a)), or from p_a past the proposals
    (``recovery``). Commits as ``verify``; returns (a [1], the window [len(span)])."""
    logits, _ = target_step(torch.cat([seq.index_select(0, length - 1), d]), length - 1)
    p = probabilities(logits, sampling)                                   # [len(span), V]
    passes = rejection_test(p, q, d, gen)
    if proposed is not None:  # past the proposals: no test, and a zero row (the bonus is p's)
        within = span[:len(d)] < proposed
        passes, q = passes & within, q * within.view(-1, 1)
    accepted = first_rejection(passes)
    return accepted, commit(seq, length, span, d, accepted, draw(recovery(p, q, accepted), gen))


def sampled_block(draft_step: Step, target_step: Step, seq: torch.Tensor, length: torch.Tensor,
                  span: torch.Tensor, sampling: SamplingConfig,
                  gen: torch.Generator | None) -> torch.Tensor:
    """``block`` for sampled spd: each d_i is drawn from the draft's processed distribution
    q_i there (``sampling.probabilities``: temperature, top-k, top-p, as the host loop's),
    then ``sampled_verify``: the committed tokens follow the target's processed distribution
    exactly, as the host loop's (``acceptance.ExactRule``). Every draw is on the device
    (``sampling.draw``); ``gen`` None: the default generator, whose draws a CUDA graph
    replays afresh. Returns ``block``'s verdict [k + 2]: a, then the window."""
    k = len(span) - 1
    logits, _ = draft_step(seq.index_select(0, length - 2 + span[:2]), length - 2)
    q = [probabilities(logits[1:], sampling)]                                 # [1, V] each
    drafts = [draw(q[0], gen)]
    tokens, rows = sampled_steps(draft_step, drafts[0], length, k - 1, sampling, gen)
    accepted, window = sampled_verify(target_step, seq, length, span,
                                      torch.cat(drafts + tokens), torch.cat(q + rows),
                                      sampling, gen)
    return torch.cat([accepted, window])


def guessed_block(draft_step: Step, target_step: Step, seq: torch.Tensor, length: torch.Tensor,
                  span: torch.Tensor, m: int) -> torch.Tensor:
    """``block`` whose draft's first step also checks m prompt-lookup guesses
    (``lookup.device_guesses`` of the committed sequence, at positions L..L+m-1): the c
    guesses before the first that differs from the draft's own argmax stand, the step's
    rows give d_1..d_{c+1}, and k - 1 one-token steps follow as in ``block``: k + c
    proposals, all the draft's own greedy tokens (``spd-staged`` on the device). The
    verify runs over k + m + 1 rows whatever c is, accepting within the first k + c. span is
    arange(k + m + 1). Returns the verdict [k + m + 3]: a, k + c, then the window."""
    k = len(span) - 1 - m
    guess = device_guesses(seq, length, m)                                    # [m], -1: none
    ids = torch.cat([seq.index_select(0, length - 2 + span[:2]), guess.clamp(min=0)])
    logits, _ = draft_step(ids, length - 2)                                   # [m + 2]
    own = logits[1:].argmax(-1)                                               # [m + 1]
    stood = (guess == own[:m]).long().cumprod(0).sum().view(1)
    last = own.index_select(0, stood)  # d_{c+1}, at position L + c
    after = []
    for i in range(1, k):
        logits, _ = draft_step(last, length + stood + i - 1)
        last = logits[0].argmax().view(1)
        after.append(last)
    d = torch.cat([own, torch.zeros(k - 1, dtype=own.dtype, device=own.device)])
    if after:  # own[:c + 1], then the steps' tokens; past k + c: unused
        d = d.index_copy(0, stood + 1 + span[:k - 1], torch.cat(after))
    proposed = stood + k
    accepted, window = verify(target_step, seq, length, span, d, proposed)
    return torch.cat([accepted, proposed, window])


def guessed_sampled_block(draft_step: Step, target_step: Step, seq: torch.Tensor,
                          length: torch.Tensor, span: torch.Tensor, m: int,
                          sampling: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """``guessed_block`` for sampled spd-staged, as the host loop's staged drafting samples:
    guess j stands with probability q_j(guess) (the draft's processed distribution at its
    row), and the first that does not is replaced by a draw from q_j without it, which is a
    draw from q_j. So the c guesses that stood and the token after them are the draft's own
    sampled tokens d_1..d_{c+1}; k - 1 one-row steps draw the rest, and ``sampled_verify``
    runs over the first k + c (each against its row of q).
    Returns ``guessed_block``'s verdict [k + m + 3]: a, k + c, then the window."""
    k = len(span) - 1 - m
    guess = device_guesses(seq, length, m)                                    # [m], -1: none
    g = guess.clamp(min=0)
    logits, _ = draft_step(torch.cat([seq.index_select(0, length - 2 + span[:2]), g]),
                           length - 2)
    q = probabilities(logits[1:], sampling)                                   # [m + 1, V]
    u = torch.rand(m, generator=gen, device=q.device)
    stands = (guess >= 0) & (u < q[:m].gather(-1, g.view(m, 1))[:, 0])
    stood = stands.long().cumprod(0).sum().view(1)                            # c
    # the guess at c that fell (-1: none fell, or none was there)
    out = torch.where(stood < m, torch.cat([guess, guess[:1]]).index_select(0, stood), -1)
    gone = torch.zeros_like(q[:1]).scatter(-1, out.clamp(min=0).view(1, 1), (out >= 0).float()
                                           .view(1, 1))  # [1, V]: the guess that fell, if any
    last = draw(residual(q.index_select(0, stood), gone), gen)               # d_{c+1}
    d = torch.cat([torch.cat([g, g[:1]]).index_copy(0, stood, last),
                   g.new_zeros(k - 1)])                                       # [m + k]
    rows = torch.cat([q, q.new_zeros(k - 1, q.shape[-1])])                    # [m + k, V]
    after, after_q = sampled_steps(draft_step, last, length + stood, k - 1, sampling, gen)
    if after:  # own[:c + 1], then the steps' tokens and rows; past k + c: unused
        d = d.index_copy(0, stood + 1 + span[:k - 1], torch.cat(after))
        rows = rows.index_copy(0, stood + 1 + span[:k - 1], torch.cat(after_q))
    proposed = stood + k
    accepted, window = sampled_verify(target_step, seq, length, span, d, rows, sampling, gen,
                                      proposed)
    return torch.cat([accepted, proposed, window])


class Held(NamedTuple):
    """A ruled block's state beside seq and length: pending [1] long, 1 where seq[length]
    holds the target's next token awaiting the draft's row there; row [V] float32, the
    target's logits at it; prompt [1] long, the prompt's length (positions count from it)."""

    pending: torch.Tensor
    row: torch.Tensor
    prompt: torch.Tensor


def ruled_block(draft_step: Step, target_step: Step, seq: torch.Tensor, length: torch.Tensor,
                span: torch.Tensor, held: Held, choose: Choice) -> torch.Tensor:
    """``block`` for greedy methods whose token at a position depends on both models' rows
    there (``choose``, ``cospec.block_choice``: CoSpec's arbiter, a CoS combination).

    When every proposal is kept, the token after them needs the draft's row there, which
    the block has not computed: it is left *pending* in seq[L] (``held``; not committed),
    and the next block's first draft step, over [seq[L-1], pending], gives that row (row 0)
    with the draft's row after the pending token (row 1), so no extra draft step is spent
    (CoS's alternate proposal; CoSpec's lookahead done by the next catch-up).

    Then, as ``block``: k - 1 one-token steps and the verify over [seq[base-1], d_1..d_k] at
    base = L + pending (the pending token first, when there is one). One choice call covers
    the pending position and the k rows (a choice is a dozen small kernels whatever the
    rows). y, the choice at the pending position, is committed at L. If it differs from
    the pending token, the rows after it stood on the wrong token: the block commits y
    alone. Else a = the proposals kept before the first that is not; the next token (the
    choice at row a; the target's argmax, pending, when a = k) follows them. Caches keep
    ``block``'s invariant below the next block's first position. Returns the verdict
    [k + 6]: a, ok (y was the pending token, or none was pending), overrides (committed
    tokens unlike the target's argmax), mismatches met (the arbiter's calls), y, then the
    window [k + 1]."""
    k = len(span) - 1
    pending = held.pending
    was = pending > 0                                                         # [1]
    first = length + pending - 2
    # (clones: a step's logits may be a static graph output that the next step overwrites)
    logits = draft_step(seq.index_select(0, first + span[:2]), first)[0].clone()  # [2, V]
    x = seq.index_select(0, length)  # the pending token (stale when none is pending)
    base = length + pending
    rows, drafts = [logits], [logits[:1].argmax(-1), logits[1:].argmax(-1)]
    for i in range(1, k):
        logits = draft_step(drafts[-1], base + i - 1)[0].clone()
        rows.append(logits)
        drafts.append(logits.argmax(-1))
    own, d = drafts[0], torch.cat(drafts[1:])  # the draft's token at L; its proposals [k]
    theirs, _ = target_step(torch.cat([seq.index_select(0, base - 1), d]), base - 1)
    best = theirs.argmax(-1)                                                  # [k + 1]
    chosen = choose(torch.cat([held.row[None], theirs[:k].float()]), torch.cat(rows),
                    torch.cat([own, d]),
                    torch.cat([length, base + span[:k]]) - held.prompt)      # [k + 1]
    y = torch.where(was, chosen[:1], x)
    ok = y == x
    chosen = chosen[1:]
    accepted = ((chosen == d) & ok).long().cumprod(0).sum().view(1)
    full = accepted == k  # the next token is the target's, left pending
    nxt = torch.where(full, best, torch.cat([chosen, best[k:]])).index_select(0, accepted)
    window = commit_ruled(seq, length, span, held, base, y, ok, d, accepted, nxt, theirs)
    differ = d != best[:k]
    overrides = ((~ok).long() + ok.long() * (
        (differ & (span[:k] < accepted)).sum().view(1)
        + (nxt != best.index_select(0, accepted)).long()))
    met = ((differ & (span[:k] <= accepted)).sum().view(1) * ok.long()
           + (was & (own != x)).long())
    return torch.cat([accepted, ok.long(), overrides, met, y, window])


def commit_ruled(seq: torch.Tensor, length: torch.Tensor, span: torch.Tensor, held: Held,
                 base: torch.Tensor, y: torch.Tensor, ok: torch.Tensor, d: torch.Tensor,
                 accepted: torch.Tensor, nxt: torch.Tensor, theirs: torch.Tensor
                 ) -> torch.Tensor:
    """A ruled block's commit: y [1] at L, then (where ``ok``: y was the pending token, or
    none was pending) the proposals d [k] with nxt [1] at ``accepted`` [1] from ``base``;
    the target's row there (``theirs`` [k + 1, V]) kept in ``held``, and length and the
    pending flag advanced (a token is left pending when every proposal stood). Returns the
    window [k + 1]."""
    full = accepted == len(d)
    window = torch.cat([d, d[:1]]).index_copy(0, accepted, nxt)
    seq.index_copy_(0, length, y)  # (its own stale value where none was pending) ...
    seq.index_copy_(0, base + span, window)  # ... then the window (past L + 1 if not ok)
    held.row.copy_(theirs.index_select(0, accepted)[0])
    length.copy_(torch.where(ok, base + accepted + (~full).long(), length + 1))
    held.pending.copy_((ok & full).long())
    return window


def ruled_sampled_block(draft_step: Step, target_step: Step, seq: torch.Tensor,
                        length: torch.Tensor, span: torch.Tensor, held: Held,
                        combo: Combination, sampling: SamplingConfig,
                        gen: torch.Generator | None) -> torch.Tensor:
    """``ruled_block`` for CoS at T > 0 (cos-we, cos-cd of two models; ``cospec.cos``'s
    alternate proposal), the tokens following the combination r of both models' rows
    (``Combination.probs``) exactly:

    - the draft's tokens d_i ~ q_i stand with probability min(1, r_i(d_i) / q_i(d_i)); the
      first that does not is replaced by a draw from norm(max(0, r - q));
    - when every draft stands, the token after them is drawn from the target's own p and
      left pending; the next block's first draft step gives the draft's row there, and it
      stands with probability min(1, r(x) / p(x)), else it is replaced by a draw from
      norm(max(0, r - p)) and committed alone (the block's drafts stood on it).

    Returns ``ruled_block``'s verdict [k + 6] (no overrides and no arbiter calls: zeros)."""
    k = len(span) - 1
    pending = held.pending
    was = pending > 0                                                         # [1]
    first = length + pending - 2
    # (copies: a step's logits may be a static graph output that the next step overwrites)
    logits = draft_step(seq.index_select(0, first + span[:2]), first)[0]
    at_x = logits[:1].to(torch.float32, copy=True)  # the draft's row at the pending token
    rows = [logits[1:].to(torch.float32, copy=True)]
    q = [probabilities(rows[0], sampling)]
    drafts = [draw(q[0], gen)]
    x = seq.index_select(0, length)  # the pending token (stale when none is pending)
    base = length + pending
    tokens, later = sampled_steps(draft_step, drafts[0], base, k - 1, sampling, gen, raw=rows)
    d, q = torch.cat(drafts + tokens), torch.cat(q + later)                   # [k], [k, V]
    theirs, _ = target_step(torch.cat([seq.index_select(0, base - 1), d]), base - 1)
    theirs = theirs.float()                                                   # [k + 1, V]
    p_x = probabilities(held.row[None], sampling)
    r_x = combo.probs([at_x, held.row[None]], sampling)
    stands = rejection_test(r_x, p_x, x, gen)
    y = torch.where(was & ~stands, draw(residual(r_x, p_x), gen), x)
    ok = y == x
    r = combo.probs([torch.cat(rows), theirs[:k]], sampling)                 # [k, V]
    accepted = first_rejection(rejection_test(r, q, d, gen) & ok)
    full = accepted == k  # the next token is the target's own draw, left pending
    at = accepted.clamp_max(k - 1)
    fix = draw(residual(r.index_select(0, at), q.index_select(0, at)), gen)
    nxt = torch.where(full, draw(probabilities(theirs[k:], sampling), gen), fix)
    window = commit_ruled(seq, length, span, held, base, y, ok, d, accepted, nxt, theirs)
    none = torch.zeros_like(accepted)
    return torch.cat([accepted, ok.long(), none, none, y, window])


def held_state(tgt: fast.Engine) -> Held:
    """A ruled block's ``Held`` state for the target engine's vocabulary (nothing pending)."""
    zeros = torch.zeros(2, dtype=torch.long, device=tgt.device)
    return Held(zeros[:1], torch.zeros(tgt.head_w.shape[0], device=tgt.device), zeros[1:])


class BlockGraph:
    """A whole block as one CUDA graph for a target and a draft engine, k, m guesses
    (``guessed_block``; 0: ``block``), a choice (``ruled_block``) or a sampling config
    (``sampled_block``): ``seq`` [target's max_len], ``length`` [1] and, with a choice,
    ``held`` are its static state, ``run()`` replays it (capturing it first) and returns its
    static verdict, overwritten by the next run. A sampled block's draws come from the
    default CUDA generator, or from ``run(rng)``'s generator."""

    def __init__(self, tgt: fast.Engine, drf: fast.Engine, k: int, guesses: int = 0,
                 choice: Choice | None = None, sampling: SamplingConfig = GREEDY) -> None:
        # weak: the graphs are kept by the engines (``_GRAPHS``), not the engines by them
        self.tgt, self.drf = weakref.ref(tgt), weakref.ref(drf)
        self.device = tgt.device
        self.seq = torch.zeros(tgt.max_len, dtype=torch.long, device=tgt.device)
        self.length = torch.zeros(1, dtype=torch.long, device=tgt.device)
        self.span = torch.arange(k + guesses + 1, device=tgt.device)
        self.guesses, self.choice, self.sampling = guesses, choice, sampling
        self.held = held_state(tgt) if choice is not None else None  # ruled blocks only
        self.graph: torch.cuda.CUDAGraph | None = None
        self.verdict: torch.Tensor | None = None

    def _block(self) -> torch.Tensor:
        tgt, drf = self.tgt(), self.drf()
        return run_block(lambda ids, start: drf._forward(ids, start, eager=False),
                         lambda ids, start: tgt._forward(ids, start, eager=False),
                         self.seq, self.length, self.span, self.guesses, self.held, self.choice,
                         self.sampling)

    def run(self, rng: torch.Generator | None = None) -> torch.Tensor:
        """Replay the block (captured on the first run, from the default generator's draws
        whatever ``rng``). ``rng``: the replay draws from that CUDA generator's state and
        advances it, the default generator's left as it was. A replay reads its generator's
        seed and offset when it is launched (torch's graph-safe RNG), so the default one
        holds ``rng``'s state for the launch only: host work, no device read."""
        if self.graph is None:  # the warm-up runs' writes are the ones the replay makes
            state = [self.length, *(self.held or ())]  # again; their state updates are
            saved = [t.clone() for t in state]        # undone

            def warm_up() -> None:
                self._block()
                for t, before in zip(state, saved):
                    t.copy_(before)

            self.graph, self.verdict = fast.capture_graph(
                self.device, torch.cuda.graph_pool_handle(), self._block, warm_up=warm_up)
        if rng is None:
            self.graph.replay()
            return self.verdict
        default = torch.cuda.default_generators[self.device.index
                                                if self.device.index is not None
                                                else torch.cuda.current_device()]
        saved = default.get_state()
        default.set_state(rng.get_state())
        try:
            self.graph.replay()
        finally:
            rng.set_state(default.get_state())
            default.set_state(saved)
        return self.verdict


def run_block(draft_step: Step, target_step: Step, seq: torch.Tensor, length: torch.Tensor,
              span: torch.Tensor, guesses: int = 0, held: Held | None = None,
              choice: Choice | None = None, sampling: SamplingConfig = GREEDY,
              gen: torch.Generator | None = None) -> torch.Tensor:
    """With a choice ``ruled_sampled_block`` for a sampling config (a combination's) or
    ``ruled_block``, else with ``guesses`` > 0 ``guessed_sampled_block``
    for a sampling config or ``guessed_block``, else ``sampled_block`` for a sampling
    config, else ``block`` (and its verdict)."""
    if choice is not None and not sampling.greedy:
        return ruled_sampled_block(draft_step, target_step, seq, length, span, held,
                                   choice.combo, sampling, gen)
    if choice is not None:
        return ruled_block(draft_step, target_step, seq, length, span, held, choice)
    if guesses and not sampling.greedy:
        return guessed_sampled_block(draft_step, target_step, seq, length, span, guesses,
                                     sampling, gen)
    if guesses:
        return guessed_block(draft_step, target_step, seq, length, span, guesses)
    if not sampling.greedy:
        return sampled_block(draft_step, target_step, seq, length, span, sampling, gen)
    return block(draft_step, target_step, seq, length, span)


# target engine -> draft engine -> {(k, guesses, choice's key, sampling): BlockGraph}, gone
# with either engine
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# sampling configs (temperature, top-k, top-p) an engine pair keeps a block graph for: the
# first ones met; a request with another samples in the step graphs' blocks
SAMPLED_GRAPHS = 8


def captured_graphs() -> int:
    """Block graphs captured so far, of engines still alive: a speed run reads it around a
    timed generation to know whether a capture fell inside it."""
    return sum(g.graph is not None for by_draft in _GRAPHS.values()
               for graphs in by_draft.values() for g in graphs.values())


def captures() -> tuple[int, float]:
    """(block graphs captured, the pooled engines' capture seconds): read around a timed
    generation, a change says a capture (or a new engine, replacing a smaller one) fell
    inside it."""
    return captured_graphs(), fast.capture_seconds()


def warm_until_settled(warm: Callable[[], object], rounds: int) -> None:
    """Call ``warm`` (one warm-up round over every method a timing compares) up to ``rounds``
    times, again while a round captured (``captures``): a later method's device-side block
    may have made a larger engine in place of an earlier method's, whose one-row graph the
    next round captures, not a timed run."""
    for _ in range(rounds):
        before = captures()
        warm()
        if captures() == before:
            return


def block_graph(tgt: fast.Engine, drf: fast.Engine, k: int, guesses: int = 0,
                choice: Choice | None = None, sampling: SamplingConfig = GREEDY
                ) -> BlockGraph | None:
    """The block graph of these engines, k, guesses, choice (by its ``key``: an equal
    choice reuses the graph) and sampling config, made once (captured on its first run);
    None for a sampling config past the first SAMPLED_GRAPHS of the pair."""
    graphs = _GRAPHS.setdefault(tgt, weakref.WeakKeyDictionary()).setdefault(drf, {})
    key = (k, guesses, None if choice is None else choice.key, sampling)
    if key not in graphs:
        if not sampling.greedy and sum(not g.sampling.greedy for g in graphs.values()
                                       ) >= SAMPLED_GRAPHS:
            return None
        graphs[key] = BlockGraph(tgt, drf, k, guesses, choice, sampling)
    return graphs[key]


def blocks_ahead() -> int:
    """COSPEC_BLOCK_AHEAD: the blocks ``stream`` queues past the last one whose verdict the
    host has read, 1-4 (unset: AHEAD), fewer where those queued may already reach
    ``max_new_tokens``. Those queued when a verdict shows an EOS are decoded and dropped, in
    the generation's time: fewer waste less at the end, more keep the device busy through a
    slower host."""
    return int(choice("COSPEC_BLOCK_AHEAD", ("1", "2", "3", "4"), str(AHEAD)))


def one_graph() -> bool:
    """COSPEC_BLOCK_GRAPH: each block one CUDA graph (1, unset: the default) or k + 1 step
    graphs and the kernels between them launched by the host (0)."""
    return choice("COSPEC_BLOCK_GRAPH", ("0", "1"), "1") == "1"


def serving() -> bool:
    """COSPEC_SPD_BLOCK: the methods ``methods.Method.stream`` brings here (spd, spd-staged,
    greedy cospec and CoS) run here where they can (``serves``; 1, unset: the default) or
    always in their host loops (0)."""
    return choice("COSPEC_SPD_BLOCK", ("0", "1"), "1") == "1"


def serves(target: torch.nn.Module, draft: torch.nn.Module, prompt_ids: list[int]) -> bool:
    """Do this pair and prompt stream from here (``Method.device_block`` asks which
    methods)? With ``serving()``, where
    both models run on the fast path's engines (``fast.wanted``: on CUDA), on one device,
    neither a tensor-parallel shard, and the prompt has two or more tokens."""
    if not serving() or len(prompt_ids) < 2:
        return False
    models = (target, draft)
    return (all(fast.wanted(m) and getattr(m, "engine_class", None) is None for m in models)
            and len({next(m.parameters()).device for m in models}) == 1)


def spd_greedy(target: torch.nn.Module, draft: torch.nn.Module, prompt_ids: list[int], *,
               k: int = 5, max_new_tokens: int = 128, eos_ids: Iterable[int] = (),
               stats: DecodeStats | None = None, graph: bool | None = None,
               guesses: int = 0, choice: Choice | None = None) -> list[int]:
    """``stream``'s tokens as a list of ids."""
    return [t.id for t in stream(target, draft, prompt_ids, k=k, max_new_tokens=max_new_tokens,
                                 eos_ids=eos_ids, stats=stats, graph=graph, guesses=guesses,
                                 choice=choice)]


@torch.inference_mode()
def stream(target: torch.nn.Module, draft: torch.nn.Module, prompt_ids: list[int], *,
           k: int = 5, max_new_tokens: int = 128, eos_ids: Iterable[int] = (),
           stats: DecodeStats | None = None, graph: bool | None = None, guesses: int = 0,
           choice: Choice | None = None, sampling: SamplingConfig = GREEDY,
           seed: int | None = None) -> Iterator[Token]:
    """The target's greedy continuation of ``prompt_ids`` (at most ``max_new_tokens``, up to
    and including an EOS), by speculative decoding with ``draft``'s k tokens a block,
    yielded as each block's verdict is read back (``blocks_ahead()`` behind the device); a token
    is ``from_draft`` where it is a draft the target accepted. ``stats`` (if given) gets the
    blocks as steps (drafted and accepted tokens), the tokens, and the prefill and decode
    time (the decode clock stops while the caller holds a token). ``graph``: each block one
    CUDA graph where both engines use graphs (None: unless COSPEC_BLOCK_GRAPH=0).
    ``guesses``: each block's first draft step also checks that many prompt-lookup guesses
    (``guessed_block``: k + c proposals, ``spd-staged``). ``choice``: each position's token
    is the choice of both models' rows there (``ruled_block``: greedy CoSpec and CoS; a
    token is ``from_draft`` where it is not the target's own). ``sampling`` (T > 0): a
    sample of the target's processed distribution instead (``sampled_block``; with a
    combination's choice, of the combination: ``ruled_sampled_block``), drawn from a
    generator seeded with ``seed`` where one is given (through a block graph too:
    ``BlockGraph.run``), else from the default one. Inference mode holds while the loop
    runs, not between yields."""
    if len(prompt_ids) < 2:
        raise CospecError("the device-side block needs a prompt of two or more tokens")
    if k < 1:
        raise CospecError(f"k (draft length) must be >= 1, got {k}")
    if guesses < 0 or (guesses and k + guesses + 1 > fast.MAX_GRAPH):
        raise CospecError(f"guesses must be >= 0, and with guesses a verify's k + guesses + 1 "
                          f"rows at most {fast.MAX_GRAPH}; got k = {k}, guesses = {guesses}")
    if guesses and choice is not None:
        raise CospecError("a block checks prompt-lookup guesses or takes a choice, not both")
    if not sampling.greedy and choice is not None and not isinstance(choice, CombinationChoice):
        raise CospecError("a sampled block (T > 0) takes no arbiter's choice (CoSpec is "
                          "greedy): spd's, spd-staged's or a CoS combination's")
    sampling = GREEDY if sampling.greedy else sampling  # one greedy graph, whatever top-p
    stats = stats if stats is not None else DecodeStats()
    if max_new_tokens < 1:  # as ``decode``: nothing to generate
        return
    eos, start = set(eos_ids), len(prompt_ids)
    ahead = blocks_ahead()
    room = start + max_new_tokens + (ahead + 2) * (k + guesses + 1) + 2
    lms = [fast.StaticLM(m, max_len=room) for m in (target, draft)]
    tgt, drf = (lm.engine for lm in lms)
    device = tgt.device
    t0 = fast.clock(device)
    for lm in lms:
        lm.prefill(prompt_ids[:-1])
    t1 = fast.clock(device)
    stats.prefill_s += t1 - t0
    if graph is None:
        graph = one_graph()
    gen = (torch.Generator(device).manual_seed(seed)
           if seed is not None and not sampling.greedy else None)
    whole = (block_graph(tgt, drf, k, guesses, choice, sampling)
             if graph and tgt.use_graphs and drf.use_graphs else None)
    if whole is not None:  # the graph's own state (its span made with it)
        seq, length, held = whole.seq, whole.length, whole.held
    else:
        seq = torch.zeros(room, dtype=torch.long, device=device)
        length = torch.zeros(1, dtype=torch.long, device=device)
        span = torch.arange(k + guesses + 1, device=device)
        held = held_state(tgt) if choice is not None else None
    seq[:start] = torch.tensor(prompt_ids, device=device)
    length.fill_(start)
    if held is not None:
        held.pending.zero_()
        held.prompt.fill_(start)
    queued: collections.deque = collections.deque()  # (host copy, its event) a block
    clock = HeldClock(device, stats, t1)
    produced, pending = 0, False
    most = k + guesses + 1  # the tokens one block commits at most
    while True:
        # one block, queued on the device, unless those queued may already reach the budget
        # (a block past it would be decoded and dropped; past an EOS that cannot be known)
        if produced + len(queued) * most < max_new_tokens:
            verdict = (whole.run(gen) if whole is not None
                       else run_block(drf.run_device, tgt.run_device, seq, length, span,
                                      guesses, held, choice, sampling, gen))
            queued.append(fast.to_host(verdict))
            if len(queued) <= ahead:
                continue
        # the verdict of the oldest queued block, read without stalling the newer ones
        host, done = queued.popleft()
        if done is not None:
            done.synchronize()
        if choice is None:
            a, *window = host.tolist()
            proposed = window.pop(0) if guesses else k
            stats.record_step(proposed, a)
            tokens = [Token(tok, j < a) for j, tok in enumerate(window[:a + 1])]
        else:
            tokens, pending = ruled_tokens(host.tolist(), k, pending, stats,
                                           isinstance(choice, ArbiterChoice))
        stats.device_blocks += 1
        for tok in tokens:
            produced += 1
            stats.generated += 1
            if tok.id in eos or produced >= max_new_tokens:
                # the blocks queued past the stop are this call's work: its clock counts them
                yield from clock.last(tok)
                return
            yield from clock.hand(tok)


def ruled_tokens(verdict: list[int], k: int, pending: bool, stats: DecodeStats,
                 asks: bool) -> tuple[list[Token], bool]:
    """The tokens a ``ruled_block`` verdict commits, given whether a token was pending
    before it, and whether one is after it; its step, overrides (and, where the choice
    ``asks`` an arbiter, the mismatches met as its calls) go to ``stats``."""
    a, ok, overrides, met, y, *window = verdict
    tokens = [Token(y, not ok)] if pending else []
    if ok:
        tokens += [Token(t, True) for t in window[:a]]
        if a < k:
            tokens.append(Token(window[a], False))
    stats.record_step(k + pending, a + (pending and ok))
    stats.overrides += overrides
    stats.arbiter_calls += met if asks else 0
    return tokens, bool(ok) and a == k
