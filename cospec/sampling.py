"""Turning logits into the distributions that decoding samples from.

Temperature, top-k and top-p are applied the same way to every model, so that speculative
sampling is exact with respect to the *processed* target distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0   # 0: greedy (argmax of the raw logits)
    top_p: float = 1.0
    top_k: int = 0             # 0: off

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


GREEDY = SamplingConfig()


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Processed probabilities, float32, same shape as ``logits`` [..., V].

    Greedy configs give the one-hot of the argmax, so exact rules work unchanged.
    """
    logits = logits.float()
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_on_device(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id [1] from a probability vector [V], left where ``probs`` is."""
    return torch.multinomial(probs, 1, generator=generator)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token id from a probability vector [V]."""
    return int(sample_on_device(probs, generator))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) [V]: where rejection sampling resamples from.

    Falls back to ``p`` when p <= q everywhere (only possible when p == q up to rounding).
    """
    r = (p - q).clamp_min(0.0)
    total = r.sum()
    return r / total if total > 0 else p
