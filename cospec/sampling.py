"""Turning logits into the distributions that decoding samples from.

Temperature, top-k and top-p are applied the same way to every model, so that speculative
sampling is exact with respect to the *processed* target distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# temperatures below this decode greedily, as OpenAI-style servers treat them (vLLM's too):
# dividing logits by one overflows float32 (1e-40: inf - inf = nan), and the distribution is
# the argmax's one-hot but for near-ties
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0   # below GREEDY_BELOW (0 included): greedy (argmax of the logits)
    top_p: float = 1.0
    top_k: int = 0             # 0: off

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


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
        # keep the smallest prefix whose mass reaches top_p; the top token always stays (a
        # top_p below float32's smallest number rounds to 0 there)
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p
        drop[..., 0] = False
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
    """norm(max(0, p - q)) [..., V], row by row: where rejection sampling resamples from.

    A row falls back to ``p`` where p <= q everywhere (only possible when p == q up to
    rounding).
    """
    r = (p - q).clamp_min(0.0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)


def rejection_test(target: torch.Tensor, proposal: torch.Tensor, tokens: torch.Tensor,
                   gen: torch.Generator | None) -> torch.Tensor:
    """Each of k proposed tokens' own acceptance test, all at once on the device.

    ``tokens`` [k] were drawn from ``proposal`` [k, V]; ``target`` [m, V] (m >= k) is the
    distribution wanted at each position. Returns [k] bool: u_i < target_i(d_i) /
    proposal_i(d_i), one uniform u_i each (compared without dividing: a token of proposal
    probability 0 is never drawn). A block keeps its tokens up to ``first_rejection``.
    """
    k = len(tokens)
    u = torch.rand(k, generator=gen, device=target.device, dtype=target.dtype)
    idx = tokens.view(k, 1)
    return u * proposal.gather(-1, idx)[:, 0] < target[:k].gather(-1, idx)[:, 0]


def first_rejection(accepted: torch.Tensor) -> torch.Tensor:
    """Index [1] of the first False in ``accepted`` [k] (k when all pass), on the device."""
    stop = torch.cat([~accepted, accepted.new_ones(1)])
    return stop.int().argmax().view(1)


def recovery(target: torch.Tensor, proposal: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The distribution [1, V] of the token committed at row ``at`` [1] (a device index, no
    sync) after the tokens before it passed: norm(max(0, target - proposal)) in that row
    where a proposed token was rejected (at < k = len(proposal)), ``target`` itself past the
    proposals (the bonus)."""
    k = len(proposal)
    t = target.index_select(0, at)  # [1, V]
    if k:  # past the proposals (the bonus) the proposal row is zero: residual(t, 0) = t
        t = residual(t, proposal.index_select(0, at.clamp_max(k - 1)) * (at < k).view(1, 1))
    return t


def recover(target: torch.Tensor, proposal: torch.Tensor, at: torch.Tensor,
            gen: torch.Generator | None) -> torch.Tensor:
    """The token [1] committed at row ``at`` [1], drawn from ``recovery``. The draw is
    independent of the uniforms that chose ``at``, so the committed tokens follow
    ``target`` exactly."""
    return torch.multinomial(recovery(target, proposal, at), 1, generator=gen)[0]


def draw(probs: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """One token a row [n] from probability rows [n, V], by an exponential race: the
    argmax of p_i / E_i with E_i ~ Exp(1) independent is i with probability p_i. Kernels
    only (exponentials, a division, an argmax), no host read, so a CUDA graph may hold it
    (its draws then come from the default generator, ``gen`` None)."""
    race = torch.empty_like(probs).exponential_(generator=gen)
    return (probs / race.clamp_min_(torch.finfo(race.dtype).tiny)).argmax(-1)
