"""Sampling helpers: processed distributions, the residual, sampling-noise yardsticks.

The methods' exactness in distribution is tested in ``test_exactness.py``."""

import torch

from cospec.sampling import SamplingConfig, probabilities, residual


def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


def tv_noise(p: torch.Tensor, n: int, draws: int = 200) -> float:
    """The largest TV of ``draws`` exact multinomial samples of size n: sampling noise."""
    g = torch.Generator().manual_seed(123)
    return max(tv(torch.bincount(torch.multinomial(p, n, replacement=True, generator=g),
                                 minlength=len(p)).float(), p) for _ in range(draws))


def test_residual_is_normalised_and_zero_where_q_dominates():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    r = residual(p, q)
    assert torch.allclose(r, torch.tensor([1.0, 0.0, 0.0]))
    rows = residual(torch.stack([p, p]), torch.stack([q, p]))  # row by row; p == q: p itself
    assert torch.allclose(rows, torch.stack([r, p]))


def test_top_p_and_top_k_keep_the_head():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.8))
    assert (p[3:] == 0).all() and abs(p.sum().item() - 1) < 1e-6 and p[0] > p[1] > 0
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert (p[2:] == 0).all() and abs(p.sum().item() - 1) < 1e-6
