"""Trace replay (``cospec.replay``): a recorded run replayed on the same models is that run;
on other models it has the recorded shapes."""

import pytest
import torch
from tiny import tiny_model

from cospec.acceptance import ExactRule
from cospec.arbiter import ArbiterRule, ConfidencePolicy
from cospec.cos import Combination, cos_generate
from cospec.decoding import generate
from cospec.errors import CospecError
from cospec.replay import CosTrace, Recording, ReplayRule
from cospec.sampling import SamplingConfig
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


@pytest.mark.parametrize("method, temperature", [  # greedy CD: tiny models never agree
    ("we-sd", 0.0), ("cos-we", 0.0), ("we-sd", 1.0), ("cos-we", 1.0), ("cos-cd", 1.0)])
def test_cos_replay_has_the_recorded_shapes(target, draft, method, temperature):
    """CoS outcomes replayed: on the same models (and seed) the recorded run itself; on
    another verifier, which would decide otherwise, the same steps and the same drafted and
    accepted counts per step, so every forward has its recorded shape."""
    combo = Combination("cd") if method.endswith("cd") else Combination("we", (0.5, 0.5))
    cfg = SamplingConfig(temperature=temperature)
    other = tiny_model(7)
    outcomes, differs = set(), False

    def run(verifier, seed, trace, n=24):
        stats = DecodeStats()
        ids = [t.id for t in cos_generate([draft, verifier], prompt(seed), combo, method,
                                          gamma=3, max_new_tokens=n, sampling=cfg,
                                          seed=seed, stats=stats, trace=trace)]
        return ids, (stats.steps, stats.drafted, stats.accepted, stats.accepted_at)

    for seed in range(3):
        rec = CosTrace()
        ids, shape = run(target, seed, rec)
        outcomes |= set(rec.outcomes)
        assert run(target, seed, CosTrace(rec.outcomes, replay=True), len(ids)) == (ids, shape)
        assert run(other, seed, CosTrace(rec.outcomes, replay=True), len(ids))[1] == shape
        differs |= run(other, seed, None, len(ids))[1] != shape
    assert outcomes == {True, False}  # both kinds of decision were replayed
    assert differs  # and without the replay the other verifier would have decided otherwise
