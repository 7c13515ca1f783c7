"""Batched lockstep decoding, for accuracy runs and divergence collection.

At every step each row feeds its last committed token to the target (and the draft, when
given) and both predict the next token for the *same* committed prefix. The committed token
is the target's greedy token, or — when a mismatch policy says DRAFT — the draft's.

Why this equals the batch-1 speculative loop: in greedy SPD and token-level CoSpec every
committed token is either the target's or the draft's greedy token for exactly the
committed prefix, and the arbiter's features do not depend on the block structure. So the
tokens are the same, up to floating-point differences between batched (padded) and batch-1
kernels; ``tests/test_batched.py`` checks equality and ``cospec eval`` reports agreement.

With a sampling config (T > 0, target-only or a CoS combination) each row samples its next
token from the target's (or r's) processed distribution: the distribution every exact
speculative method samples, though not the same random draws as the batch-1 loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from cospec import cpu_int8
from cospec.arbiter import mismatch_features
from cospec.cpu import fast_linear
from cospec.decoding import LastHidden, call_lm
from cospec.sampling import GREEDY, SamplingConfig, probabilities


@dataclass
class Divergence:
    """A mismatch on a row's committed path: at ``position`` the target wanted ``t`` and the
    draft ``d``; ``c`` is the control token (``control_tokens``), the flip a re-roll would
    make without the draft."""

    position: int            # index in the generated tokens
    t: int
    d: int
    features: list[float]
    kept_draft: bool
    c: int = -1
    c_sampled: bool = False  # c was sampled (d was the target's second choice)


@dataclass
class LockstepResult:
    tokens: list[int]
    mismatches: int = 0
    overrides: int = 0
    divergences: list[Divergence] = field(default_factory=list)
    logprob: float = 0.0  # the target's log-probability of ``tokens`` (when recording)


def control_tokens(t_logits: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                   gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The re-roll control at mismatches: the target's second choice, or, where that is the
    draft's token, a token sampled from the target at T = 1 among all but ``t`` and ``d``.

    t_logits: [n, V] target logits; t, d: [n] the target's and the draft's tokens (t != d).
    Returns (c [n], sampled [n] bool); c is never t nor d.
    """
    second = t_logits.topk(2, dim=-1).indices[:, 1]
    sampled = second == d
    c = second.clone()
    if bool(sampled.any()):
        rows = sampled.nonzero().flatten()
        logits = t_logits[rows].float()  # indexing copies
        logits[torch.arange(len(rows), device=logits.device), t[rows]] = float("-inf")
        logits[torch.arange(len(rows), device=logits.device), d[rows]] = float("-inf")
        c[rows] = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
    return c, sampled


def _forward(model, ids, mask, pos, cache, hidden: bool = False, prefill: bool = False):
    """Last-position logits [B, V] (float32), the cache, and (if ``hidden``) the last
    hidden states [B, d] (else None). ``prefill``: prompt tokens, which a model's int8
    copies leave to its own weights (``cpu.fast_linear``)."""
    with (fast_linear(model, ids.device, *ids.shape, prefill=prefill),
          LastHidden(model, hidden) as h):
        out, cache = call_lm(model, cache, input_ids=ids, attention_mask=mask,
                             position_ids=pos, logits_to_keep=1)
    return (out.logits[:, -1].float(), cache,
            h.value[:, -1].float() if hidden else None)


def _prompt_forward(model, ids, mask, pos, hidden: bool):
    """``_forward`` over the left-padded prompts ids [B, L]: one prefill, or, for a model
    with int8 copies (``cpu_int8``: a draft's), the batch-1 loop's split -- all but the
    last column as its prefill (its own weights), the last as a step (the copies) -- so
    that each prompt meets the weights it meets at batch 1."""
    if not cpu_int8.has_copies(model):
        return _forward(model, ids, mask, pos, None, hidden, prefill=True)
    cache = None
    if ids.shape[1] > 1:
        _, cache, _ = _forward(model, ids[:, :-1], mask[:, :-1], pos[:, :-1], None,
                               prefill=True)
    return _forward(model, ids[:, -1:], mask, pos[:, -1:], cache, hidden)


