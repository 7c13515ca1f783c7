"""Trace replay: measure the speed of a speculative method on a model we cannot run for real.

No 7B model of the default pair's tokenizer ships here, so its speed is measured on random
weights with the real architecture. Random weights would accept nothing, so the acceptance
decisions are *replayed*: ``Recording`` wraps a rule on the real pair and keeps, per step,
how many draft tokens it accepted; ``ReplayRule`` then drives the same loop
(``cospec.decoding.generate``) with those numbers. Every forward pass (k draft steps, one
verify over k + 1 tokens, the cache rollbacks) has the shape it had in the real run, and the
step still reads the verifier's logits to the host as a real acceptance decision does.

For CoS (``cospec.cos``), whose steps vary in shape, ``CosTrace`` records and replays each
accept/reject outcome instead (the drafted tokens' and the alternate proposals'), through
``acceptance.ExactRule(trace=)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from cospec.acceptance import AcceptanceRule, Proposal, Verdict
from cospec.errors import CospecError
from cospec.sampling import SamplingConfig


@dataclass
class Recording:
    """``rule`` unchanged, plus ``trace``: accepted draft tokens of each step, in order."""

    rule: AcceptanceRule
    trace: list[int] = field(default_factory=list)

    @property
    def lossy(self) -> bool:
        return self.rule.lossy

    @property
    def needs_hidden(self) -> bool:
        return self.rule.needs_hidden

    @property
    def lookahead(self) -> bool:
        return self.rule.lookahead

    def __call__(self, prop: Proposal, sampling: SamplingConfig,
                 gen: torch.Generator | None) -> Verdict:
        verdict = self.rule(prop, sampling, gen)
        self.trace.append(verdict.accepted)
        return verdict

    def at_bonus(self, prop: Proposal, verdict: Verdict) -> Verdict:
        return self.rule.at_bonus(prop, verdict)  # the accepted count stays k


@dataclass
class ReplayRule:
    """Accepts ``trace[i]`` draft tokens at step i, whatever the models say; the next token is
    the verifier's argmax at that position (read to the host, like a real decision).
    ``lookahead``: after a fully accepted block the draft drafts its bonus token, as
    CoSpec's rule does when it reaches the bonus position."""

    trace: list[int]
    lookahead: bool = False
    lossy: bool = True
    needs_hidden: bool = False
    step: int = 0

    def __call__(self, prop: Proposal, sampling: SamplingConfig,
                 gen: torch.Generator | None) -> Verdict:
        if self.step >= len(self.trace):
            raise CospecError(f"the trace has {len(self.trace)} steps; the replay needs more "
                              "(replay with the generated length of the recorded run)")
        n = min(self.trace[self.step], len(prop.tokens))
        self.step += 1
        nxt = int(prop.target_logits[n].argmax())
        return Verdict(n, nxt, wants_lookahead=self.lookahead and n == len(prop.tokens))

    def at_bonus(self, prop: Proposal, verdict: Verdict) -> Verdict:
        """The lookahead was drafted (its cost is the point); the replay keeps the verdict."""
        return replace(verdict, wants_lookahead=False)


@dataclass
class CosTrace:
    """The accept/reject outcomes of a CoS run (``cos_generate(..., trace=)``), in order.

    Recording (``replay=False``): each real outcome is appended to ``outcomes``. Replaying:
    the loop still computes every decision (r, the acceptance test, a resampled token), so
    each step costs what it cost, but takes the recorded outcome instead. Past the end of
    the recording (a replay cut shorter than its run) every proposal is rejected.
    """

    outcomes: list[bool] = field(default_factory=list)
    replay: bool = False
    step: int = 0

    def decide(self, real: bool) -> bool:
        if not self.replay:
            self.outcomes.append(real)
            return real
        self.step += 1
        return self.step <= len(self.outcomes) and self.outcomes[self.step - 1]
