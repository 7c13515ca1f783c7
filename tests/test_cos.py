"""CoS: speculative decoding of model combinations is exact (greedy and sampled)."""

import pytest
import torch
from test_sampling import tv, tv_noise
from tiny import tiny_model

from cospec.cos import Combination, cos_generate
from cospec.errors import CospecError
from cospec.sampling import GREEDY, SamplingConfig
from cospec.stats import DecodeStats

WE = Combination("we", (0.5, 0.5))
CD = Combination("cd", mu=0.1)


@pytest.fixture(scope="module")
def third():
    return tiny_model(4, layers=1)


def run(models, combo, method, ids, gamma=3, n=30, cfg=GREEDY, seed=None,
        stats=None):
    return [t.id for t in cos_generate(models, ids, combo, method, gamma=gamma,
                                       max_new_tokens=n, sampling=cfg, seed=seed,
                                       stats=stats)]


@pytest.mark.parametrize("combo, base", [(WE, "we"), (CD, "cd")])
@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_speculative_equals_plain_collaborative(target, draft, combo, base, gamma):
    for seed in range(2):
        ids = torch.randint(2, 96, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
        want = run([draft, target], combo, base, ids)
        assert len(want) == 30
        for method in (f"{base}-sd", f"cos-{base}"):
            stats = DecodeStats()
            assert run([draft, target], combo, method, ids, gamma, stats=stats) == want
            if combo.kind == "we":  # random tiny models agree often enough only under WE
                assert stats.steps < 30  # speculation saved verifier passes


def reference_greedy(models, combo, ids, n):
    """Plain greedy decoding of r, written apart from ``cospec``: each token the argmax of
    the combination of every model's last row after an uncached forward of the prefix."""
    out = []
    with torch.inference_mode():
        for _ in range(n):
            rows = [m(torch.tensor([ids + out])).logits[0, -1] for m in models]
            if combo.kind == "cd":
                r = rows[1] - combo.mu * rows[0]
            else:
                r = sum(w * row.softmax(-1) for w, row in zip(combo.weights, rows))
            out.append(int(r.argmax()))
    return out


def first_difference(got, want):
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                None if len(got) == len(want) else min(len(got), len(want)))