@torch.inference_mode()
def _batch(target, draft, prompts, budgets, eos, pad_id, policy, threshold, record,
           combo=None, sampling: SamplingConfig = GREEDY, gen: torch.Generator | None = None,
           max_overrides: int | None = None):
    device = next(target.parameters()).device
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    hid = bool(getattr(policy, "needs_hidden", False))
    t_logits, t_cache, t_hid = _prompt_forward(target, ids, mask, pos, hid)
    d_logits, d_cache, d_hid = (_prompt_forward(draft, ids, mask, pos, hid)
                                if draft is not None else (None, None, None))
    steps = max(budgets)
    # all bookkeeping stays on the device: no per-row Python work in the step loop
    tokens = torch.full((n, steps), -1, dtype=torch.long, device=device)
    alive = torch.ones(n, dtype=torch.bool, device=device)
    budget = torch.tensor(budgets, device=device)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    mismatches = torch.zeros(n, dtype=torch.long, device=device)
    overrides = torch.zeros(n, dtype=torch.long, device=device)
    logprob = torch.zeros(n, dtype=torch.float64, device=device)
    divergences: list[list[Divergence]] = [[] for _ in prompts]
    last_pos = pos[:, -1:]
    control_gen = torch.Generator(device=device).manual_seed(0) if record else None
    for step in range(steps):
        if combo is not None:  # collaborative decoding: r of both models
            r = combo.probs([d_logits, t_logits], sampling)
        else:
            r = t_logits if sampling.greedy else probabilities(t_logits, sampling)
        choice = r.argmax(-1) if sampling.greedy else torch.multinomial(r, 1, generator=gen)[:, 0]
        if draft is not None and combo is None:
            d_best = d_logits.argmax(-1)
            differ = (d_best != choice) & alive
            mismatches += differ
            if max_overrides is not None:  # rows whose budget is spent decide as plain SPD
                differ &= overrides < max_overrides
            if policy is not None or record:
                rows = differ.nonzero().flatten()
                if len(rows):
                    t_r, d_r = choice[rows], d_best[rows]
                    feats = mismatch_features(t_logits[rows], d_logits[rows], t_r, d_r,
                                              torch.full((len(rows),), step))
                    keep = (policy.draft_prob(feats, t_hid[rows] if hid else None,
                                              d_hid[rows] if hid else None) >= threshold
                            if policy is not None
                            else torch.zeros(len(rows), dtype=torch.bool)).to(device)
                    choice[rows[keep]] = d_r[keep]
                    overrides[rows[keep]] += 1
                    if record:
                        c_r, c_s = control_tokens(t_logits[rows], t_r, d_r, control_gen)
                        for j, r in enumerate(rows.tolist()):
                            divergences[r].append(Divergence(
                                step, int(t_r[j]), int(d_r[j]), feats[j].tolist(),
                                bool(keep[j]), int(c_r[j]), bool(c_s[j])))
        if record:
            lp = t_logits.gather(1, choice[:, None])[:, 0] - t_logits.logsumexp(-1)
            logprob += torch.where(alive, lp, 0).double()
        tokens[:, step] = torch.where(alive, choice, -1)
        alive &= ~torch.isin(choice, eos_t) & (budget > step + 1)
        if step % 8 == 7 and not bool(alive.any()):
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        last_pos = last_pos + 1
        x = choice[:, None]
        t_logits, t_cache, t_hid = _forward(target, x, mask, last_pos, t_cache, hid)
        if draft is not None:
            d_logits, d_cache, d_hid = _forward(draft, x, mask, last_pos, d_cache, hid)
    rows = tokens.cpu().tolist()
    return [LockstepResult([t for t in row if t >= 0], int(mm), int(ov), dv, lp)
            for row, mm, ov, dv, lp in zip(rows, mismatches.tolist(), overrides.tolist(),
                                           divergences, logprob.tolist())]


def _chunks(order: list[int], prompts: list[list[int]], rows: int, tokens: int
            ) -> list[list[int]]:
    """Consecutive groups of ``order`` with at most ``rows`` prompts and at most ``tokens``
    padded prompt tokens (rows x longest prompt), at least one prompt each: the prefill's
    attention scores grow with rows x length^2, so long prompts get smaller batches."""
    out: list[list[int]] = []
    for i in order:
        cur = out[-1] if out else None
        if (cur is None or len(cur) >= rows
                or (len(cur) + 1) * max(len(prompts[j]) for j in [*cur, i]) > tokens):
            out.append([i])
        else:
            cur.append(i)
    return out


def lockstep(target, draft, prompts: list[list[int]], *, max_new_tokens: int | list[int],
             eos_ids, pad_id: int, batch_size: int = 16, policy=None, threshold: float = 0.5,
             record: bool = False, desc: str | None = None, combo=None,
             sampling: SamplingConfig = GREEDY, seed: int = 0,
             max_overrides: int | None = None, max_prefill_tokens: int = 1 << 17
             ) -> list[LockstepResult]:
    """Decode every prompt; returns results in the order of ``prompts``.

    ``draft=None``: plain target greedy decoding. With a draft and ``policy=None``: target
    greedy decoding that also records where the draft disagrees (``record=True`` keeps the
    features of each divergence). With a policy: token-level CoSpec. Prompts are grouped by
    length to limit padding (and capped at ``max_prefill_tokens`` padded prompt tokens per
    batch); each row stops at EOS or its budget. With ``combo`` (a CoS
    ``Combination`` of draft and target), collaborative decoding. ``sampling`` with T > 0
    (no policy, no recording): rows sample from the target's or r's distribution, seeded.
    """
    if not sampling.greedy and (policy is not None or record):
        raise ValueError("mismatch policies and divergence recording are greedy-only")
    budgets = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
               else list(max_new_tokens))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + budgets[i])
    out: list[LockstepResult | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=desc is None, unit="seq")
    device = next(target.parameters()).device
    gen = None if sampling.greedy else torch.Generator(device=device).manual_seed(seed)
    for chunk in _chunks(order, prompts, batch_size, max_prefill_tokens):
        res = _batch(target, draft, [prompts[i] for i in chunk], [budgets[i] for i in chunk],
                     set(eos_ids), pad_id, policy, threshold, record, combo, sampling, gen,
                     max_overrides)
        for i, r in zip(chunk, res):
            out[i] = r
        bar.update(len(chunk))
    bar.close()
    return out
