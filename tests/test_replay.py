"""Trace replay (``cospec.replay``): a recorded run replayed on the same models is that run."""

import pytest
import torch

from cospec.acceptance import ArbiterRule, ExactRule
from cospec.arbiter import ConfidencePolicy
from cospec.decoding import generate
from cospec.errors import CospecError
from cospec.replay import Recording, ReplayRule
from cospec.stats import DecodeStats


def prompt(seed: int) -> list[int]:
    return torch.randint(2, 96, (7,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("lossy", [False, True])
def test_replay_reproduces_the_recorded_run(target, draft, lossy):
    """Replaying the accepted counts gives the same steps (same drafted count per step, same
    lookahead: every forward has its recorded shape); for exact greedy also the same tokens
    (a lossy run may commit the draft's lookahead token, which a replay does not)."""
    for seed in range(4):
        rule = (ArbiterRule(ConfidencePolicy(0.3), threshold=0.5) if lossy else ExactRule())
        rec, s1 = Recording(rule), DecodeStats()
        ids = [t.id for t in generate(target, draft, prompt(seed), rec, k=3,
                                      max_new_tokens=20, stats=s1)]
        assert len(rec.trace) == s1.steps
        replay, s2 = ReplayRule(rec.trace, lookahead=rule.lookahead), DecodeStats()
        again = [t.id for t in generate(target, draft, prompt(seed), replay, k=3,
                                        max_new_tokens=len(ids), stats=s2)]
        assert len(again) == len(ids)
        if not lossy:
            assert again == ids
        assert (s2.steps, s2.drafted, s2.accepted_at) == (s1.steps, s1.drafted, s1.accepted_at)


def test_replay_runs_out_of_trace_clearly(target, draft):
    with pytest.raises(CospecError, match="trace has 1 steps"):
        list(generate(target, draft, prompt(0), ReplayRule([0]), k=3, max_new_tokens=10))
