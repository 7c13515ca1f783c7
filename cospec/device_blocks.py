"""One speculative block as tensor operations on the device, for ``cospec.fast_block``,
which queues blocks without reading their verdicts and replays each as one CUDA graph.

Every quantity a block needs lives on the device: the committed sequence ``seq`` [room], its
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

Three variants keep this shape: ``guessed_block`` (spd-staged: the first draft step also
checks prompt-lookup guesses), ``ruled_block`` (greedy CoSpec and CoS: the token at each
position is a choice from both models' rows, ``cospec.block_choice``; the token after a
fully kept block waits, pending, for the draft's row that the next block's first step
computes anyway) and ``sampled_block`` (spd at T > 0: draws and the rejection test on the
device, the host loop's distribution-exact rule; ``guessed_sampled_block`` for spd-staged,
``ruled_sampled_block`` for CoS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from cospec import fast
from cospec.block_choice import Choice
from cospec.cos import Combination
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
