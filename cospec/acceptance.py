"""Acceptance rules: (draft tokens, draft logits, verifier logits) -> (accepted, next token).

Terminology: the verifier scores k drafted tokens d_1..d_k and produces k + 1 rows of logits;
row i is its distribution for the token at d_{i+1}'s position, row k is the *bonus* row.
A rule keeps a prefix d_1..d_n (``accepted`` = n) and commits one more token: *recovered*
at a rejection, or the *bonus* when all k are kept.

The distribution tested against is the verifier's own unless the step formed another
(``Proposal.target_probs``: CoS's combination r of several models' rows); then a proposal may
lack the bonus row (a verifier's token proposed to the proposer, CoS's alternate proposal),
and a block that passes whole commits nothing after it.

Exact rules reproduce the verifier (greedy output, or sampling distribution). Lossy rules
(an arbiter that may keep a draft token the verifier disagrees with: ``arbiter.ArbiterRule``)
set ``lossy = True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from cospec.sampling import SamplingConfig, first_rejection, probabilities, recover, rejection_test


@dataclass
class Proposal:
    """One speculative step's tensors (k = len(tokens), V = vocabulary, d = hidden size)."""

    tokens: list[int]                             # d_1..d_k
    draft_logits: torch.Tensor | None = None      # [k, V]: row i drew d_{i+1}
    draft_hidden: torch.Tensor | None = None      # [k, d_draft]
    target_logits: torch.Tensor | None = None     # [k + 1, V]
    target_hidden: torch.Tensor | None = None     # [k + 1, d_target]
    position: int = 0                             # tokens generated before d_1
    overrides_so_far: int = 0                     # draft tokens kept by an arbiter so far
    lookahead: int | None = None                  # draft's token at the bonus position
    lookahead_logits: torch.Tensor | None = None  # [1, V]
    lookahead_hidden: torch.Tensor | None = None  # [1, d_draft]
    # (bonus, logits [1, V], hidden [1, d] | None): the draft's row after the verifier's
    # bonus token, computed with the lookahead; the loop starts the next block with it
    ahead: tuple | None = None
    # the distribution wanted at each position when it is not the verifier's own (CoS: r),
    # [k + 1, V], or [k, V] without a bonus row
    target_probs: torch.Tensor | None = None
    draft_probs: torch.Tensor | None = None       # [k, V]: drawn from, when not draft_logits
    alternate: bool = False  # a verifier's tokens, scored by the proposer (no verifier pass)

    def with_lookahead(self, more: Proposal) -> Proposal:
        """This proposal with the draft's token at the bonus position (``more``: the draft's
        one-token proposal there, from ``decoding.lookahead``)."""
        self.lookahead = more.tokens[0]
        self.lookahead_logits, self.lookahead_hidden = more.draft_logits, more.draft_hidden
        self.ahead = more.ahead
        return self


@dataclass
class Verdict:
    accepted: int                 # n: d_1..d_n are committed
    next_token: int | None        # recovered or bonus token, committed after them (None:
    #                               all passed and there is no bonus row)
    arbiter_calls: int = 0
    overrides: int = 0            # mismatches where the draft token was kept
    arbiter_s: float = 0.0
    next_from_draft: bool = False  # the token after the accepted ones is the draft's
    # all k drafts kept, and the rule would arbitrate the bonus position given the draft's
    # token there: the loop drafts it (``Proposal.with_lookahead``), then calls ``at_bonus``
    wants_lookahead: bool = False


class AcceptanceRule(Protocol):
    """A rule reads the step's tensors and runs no model: where it needs the draft's token at
    the bonus position (``lookahead``), its verdict says so (``wants_lookahead``); the loop
    drafts that token and asks ``at_bonus``."""

    lossy: bool
    needs_hidden: bool
    lookahead: bool  # may want the draft's token at the bonus position too

    def __call__(self, prop: Proposal, sampling: SamplingConfig,
                 gen: torch.Generator | None) -> Verdict: ...

    def at_bonus(self, prop: Proposal, verdict: Verdict) -> Verdict:
        """The final verdict once ``prop.lookahead`` is known (rules with ``lookahead``)."""
        ...


class Outcomes(Protocol):
    """Records the accept/reject outcome of each tested token, or replays recorded ones
    (``cospec.replay.CosTrace``)."""

    def decide(self, real: bool) -> bool:
        """The outcome to act on, given the real one."""
        ...


@dataclass
class ExactRule:
    """Plain speculative decoding: greedy match at T = 0, rejection sampling at T > 0.

    Rejection sampling (Leviathan et al. / Chen et al.): accept d_i with probability
    min(1, p_i(d_i) / q_i(d_i)); at the first rejection resample from norm(max(0, p_i - q_i));
    if all pass, sample the bonus from p_k. The committed tokens are distributed exactly as
    sampling from the target side p: the (processed) verifier distribution, or the step's
    ``target_probs``; q is the draft's (processed) distribution, or ``draft_probs``. Greedy:
    a token passes iff it is argmax p, and the next token is argmax p. Every position is
    tested at once on the device (``sampling.rejection_test``); the verdict costs one host
    sync per block. ``trace`` sees each outcome up to the first rejection; where a replay
    decides otherwise, the token after the replayed n is drawn for that position (a second
    sync, replay only).
    """

    lossy: bool = False
    needs_hidden: bool = False
    lookahead: bool = False
    trace: Outcomes | None = None

    def __call__(self, prop, sampling, gen):
        k = len(prop.tokens)
        p = prop.target_probs  # [m, V]: m = k + 1, or k without a bonus row
        if p is None:
            p = prop.target_logits if sampling.greedy else probabilities(prop.target_logits,
                                                                         sampling)
        tokens = torch.tensor(prop.tokens, dtype=torch.long, device=p.device)
        if sampling.greedy:
            best = p.argmax(-1)                                   # [m]
            passes = tokens == best[:k]

            def after(at: torch.Tensor) -> torch.Tensor:
                return best.index_select(0, at)
        else:
            q = prop.draft_probs
            if q is None:
                q = probabilities(prop.draft_logits, sampling) if k else p[:0]  # [k, V]
            passes = rejection_test(p, q, tokens, gen)

            def after(at: torch.Tensor) -> torch.Tensor:
                return recover(p, q, at, gen)
        real = first_rejection(passes)
        # the block's verdict is decided on the device and read back once
        out = torch.cat([passes.long(), real, after(real.clamp_max(len(p) - 1))]).tolist()
        decide = bool if self.trace is None else self.trace.decide
        n = next((i for i, ok in enumerate(out[:k]) if not decide(bool(ok))), k)
        if n == len(p):  # all passed, no bonus row: nothing is committed after them
            return Verdict(n, None)
        if n != out[k]:  # a replay decided otherwise: the token after its n
            return Verdict(n, int(after(torch.tensor([n], device=p.device))[0]))
        return Verdict(n, out[k + 1])
