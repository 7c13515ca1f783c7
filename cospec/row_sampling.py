"""Sampling for every row of a batch at once, on the device, each row with its own settings.

- ``uniforms``: counter-based random numbers, a function of (row seed, row step, draw index)
  only, so a row's draws do not depend on which other rows share its batch.
- ``pick``: one token per row by inverting its CDF at a uniform.
- ``row_probabilities``: ``sampling.probabilities`` with per-row temperature / top-k / top-p
  (greedy rows: the one-hot of the argmax, so exact rules work unchanged).
- ``verify``: rejection sampling of a block of drafts for every row (terms as in
  ``cospec.acceptance``: accepted drafts, then a recovered token or the bonus).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cospec.sampling import residual

_M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 tensors holding values < 2^32; no product overflows)."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def uniforms(seed: torch.Tensor, counter: torch.Tensor, n: int) -> torch.Tensor:
    """[b, n] float32 uniforms in [0, 1) from row seeds and counters [b] (int64): a
    function of (seed, counter, index) only, 24 random bits each."""
    j = torch.arange(n, device=seed.device)
    h = _mix((_mix(_mix(seed & _M32) ^ (counter & _M32))[:, None] + j * 0x9E3779B) & _M32)
    return (h >> 8).float() / float(1 << 24)


def pick(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One id per row of probs [b, V] by inverting its CDF at u [b] (a token of probability
    0 is never picked: the search finds the first cumulative mass above u * total)."""
    c = probs.cumsum(-1)
    at = torch.searchsorted(c, u[:, None] * c[:, -1:], right=True)
    return at.clamp_max(probs.shape[-1] - 1)[:, 0]


@dataclass
class RowSampling:
    """Per-row sampling settings [b] on the device, with host flags saying which kinds of
    processing any row needs (so an all-greedy batch does argmaxes only)."""

    temp: torch.Tensor     # float32, 1 for greedy rows
    top_k: torch.Tensor    # int64, V for "off"
    top_p: torch.Tensor    # float32, 1 for "off"
    greedy: torch.Tensor   # bool
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool


def row_probabilities(logits: torch.Tensor, s: RowSampling) -> torch.Tensor:
    """``sampling.probabilities`` with each row's own settings: logits [b, ..., V] ->
    float32 [b, ..., V] (greedy rows: one-hot of the argmax)."""
    x = logits.float()
    shape = (-1,) + (1,) * (x.dim() - 1)
    x = x / s.temp.view(shape)
    if s.any_top_k:
        at = (s.top_k.view(shape) - 1).expand(*x.shape[:-1], 1)
        kth = x.sort(-1, descending=True).values.gather(-1, at)
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(-1)
    if s.any_top_p:
        top_p = s.top_p.view(shape)
        sorted_p, order = probs.sort(-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p >= top_p) & (top_p < 1)
        drop[..., 0] = False  # the top token always stays, as in sampling.probabilities
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    if s.any_greedy:
        hot = F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        probs = torch.where(s.greedy.view(shape), hot, probs)
    return probs


def first_false(ok: torch.Tensor) -> torch.Tensor:
    """[b] index of the first False in each row of ok [b, m] (m when all are True)."""
    return torch.cat([~ok, ok.new_ones(ok.shape[0], 1)], dim=1).int().argmax(-1)


def verify(p: torch.Tensor, q: torch.Tensor | None, d: torch.Tensor, u: torch.Tensor,
           proposed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling for every row at once: target p [b, k+1, V], draft q [b, k, V],
    drafts d [b, k] (drawn from q), uniforms u [b, k+1] (k tests and the final draw).
    Returns accepted a [b] and the next token [b]: drawn from norm(max(0, p_a - q_a)) at a
    rejection (a < k), from the bonus row p_k when all pass. Greedy rows (one-hot p and q)
    keep the drafts equal to the target's argmax and then commit its argmax. ``q`` None:
    the proposals d are fixed tokens (prompt lookup's), q their one-hot rows. ``proposed``
    [b]: a row's proposals are d[:g] only (g = proposed, 0..k; the rest padding, never
    tested): a row that passes all g draws its next token from p_g, as at the bonus."""
    b, k = d.shape
    rows = torch.arange(b, device=d.device)
    q_d = q.gather(-1, d[..., None])[..., 0] if q is not None else torch.ones_like(p[:, :k, 0])
    p_d = p[:, :k].gather(-1, d[..., None])[..., 0]
    passed = u[:, :k] * q_d < p_d
    if proposed is not None:
        passed &= torch.arange(k, device=d.device) < proposed[:, None]
    a = first_false(passed)
    t = p[rows, a]                                                          # [b, V]
    rejected = (a < (k if proposed is None else proposed))[:, None].to(p.dtype)
    if q is None:
        qa = torch.zeros_like(t).scatter_(1, d[rows, a.clamp_max(k - 1)][:, None], rejected)
    else:
        qa = q[rows, a.clamp_max(k - 1)] * rejected
    return a, pick(residual(t, qa), u[:, k])
