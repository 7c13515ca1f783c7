"""What a device-side block (``device_blocks.ruled_block``) commits at a position from both
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
import warnings
from collections.abc import Callable, Hashable

import torch

from cospec import fast
from cospec.arbiter import ArbiterRule, MismatchPolicy, _policy_key, device_features
from cospec.cos import Combination
from cospec.sampling import GREEDY

Choice = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _Compiled:
    """A choice whose call is compiled (``torch.compile``) on CUDA unless COSPEC_COMPILE=0,
    as the fast path's layers are: eager, a choice is a few dozen small kernels over the
    vocabulary, launch-bound inside the block's graph (7-9 % of a block on an H100 when it
    ran twice a block, results/gpu/h100/ruled-block-cost); compiled, they fuse. It is traced
    on the block's first runs, before the block's graph is captured. A compile that fails
    falls back to the eager call, with a warning."""

    def __init__(self, device: torch.device):
        self._run = self._choose
        if fast.compiles(device):
            self._run = torch.compile(self._choose, dynamic=False)

    def __call__(self, target: torch.Tensor, draft: torch.Tensor, d: torch.Tensor,
                 position: torch.Tensor) -> torch.Tensor:
        try:
            return self._run(target, draft, d, position)
        except Exception as err:  # a compiler failure; the eager call raises a real error
            if self._run == self._choose:
                raise
            warnings.warn(f"{type(self).__name__}: compiling failed ({type(err).__name__}: "
                          f"{err}); it runs eagerly", stacklevel=2)
            self._run = self._choose
            return self._choose(target, draft, d, position)

    def _choose(self, target: torch.Tensor, draft: torch.Tensor, d: torch.Tensor,
                position: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ArbiterChoice(_Compiled):
    """CoSpec at every row at once: d where it equals the target's argmax t or the policy's
    P(DRAFT) is at least ``threshold``, else t (``ArbiterRule`` with every mismatch asked and
    no budget). The policy runs on a copy on ``device``."""

    def __init__(self, policy: MismatchPolicy, threshold: float, device: torch.device):
        self.threshold = threshold
        self.key: Hashable = ("arbiter", _policy_key(policy), threshold)
        self.policy = (copy.deepcopy(policy).to(device) if isinstance(policy, torch.nn.Module)
                       else policy)
        super().__init__(device)

    def _choose(self, target: torch.Tensor, draft: torch.Tensor, d: torch.Tensor,
                position: torch.Tensor) -> torch.Tensor:
        t = target.argmax(-1)                                              # [n]
        prob = self.policy.draft_prob(device_features(target, draft, t, d, position))
        return torch.where((d == t) | (prob >= self.threshold), d, t)


class CombinationChoice(_Compiled):
    """CoS at T = 0: argmax r of the draft's and the target's rows (draft first, as
    ``Combination`` lists its models)."""

    def __init__(self, combo: Combination, device: torch.device):
        self.combo = combo
        self.key: Hashable = ("combination", combo)
        super().__init__(device)

    def _choose(self, target: torch.Tensor, draft: torch.Tensor, d: torch.Tensor,
                position: torch.Tensor) -> torch.Tensor:
        return self.combo.probs([draft, target], GREEDY).argmax(-1)


# (kind, key, device) -> (what the choice was made of, the choice): one object a policy (or
# combination) and device, so that its compiled call is traced once, not at every
# generation. Holding the policy keeps its id, part of the key, from being reused.
_MADE: dict[tuple, tuple[object, _Compiled]] = {}


def expresses(rule: ArbiterRule) -> bool:
    """Does an ``ArbiterChoice`` decide as ``rule`` does? Not for a policy of hidden states,
    first-mismatch-only or an override budget: those stay in the host loop."""
    return not (rule.needs_hidden or not rule.every_mismatch or rule.max_overrides is not None)


def arbiter_choice(rule: ArbiterRule, device: torch.device) -> ArbiterChoice | None:
    """The rule's choice on the device (made once for the policy, threshold and device), or
    None where it does not express the rule (``expresses``)."""
    if not expresses(rule):
        return None
    key = ("arbiter", _policy_key(rule.policy), rule.threshold, device)
    if key not in _MADE:
        _MADE[key] = rule.policy, ArbiterChoice(rule.policy, rule.threshold, device)
    return _MADE[key][1]


def combination_choice(combo: Combination, device: torch.device) -> CombinationChoice:
    """``CombinationChoice`` of ``combo`` on ``device``, made once for them."""
    key = ("combination", combo, device)
    if key not in _MADE:
        _MADE[key] = combo, CombinationChoice(combo, device)
    return _MADE[key][1]
