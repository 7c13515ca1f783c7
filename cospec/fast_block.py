"""Greedy speculative decoding with the whole block on the device: the host queues blocks
without waiting for their verdicts.

``decode`` (``cospec.decoding``) reads each block's verdict on the host before it can start
the next: the GPU idles while the host synchronises, decides and launches. Here every
quantity a block needs lives on the device: the committed sequence ``seq`` [room], its
length ``L`` [1], the drafts, the acceptance. A block is:

1. the draft's first step over the last two committed tokens, seq[L-2:L] at positions L-2,
   L-1 (one shape whether the draft lags by one token or, after a fully accepted block, two;
   re-writing the K/V of seq[L-2] is harmless), then k - 1 one-token steps, each fed the
   argmax of the one before: d_1..d_k;
2. the target's verify over [seq[L-1], d_1..d_k] at positions L-1..L+k-1;
3. a = the drafts matching the target's argmax before the first mismatch; the target's
   argmax at row a follows them. seq[L:L+k+1] takes d_1..d_k with that token at index a
   (what lies beyond a is overwritten by later blocks) and L += a + 1.

Both caches keep the invariant of ``decode``: their slots below the committed length hold
the committed tokens (the target's stale slot L+a is re-written by the next verify, the
draft's by its next first step). So the tokens are plain greedy decoding's, as spd's are.
The host reads each block's (a, window) back through pinned memory, two blocks behind, to
stop at an EOS or at ``max_new_tokens``; the blocks queued past the stop are dropped.

Greedy only, batch 1, prompts of two or more tokens, models on ``fast.StaticLM`` engines.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import torch

from cospec import fast
from cospec.errors import CospecError
from cospec.stats import DecodeStats

AHEAD = 2  # blocks queued past the last one whose verdict the host has read


@torch.inference_mode()
def spd_greedy(target: torch.nn.Module, draft: torch.nn.Module, prompt_ids: list[int], *,
               k: int = 5, max_new_tokens: int = 128, eos_ids: Iterable[int] = (),
               stats: DecodeStats | None = None) -> list[int]:
    """The target's greedy continuation of ``prompt_ids`` (at most ``max_new_tokens``, up to
    and including an EOS), by speculative decoding with ``draft``'s k tokens a block.
    ``stats`` (if given) gets the blocks as steps: drafted and accepted tokens."""
    if len(prompt_ids) < 2:
        raise CospecError("the device-side block needs a prompt of two or more tokens")
    if k < 1:
        raise CospecError(f"k (draft length) must be >= 1, got {k}")
    stats = stats if stats is not None else DecodeStats()
    if max_new_tokens < 1:  # as ``decode``: nothing to generate
        return []
    eos, start = set(eos_ids), len(prompt_ids)
    room = start + max_new_tokens + (AHEAD + 2) * (k + 1) + 2
    lms = [fast.StaticLM(m, max_len=room) for m in (target, draft)]
    for lm in lms:
        lm.prefill(prompt_ids[:-1])
    tgt, drf = (lm.engine for lm in lms)
    device = tgt.device
    seq = torch.zeros(room, dtype=torch.long, device=device)
    seq[:start] = torch.tensor(prompt_ids, device=device)
    length = torch.tensor([start], device=device)
    span = torch.arange(k + 1, device=device)
    queued: collections.deque = collections.deque()  # (host copy, its event) a block
    out: list[int] = []
    while True:
        # one block, queued on the device
        logits, _ = drf.run_device(seq.index_select(0, length - 2 + span[:2]), length - 2)
        drafts = [logits[1].argmax().view(1)]
        for i in range(1, k):
            logits, _ = drf.run_device(drafts[-1], length - 1 + i)
            drafts.append(logits[0].argmax().view(1))
        d = torch.cat(drafts)
        logits, _ = tgt.run_device(torch.cat([seq.index_select(0, length - 1), d]), length - 1)
        best = logits.argmax(-1)                                          # [k + 1]
        accepted = (best[:k] == d).long().cumprod(0).sum().view(1)
        window = torch.cat([d, d[:1]]).index_copy(0, accepted, best.index_select(0, accepted))
        seq.index_copy_(0, length + span, window)
        length = length + accepted + 1
        queued.append(fast.to_host(torch.cat([accepted, window])))
        if len(queued) <= AHEAD:
            continue
        # the verdict of the oldest queued block, read without stalling the newer ones
        host, done = queued.popleft()
        if done is not None:
            done.synchronize()
        a, *window_ids = host.tolist()
        new = window_ids[:a + 1]
        stats.record_step(k, a)
        for tok in new:
            out.append(tok)
            if tok in eos or len(out) >= max_new_tokens:
                stats.generated += len(out)
                if device.type == "cuda":  # the blocks queued past the stop are this call's
                    torch.cuda.synchronize(device)  # work: a caller's clock counts them
                return out
