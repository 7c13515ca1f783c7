"""CoS: exact speculative decoding of a *combination* of models (ICML 2025, 2502.01662).

Collaborative decoding samples each token from a combination r of several models:

- weighted ensemble (WE): r = sum_i lambda_i p_i, on (temperature-scaled) probabilities;
- contrastive decoding (CD): r = softmax((l_large - mu * l_small) / T), on logits.

Run naively (``we`` / ``cd``) every token costs a forward pass of every model. With
speculation the first model (the *proposer*, the smallest) drafts gamma tokens from its own
distribution q; every other model scores them in one pass; d_i is accepted with
probability min(1, r_i(d_i) / q_i(d_i)), else a token is drawn from norm(max(0, r_i - q_i)).
That is exact sampling from r (rejection sampling with q as the proposal).

- ``*-sd``: when all drafts pass, the bonus token needs r at the next position, hence the
  proposer's distribution there: the proposer runs one more (lookahead) step.
- ``cos-*`` (**alternate proposal**): when all drafts pass, the last verifier's own bonus
  token x ~ p is not committed but *proposed*; the proposer scores it in its next pass —
  the pass it needs anyway to draft again — and x is accepted with probability
  min(1, r(x) / p(x)), else replaced by a draw from norm(max(0, r - p)). The verifiers
  already computed their rows at x's position, so nothing is scored twice.

At T = 0 every "accept with probability" becomes "accept iff the token is argmax r", and
every resample becomes argmax r: the output equals greedy collaborative decoding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from cospec.acceptance import ExactRule, Proposal, Verdict
from cospec.decoding import CachedLM, Row, Token, cached_lm, decode, propose
from cospec.errors import CospecError
from cospec.replay import CosTrace
from cospec.sampling import GREEDY, SamplingConfig, probabilities
from cospec.stats import DecodeStats

COS_METHODS = ("we", "cd", "we-sd", "cd-sd", "cos-we", "cos-cd")
# contrastive decoding's mu at most: mu times a model's logits must stay a float32 (far larger
# values leave r to the amateur's logits alone)
MU_MAX = 100.0


@dataclass(frozen=True)
class Combination:
    """How r combines the models' logits, listed proposer (smallest) first.

    ``kind="we"``: weights (one per model, finite, >= 0, summing to 1). ``kind="cd"``: exactly
    two models, r from l_large - mu * l_small (the proposer is the "amateur"), 0 <= mu <=
    ``MU_MAX``.
    """

    kind: str
    weights: tuple[float, ...] = ()
    mu: float = 0.1

    def __post_init__(self):
        if self.kind not in ("we", "cd"):
            raise CospecError(f"unknown combination {self.kind!r} (we or cd)")
        if self.kind == "we" and not (all(math.isfinite(w) and w >= 0 for w in self.weights)
                                      and abs(sum(self.weights) - 1) <= 1e-6):
            raise CospecError(f"ensemble weights must be >= 0 and sum to 1: {self.weights}")
        if self.kind == "cd" and not 0 <= self.mu <= MU_MAX:  # nan fails too
            raise CospecError(f"contrastive mu must be in [0, {MU_MAX:g}], got {self.mu}")

    def probs(self, logits: list[torch.Tensor], cfg: SamplingConfig) -> torch.Tensor:
        """r [..., V] from per-model logits [..., V] (proposer first). Greedy configs give
        the one-hot of argmax r; otherwise top-k / top-p are applied to r itself."""
        if self.kind == "cd":
            if len(logits) != 2:
                raise CospecError("contrastive decoding combines exactly two models")
            return probabilities(logits[1].float() - self.mu * logits[0].float(), cfg)
        if len(logits) != len(self.weights):
            raise CospecError(f"{len(logits)} models but {len(self.weights)} weights")
        temp = 1.0 if cfg.greedy else cfg.temperature
        r = sum(w * (lg.float() / temp).softmax(-1) for w, lg in zip(self.weights, logits))
        if cfg.greedy:
            return torch.nn.functional.one_hot(r.argmax(-1), r.shape[-1]).float()
        if cfg.top_k or cfg.top_p < 1.0:  # filter r with the same rules, via log r
            return probabilities(r.clamp_min(1e-30).log(), SamplingConfig(1.0, cfg.top_p,
                                                                           cfg.top_k))
        return r


class Collaboration:
    """The models of a CoS method with their KV caches, the proposer (the smallest) first:
    what each step of ``decoding.decode`` proposes, r at the proposed positions, and who
    proposes next. Every step's tokens are tested by ``ExactRule`` against r.

    - ``we`` / ``cd``: nothing is drafted; every model scores the next position (the bonus).
    - ``*-sd``: the proposer drafts n tokens and its row at the bonus position; the others
      score the drafts in one pass; r has a row at every position, the bonus's included.
    - ``cos-*``: as ``-sd`` without the proposer's bonus row: the bonus is drawn from the last
      verifier's own p, and when all n drafts pass it is not committed but *proposed* (an
      ``alternate`` proposal, drawn from p); the proposer scores it in the pass it needs
      anyway, and the verifiers' rows at its position are already known.
    With no room left to speculate (n = 0) every method takes a ``we`` / ``cd`` step.
    """

    def __init__(self, models: list[torch.nn.Module], combo: Combination, method: str):
        self.models, self.combo = models, combo
        self.speculative = method != combo.kind
        self.alternate = method.startswith("cos-")
        self.lms: list[CachedLM] = []
        self.first: Row | None = None  # the proposer's row after seq, when already computed
        self.after: Row | None = None  # the proposer's row after an alternate proposal
        self.rows: list[torch.Tensor] = []  # the verifiers' rows [1, V] at the bonus position
        # (token, p [1, V]): the last verifier's bonus, proposed at the next step
        self.pending: tuple[list[int], torch.Tensor] | None = None

    def start(self, room: int) -> list[CachedLM]:
        self.lms = [cached_lm(m, False, room) for m in self.models]
        return self.lms

    def propose(self, seq: list[int], n: int, sampling: SamplingConfig,
                gen: torch.Generator | None) -> Proposal:
        if self.pending is not None:  # roles alternate: the verifier's bonus is proposed
            return Proposal(self.pending[0], draft_probs=self.pending[1], alternate=True)
        n = n if self.speculative else 0
        first, self.first = self.first, None
        return propose(self.lms[0], seq, n, sampling, gen, first,
                       extra=n == 0 or not self.alternate)  # the proposer's bonus row

    def score(self, seq: list[int], prop: Proposal, sampling: SamplingConfig) -> None:
        """r at each proposed position (``prop.target_probs``), and at the bonus position
        where the proposer's row there is known; else the last verifier's p there."""
        proposer, verifiers = self.lms[0], self.lms[1:]
        if prop.alternate:  # the proposer's pass: its row at the token, and after it
            two = proposer.forward(seq[proposer.length:] + prop.tokens, keep=2)[0]
            prop.target_probs = self.combo.probs([two[:1], *self.rows], sampling)
            self.after = (two[1:], None)
            return
        n = len(prop.tokens)
        rows = [v.forward(seq[v.length:] + prop.tokens, keep=n + 1)[0] for v in verifiers]
        own = torch.cat([r for r in (prop.draft_logits, prop.lookahead_logits) if r is not None])
        r = self.combo.probs([own, *(v[:len(own)] for v in rows)], sampling)  # [n (+ 1), V]
        if len(own) == n:  # no proposer row at the bonus position: the last verifier's p
            r = torch.cat([r, probabilities(rows[-1][n:], sampling)])
        prop.target_probs, self.rows = r, [v[n:] for v in rows]

    def lookahead(self, seq: list[int], prop: Proposal, verdict: Verdict,
                  sampling: SamplingConfig, gen: torch.Generator | None) -> Proposal:
        raise CospecError("CoS tests against r and asks for no lookahead")

    def commit(self, seq: list[int], prop: Proposal, verdict: Verdict) -> list[int]:
        n, kept, nxt = len(prop.tokens), verdict.accepted, verdict.next_token
        for lm in self.lms:
            lm.crop(min(lm.length, len(seq) + kept))
        self.pending = None
        if prop.alternate:
            self.first = self.after if kept else None
        elif kept == n and prop.lookahead_logits is None:  # the bonus is the verifier's own:
            self.pending = ([nxt], prop.target_probs[n:])  # it proposes it next
            return prop.tokens
        return prop.tokens[:kept] + ([] if nxt is None else [nxt])


def cos_generate(models: list[torch.nn.Module], prompt_ids: list[int], combo: Combination,
                 method: str, *, gamma: int = 5, max_new_tokens: int = 128,
                 sampling: SamplingConfig = GREEDY, eos_ids: Iterable[int] = (),
                 seed: int | None = None, stats: DecodeStats | None = None,
                 trace: CosTrace | None = None) -> Iterator[Token]:
    """Yield tokens sampled (exactly) from the combination r of ``models``, by the loop of
    ``cospec.decoding.decode``.

    ``models[0]`` proposes (``*-sd``, ``cos-*``); ``method`` in COS_METHODS.
    ``stats.steps`` counts passes of the verifiers; ``accepted`` counts committed proposals
    (an alternate proposal counts as drafted, its pass as none).
    ``trace`` records (or replays) every accept/reject outcome (``cospec.replay``).
    """
    if method not in COS_METHODS:
        raise CospecError(f"unknown combination method {method!r}; choose from "
                          f"{', '.join(COS_METHODS)}")
    if gamma < 1:
        raise CospecError(f"gamma must be >= 1, got {gamma}")
    return decode(Collaboration(models, combo, method), prompt_ids, ExactRule(trace=trace),
                  k=gamma, max_new_tokens=max_new_tokens, sampling=sampling,
                  eos_ids=eos_ids, seed=seed, stats=stats)
