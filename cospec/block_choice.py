"""What a device-side block (``fast_block.ruled_block``) commits at a position from both
models' logits rows there, for the greedy methods whose token depends on the draft's row as
well as the target's:

- ``ArbiterChoice``: CoSpec (and the confidence / entropy heuristics). Where the draft's
  token d differs from the target's argmax t, the policy's P(DRAFT) against the threshold
  keeps d or takes t; the features and the policy are ``cospec.arbiter``'s, in torch.
- ``CombinationChoice``: CoS at T = 0, the argmax of the combination r of the two models
  (weighted ensemble or contrastive decoding), ``cos.Combination.probs``.

A choice maps (target rows [n, V], draft rows [n, V], the draft's tokens d [n], positions
[n]: tokens generated before each row) to the committed token at each row [n], all on the
device, in static shapes (inside a CUDA graph); d is kept at a row iff the choice equals it.
Both decide a position from its own rows only, never from where it falls in a block, as
their host loops do (``arbiter.ArbiterRule``, ``cos.Collaboration``): so any block
structure commits the same tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable

import torch

from cospec.arbiter import ArbiterRule, MismatchPolicy, _combine, _policy_key, _row_stats
from cospec.cos import Combination
from cospec.sampling import GREEDY

Choice = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ArbiterChoice:
    """CoSpec at every row at once: d where it equals the target's argmax t or the policy's
    P(DRAFT) is at least ``threshold``, else t (``ArbiterRule`` with every mismatch asked and
    no budget). The policy runs on a copy on ``device``."""

    def __init__(self, policy: MismatchPolicy, threshold: float, device: torch.device):
        self.threshold = threshold
        self.key: Hashable = ("arbiter", _policy_key(policy), threshold)
        self.policy = (copy.deepcopy(policy).to(device) if isinstance(policy, torch.nn.Module)
                       else policy)

    def __call__(self, target: torch.Tensor, draft: torch.Tensor, d: torch.Tensor,
                 position: torch.Tensor) -> torch.Tensor:
        t = target.argmax(-1)                                              # [n]
        ids = torch.stack([t, d], -1).repeat(2, 1)                         # [2n, 2]
        row = _row_stats(torch.cat([target.float(), draft.float()]), ids)  # [2n, 8]
        prob = self.policy.draft_prob(_combine(row, len(d), position.float(), torch))
        return torch.where((d == t) | (prob >= self.threshold), d, t)


class CombinationChoice:
    """CoS at T = 0: argmax r of the draft's and the target's rows (draft first, as
    ``Combination`` lists its models)."""

    def __init__(self, combo: Combination):
        self.combo = combo
        self.key: Hashable = ("combination", combo)

    def __call__(self, target: torch.Tensor, draft: torch.Tensor, d: torch.Tensor,
                 position: torch.Tensor) -> torch.Tensor:
        return self.combo.probs([draft, target], GREEDY).argmax(-1)


def arbiter_choice(rule: ArbiterRule, device: torch.device) -> ArbiterChoice | None:
    """The rule's choice on the device, or None where it does not fit one (a policy of
    hidden states, first-mismatch-only, an override budget: those stay in the host loop)."""
    if rule.needs_hidden or not rule.every_mismatch or rule.max_overrides is not None:
        return None
    return ArbiterChoice(rule.policy, rule.threshold, device)
