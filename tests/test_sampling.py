"""Rejection sampling is exact in distribution (statistical tests, fixed seeds)."""

import pytest
import torch
from scipy.stats import chisquare

from cospec.acceptance import ExactRule, Proposal
from cospec.decoding import generate
from cospec.sampling import SamplingConfig, probabilities, residual

T1 = SamplingConfig(temperature=1.0)


def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


def tv_noise(p: torch.Tensor, n: int, draws: int = 200) -> float:
    """The largest TV of ``draws`` exact multinomial samples of size n: sampling noise."""
    g = torch.Generator().manual_seed(123)
    return max(tv(torch.bincount(torch.multinomial(p, n, replacement=True, generator=g),
                                 minlength=len(p)).float(), p) for _ in range(draws))


def first_token_counts(p_logits, q_logits, n, seed=0):
    """Counts of the first committed token of one k=1 step with d ~ q."""
    gen = torch.Generator().manual_seed(seed)
    q = probabilities(q_logits, T1)
    counts = torch.zeros(p_logits.shape[-1])
    rule = ExactRule()
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=gen))
        prop = Proposal(tokens=[d], draft_logits=q_logits[None],
                        target_logits=torch.stack([p_logits, p_logits]))
        v = rule(prop, T1, gen)
        counts[d if v.accepted else v.next_token] += 1
    return counts


def test_rejection_sampling_reproduces_target_on_toy_vocabulary():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(8, generator=g) * 2, torch.randn(8, generator=g) * 2
    p = probabilities(p_logits, T1)
    small, large = first_token_counts(p_logits, q_logits, 500), first_token_counts(
        p_logits, q_logits, 40000, seed=1)
    assert tv(large, p) < 0.015
    assert tv(large, p) < tv(small, p)  # shrinks with samples
    assert chisquare(large, p * large.sum()).pvalue > 1e-3
    # and it really is p, not q: the proposal alone is far away
    assert tv(large, probabilities(q_logits, T1)) > 0.1


def test_residual_is_normalised_and_zero_where_q_dominates():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    r = residual(p, q)
    assert torch.allclose(r, torch.tensor([1.0, 0.0, 0.0]))


def test_top_p_and_top_k_keep_the_head():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.8))
    assert (p[3:] == 0).all() and abs(p.sum().item() - 1) < 1e-6 and p[0] > p[1] > 0
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert (p[2:] == 0).all() and abs(p.sum().item() - 1) < 1e-6


@pytest.mark.parametrize("cfg", [SamplingConfig(1.0, 0.9), SamplingConfig(0.7, 1.0, 20)])
def test_spd_sampling_matches_target_distribution(target, draft, cfg):
    """First and second generated tokens of sampled SPD (k=2) follow the target's exact
    marginals (the second computed by enumerating the first)."""
    ids = [5, 17, 33, 8]
    with torch.inference_mode():
        p1 = probabilities(target(torch.tensor([ids])).logits[0, -1], cfg)
        support = p1.nonzero().flatten().tolist()
        batch = torch.tensor([ids + [t] for t in support])
        p2_given = probabilities(target(batch).logits[:, -1], cfg)
        p2 = (p1[support, None] * p2_given).sum(0)
    n = 1500
    c1, c2 = torch.zeros_like(p1), torch.zeros_like(p1)
    for seed in range(n):
        toks = [t.id for t in generate(target, draft, ids, ExactRule(), k=2, max_new_tokens=2,
                                       sampling=cfg, seed=seed)]
        c1[toks[0]] += 1
        c2[toks[1]] += 1
    for counts, p in ((c1, p1), (c2, p2)):
        keep = p > 0
        assert counts[~keep].sum() == 0  # never a token outside top-p / top-k
        assert tv(counts, p) < 1.2 * tv_noise(p, n)
        # pool rare tokens so the chi-square approximation holds
        big = p * n >= 5
        obs = torch.cat([counts[big], counts[keep & ~big].sum()[None]])
        exp = torch.cat([p[big], p[keep & ~big].sum()[None]]) * n
        if exp[-1] == 0:
            obs, exp = obs[:-1], exp[:-1]
        assert chisquare(obs, exp).pvalue > 1e-3
