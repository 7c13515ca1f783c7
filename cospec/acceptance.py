"""Acceptance rules: (draft tokens, draft logits, verifier logits) -> (accepted, next token).

Terminology: the verifier scores k drafted tokens d_1..d_k and produces k + 1 rows of logits;
row i is its distribution for the token at d_{i+1}'s position, row k is the *bonus* row.
A rule keeps a prefix d_1..d_n (``accepted`` = n) and commits one more token: *recovered*
at a rejection, or the *bonus* when all k are kept.

Exact rules reproduce the verifier (greedy output, or sampling distribution). Lossy rules
(an arbiter that may keep a draft token the verifier disagrees with) set ``lossy = True``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
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
    # the draft's next step, given the verifier's bonus token (set by the loop)
    draft_more: Callable[[int], Proposal] | None = None
    # (bonus, logits [1, V], hidden [1, d] | None): the draft's row after the verifier's
    # bonus token, computed with the lookahead; the loop starts the next block with it
    ahead: tuple | None = None

    def fetch_lookahead(self, bonus: int) -> int | None:
        """The draft's token at the bonus position, where the verifier's is ``bonus``;
        drafted on demand (once), by the draft's catch-up on [d_k, bonus] that its next step
        needs anyway: no extra pass when the verifier's token is committed, nothing in blocks
        that end before the bonus. None if the loop cannot draft one."""
        if self.lookahead is None and self.draft_more is not None:
            more = self.draft_more(bonus)
            self.lookahead = more.tokens[0]
            self.lookahead_logits, self.lookahead_hidden = more.draft_logits, more.draft_hidden
            self.ahead = more.ahead
        return self.lookahead


@dataclass
class Verdict:
    accepted: int                 # n: d_1..d_n are committed
    next_token: int               # recovered or bonus token, committed after them
    arbiter_calls: int = 0
    overrides: int = 0            # mismatches where the draft token was kept
    arbiter_s: float = 0.0
    next_from_draft: bool = False  # the token after the accepted ones is the draft's


class AcceptanceRule(Protocol):
    lossy: bool
    needs_hidden: bool
    lookahead: bool  # wants the draft's token at the bonus position too

    def __call__(self, prop: Proposal, sampling: SamplingConfig,
                 gen: torch.Generator | None) -> Verdict: ...


@dataclass
class ExactRule:
    """Plain speculative decoding: greedy match at T = 0, rejection sampling at T > 0.

    Rejection sampling (Leviathan et al. / Chen et al.): accept d_i with probability
    min(1, p_i(d_i) / q_i(d_i)); at the first rejection resample from norm(max(0, p_i - q_i));
    if all pass, sample the bonus from p_k. The committed tokens are distributed exactly as
    sampling from the (processed) verifier distribution p. Every position is tested at once
    on the device (``sampling.rejection_test``); the verdict costs one host sync per block.
    """

    lossy: bool = False
    needs_hidden: bool = False
    lookahead: bool = False

    def __call__(self, prop, sampling, gen):
        k = len(prop.tokens)
        device = prop.target_logits.device
        tokens = torch.tensor(prop.tokens, dtype=torch.long, device=device)
        if sampling.greedy:
            best = prop.target_logits.argmax(-1)                # [k + 1]
            n = first_rejection(tokens == best[:k])
            nxt = best.index_select(0, n)
        else:
            p = probabilities(prop.target_logits, sampling)     # [k + 1, V]
            q = probabilities(prop.draft_logits, sampling) if k else p[:0]
            n = first_rejection(rejection_test(p, q, tokens, gen))
            nxt = recover(p, q, n, gen)
        # the block's verdict is decided on the device and read back once
        n, nxt = torch.cat([n, nxt]).tolist()
        return Verdict(n, nxt)


class MismatchPolicy(Protocol):
    """Decides, at a draft/target mismatch, how likely keeping the draft token is right."""

    needs_hidden: bool

    def draft_prob(self, features: torch.Tensor, target_hidden: torch.Tensor | None,
                   draft_hidden: torch.Tensor | None) -> torch.Tensor:
        """features [B, F] -> probability of DRAFT [B]."""
        ...


@dataclass
class ArbiterRule:
    """CoSpec (greedy): at a mismatch d_i != t_i ask a policy; DRAFT keeps d_i and goes on
    checking d_{i+1} against t_{i+1} (already computed, conditioned on d_i: no extra pass);
    TARGET commits t_i and ends the block, as plain SPD does. Lossy by design.

    The bonus position is arbitrated like every other: when the scan reaches it, the draft
    drafts its *lookahead* token there (``Proposal.fetch_lookahead``: the draft's catch-up on
    [d_k, bonus] done one step early, and only in blocks that get that far). Every committed
    position then gets the same decision whatever the block structure, which is what makes
    batched lockstep decoding equal to this loop.
    """

    policy: MismatchPolicy
    threshold: float = 0.5
    every_mismatch: bool = True   # False: only the first mismatch of a block is arbitrated
    max_overrides: int | None = None  # draft tokens kept per generation at most (None: any)
    # on CUDA, each decision as one replayed graph (policies without hidden states)
    graphed: bool = True
    lossy: bool = True
    lookahead: bool = True
    needs_hidden: bool = field(init=False)
    _graph: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.needs_hidden = self.policy.needs_hidden

    def _keep_draft(self, prop: Proposal, i: int, t: int) -> bool:
        """DRAFT (True) or TARGET at the mismatch in row i (the bonus row when i = k), from
        the two rows' features. On CUDA, for a policy without hidden states, the whole
        decision is one replayed graph (``arbiter.GraphedDecision``); else the features are
        read back (one copy) and the policy runs on the host. Computed only when a mismatch
        is met: a pass over every row of every block, read back with the argmaxes, cost
        more on the GPU (0.85 ms a step against 0.8 ms a decision at 0.36 decisions a step;
        results/gpu/speed-cospec-graphed-h100)."""
        from cospec.arbiter import GraphedDecision, mismatch_features

        bonus = i == len(prop.tokens)
        d = prop.lookahead if bonus else prop.tokens[i]
        t_logits = prop.target_logits[i:i + 1]
        d_logits = prop.lookahead_logits if bonus else prop.draft_logits[i:i + 1]
        if (self.graphed and t_logits.is_cuda and not self.needs_hidden
                and os.environ.get("COSPEC_EAGER") != "1"):
            device, vocab = t_logits.device, t_logits.shape[-1]
            if self._graph is None or not self._graph.fits(self.policy, device, vocab):
                try:
                    self._graph = GraphedDecision(self.policy, device, vocab)
                except (RuntimeError, TypeError, ValueError) as err:  # host-only policy
                    warnings.warn(f"{type(self.policy).__name__} cannot run inside a CUDA "
                                  f"graph ({err}); its decisions run on the host",
                                  stacklevel=2)
                    self.graphed = False
                    return self._keep_draft(prop, i, t)
            prob = self._graph(t_logits, d_logits, t, d, prop.position + i)
            return prob >= self.threshold
        feats = mismatch_features(t_logits, d_logits, [t], [d], [prop.position + i])
        t_hid = d_hid = None
        if self.needs_hidden:
            t_hid = prop.target_hidden[i:i + 1]
            d_hid = prop.lookahead_hidden if bonus else prop.draft_hidden[i:i + 1]
        return float(self.policy.draft_prob(feats, t_hid, d_hid)[0]) >= self.threshold

    def __call__(self, prop, sampling, gen):
        k = len(prop.tokens)
        best, spent = prop.target_logits.argmax(-1).tolist(), 0.0
        budget = (None if self.max_overrides is None
                  else self.max_overrides - prop.overrides_so_far)
        calls = overrides = 0
        for i in range(k + 1):
            may_arbitrate = ((self.every_mismatch or not calls)
                             and (budget is None or overrides < budget))
            if i == k:  # the bonus position: the draft's opinion is drafted only if needed
                if not may_arbitrate or prop.fetch_lookahead(best[k]) in (None, best[k]):
                    break
            elif prop.tokens[i] == best[i]:
                continue
            if not may_arbitrate:
                return Verdict(i, best[i], calls, overrides, spent)
            t0 = time.perf_counter()
            keep = self._keep_draft(prop, i, best[i])
            spent += time.perf_counter() - t0
            calls += 1
            if not keep:
                return Verdict(i, best[i], calls, overrides, spent)
            overrides += 1
            if i == k:
                return Verdict(k, prop.lookahead, calls, overrides, spent,
                               next_from_draft=True)
        return Verdict(k, best[k], calls, overrides, spent)