@pytest.mark.parametrize("method", ["we", "cd", "we-sd", "cd-sd", "cos-we", "cos-cd"])
@pytest.mark.parametrize("gamma", [1, 2, 4])
@pytest.mark.parametrize("same", [False, True], ids=["random-draft", "draft-is-target"])
def test_greedy_equals_plain_greedy_of_r_token_by_token(target, draft, method, gamma, same):
    """Every method at T = 0 yields the argmax-of-r sequence, token by token: with a random
    draft (little accepted) and with the draft the target itself (r's argmax is then the
    target's, so under both WE and CD every proposal passes); the from_draft flags count the
    accepted proposals; verifier passes and accepted counts are as the schedule says."""
    combo = WE if "we" in method.split("-") else CD
    models = [target, target] if same else [draft, target]
    cos = method.startswith("cos-")
    for seed in range(3):
        ids = torch.randint(2, 96, (4 + seed,),
                            generator=torch.Generator().manual_seed(seed)).tolist()
        want = reference_greedy(models, combo, ids, 24)
        stats = DecodeStats()
        toks = list(cos_generate(models, ids, combo, method, gamma=gamma, max_new_tokens=24,
                                 stats=stats))
        got = [t.id for t in toks]
        assert first_difference(got, want) is None, (seed, got, want)
        assert sum(t.from_draft for t in toks) == stats.accepted <= stats.drafted
        assert stats.generated == 24
        if method in ("we", "cd"):
            assert stats.steps == 24 and stats.drafted == 0
        elif same:  # everything passes: one verifier pass per gamma + 1 tokens; with cos-*
            # the last of them is the verifier's own proposal, accepted by the proposer
            assert stats.steps == -(-24 // (gamma + 1))
            assert stats.accepted == stats.drafted == 24 - (0 if cos else stats.steps)
            assert all(t.from_draft for t in toks) == cos


@pytest.mark.parametrize("method", ["cos-we", "cos-cd", "we-sd"])
def test_from_draft_marks_accepted_proposals_only(target, draft, method):
    """A token is from_draft iff a proposal was accepted for it: a rejected alternate
    proposal (replaced by a recovered token) is not; so the flags count ``accepted``."""
    combo = WE if "we" in method else CD
    rejected = 0
    for seed in range(4):
        ids = torch.randint(2, 96, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
        stats = DecodeStats()
        toks = list(cos_generate([draft, target], ids, combo, method, gamma=3,
                                 max_new_tokens=40, stats=stats))
        assert sum(t.from_draft for t in toks) == stats.accepted
        rejected += stats.drafted - stats.accepted
    assert rejected  # proposals were turned down, so the check had something to see


def test_plain_combination_is_a_real_mixture(target, draft):
    """WE with weight 1 on one model is that model's greedy output; 0.5/0.5 differs."""
    ids = [5, 9, 12]
    only_target = run([draft, target], Combination("we", (0.0, 1.0)), "we", ids)
    greedy = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=30,
                             min_new_tokens=30, pad_token_id=0, eos_token_id=None)
    assert only_target == greedy[0, 3:].tolist()
    assert run([draft, target], WE, "we", ids) != only_target


def test_three_models(target, draft, third):
    combo = Combination("we", (0.2, 0.3, 0.5))
    ids = [7, 3, 40, 2]
    want = run([draft, third, target], combo, "we", ids)
    assert run([draft, third, target], combo, "cos-we", ids, 4) == want
    assert run([draft, third, target], combo, "we-sd", ids, 2) == want


def marginals(draft, target, combo, ids, cfg):
    """Exact distributions of r's first and second tokens after ``ids`` ([V] each)."""
    with torch.inference_mode():
        r1 = combo.probs([m(torch.tensor([ids])).logits[0, -1] for m in (draft, target)], cfg)
        batch = torch.tensor([ids + [t] for t in range(r1.shape[0])])
        nxt = [m(batch).logits[:, -1] for m in (draft, target)]
        return r1, (r1[:, None] * combo.probs(nxt, cfg)).sum(0)


def test_bad_combinations(target, draft):
    with pytest.raises(CospecError):
        Combination("we", (0.7, 0.7))
    with pytest.raises(CospecError):
        run([draft, target], WE, "nope", [3])
    with pytest.raises(CospecError, match="exactly two"):
        run([draft, target, draft], CD, "cd", [3], n=2)


@pytest.mark.parametrize("combo, base", [(WE, "we"), (CD, "cd")])
def test_batched_combination_equals_the_batch1_loop(target, draft, combo, base):
    """Greedy lockstep decoding of r (ragged prompts, left padding) = the batch-1 loop."""
    from cospec.batched import lockstep

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 96, (n,), generator=gen).tolist() for n in (3, 7, 5)]
    res = lockstep(target, draft, prompts, max_new_tokens=20, eos_ids=[], pad_id=0,
                   batch_size=3, combo=combo)
    for p, r in zip(prompts, res):
        assert r.tokens == run([draft, target], combo, base, p, n=20)


def test_batched_sampling_follows_the_combination(target, draft):
    """Batched sampled rows (one prompt repeated) draw their first two tokens from r."""
    from cospec.batched import lockstep

    cfg = SamplingConfig(temperature=1.0)
    ids = [5, 17, 33, 8]
    r1, r2 = marginals(draft, target, WE, ids, cfg)
    n = 1500
    res = lockstep(target, draft, [ids] * n, max_new_tokens=2, eos_ids=[], pad_id=0,
                   batch_size=500, combo=WE, sampling=cfg, seed=1)
    for j, r in enumerate((r1, r2)):
        counts = torch.bincount(torch.tensor([x.tokens[j] for x in res]),
                                minlength=r.shape[0]).double()
        assert tv(counts, r) < 1.2 * tv_noise(r, n)
    with pytest.raises(ValueError):
        lockstep(target, draft, [ids], max_new_tokens=2, eos_ids=[], pad_id=0, record=True,
                 sampling=cfg)
