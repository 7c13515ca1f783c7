"""CoS in the batched engine: exact speculative sampling from a combination of models, per row.

Models are listed proposer first (``cospec.cos``): the proposer drafts k tokens from its own
distribution q, every *verifier* (the other models, the target last) scores [last, d_1..d_k]
in one pass, and d_i is kept with probability min(1, r_i(d_i) / q_i(d_i)) where r is the
combination (``cos.Combination``: weighted ensemble or contrastive decoding); at the first
rejection a token is drawn from norm(max(0, r_i - q_i)). At T = 0 a draft passes iff it is
argmax r, and the token after is argmax r. When all k pass:

- ``alternate`` (``cos-*``): the last verifier's own bonus token x ~ p_last is not committed
  but *pending*: the row keeps x and every verifier's logits at x's position. In its next
  step the proposer reads x in the forward it needs anyway to catch up, and x is kept with
  probability min(1, r(x) / p_last(x)), else replaced by a draw from norm(max(0, r - p_last)).
  Drafting then continues from the committed token, as in ``cos.cos_generate``.
- otherwise (``*-sd``): the proposer runs one more (lookahead) step, so r is known at the
  bonus position, and the bonus is drawn from r.

Invariants between steps, per live row with committed sequence ``seq`` (n = len(seq)):
every verifier holds seq[:-1] (a row with a pending token: all of seq, and its logits at x's
position are kept here); the proposer holds seq[:-1]. A step's proposer forwards, all rows at
once: one over two tokens ([seq[-2], seq[-1]] at [n-2, n-1], or [seq[-1], x] at [n-1, n] for a
pending row); only when some row had a pending token, one over one token (the recovered token
of a row whose x was turned down, at n; a harmless write at the next draft slot for the
others); then k - 1 (``*-sd``: k) draft steps. Each verifier runs once over k + 1 tokens.
A row commits [pending outcome] + accepted drafts + [recovered or bonus token], at most k + 1
tokens: the engine's step shape (``toks`` [b, k+1], ``a`` = committed - 1).
"""

from __future__ import annotations

import dataclasses

import torch

from cospec.cos import Combination
from cospec.errors import CospecError
from cospec.row_sampling import RowSampling, pick, row_probabilities, verify
from cospec.stats import DecodeStats

EXTRA = 4  # columns the step adds to the host read: pending in, its outcome, accepted, pending out


def combined(combo: Combination, logits: list[torch.Tensor], s: RowSampling) -> torch.Tensor:
    """``Combination.probs`` with each row's own sampling: per-model logits [b, ..., V]
    (proposer first) -> r float32 [b, ..., V]; greedy rows: the one-hot of argmax r."""
    if combo.kind == "cd":
        return row_probabilities(logits[-1].float() - combo.mu * logits[0].float(), s)
    temp = s.temp.view((-1,) + (1,) * (logits[0].dim() - 1))
    r = sum(w * (lg.float() / temp).softmax(-1) for w, lg in zip(combo.weights, logits))
    if not (s.any_greedy or s.any_top_k or s.any_top_p):
        return r
    # top-k / top-p (and the argmax of greedy rows) of r itself, through log r at T = 1
    return row_probabilities(r.clamp_min(1e-30).log(),
                             dataclasses.replace(s, temp=torch.ones_like(s.temp)))


class CosStep:
    """The CoS step over rows 0..b-1 of a ``BatchEngine``, with each row's pending token.

    ``proposer`` and ``verifiers`` are the engine's ``BatchLM`` s (the target last).
    """

    def __init__(self, combo: Combination, proposer, verifiers: list, k: int, alternate: bool):
        models = 1 + len(verifiers)
        if combo.kind == "cd" and models != 2:
            raise CospecError("contrastive decoding combines exactly two models")
        if combo.kind == "we" and len(combo.weights) != models:
            raise CospecError(f"{models} models but {len(combo.weights)} ensemble weights")
        self.combo, self.proposer, self.verifiers = combo, proposer, verifiers
        self.k, self.alternate = k, alternate
        rows, dev = proposer.rows, proposer.device
        with torch.inference_mode(False), torch.no_grad():
            self.pend = torch.zeros(rows, dtype=torch.bool, device=dev)
            self.x = torch.zeros(rows, dtype=torch.long, device=dev)
            self.rows_x = [torch.zeros(rows, v.head_w.shape[0], dtype=v.dtype, device=dev)
                           for v in verifiers]  # each verifier's logits at x's position
        self.waiting = [False] * rows  # host copy of ``pend``

    def free(self, slot: int) -> None:
        """The slot's request left (or a new one joins): no pending token."""
        self.pend[slot] = False
        self.waiting[slot] = False

    def move(self, src: int, dst: int) -> None:
        """Slot ``src``'s pending token (and its verifiers' logits) into slot ``dst``."""
        self.pend[dst], self.x[dst] = self.pend[src], self.x[src]
        for rows_x in self.rows_x:
            rows_x[dst] = rows_x[src]
        self.waiting[dst] = self.waiting[src]

    def draws(self) -> int:
        """Uniforms per row and step: the pending test and recovery, k drafts, k tests and
        the token after them."""
        return 2 * self.k + 3

    def __call__(self, b: int, s: RowSampling, n: torch.Tensor, prev: torch.Tensor,
                 last: torch.Tensor, live: torch.Tensor, u: torch.Tensor):
        """One step of rows 0..b-1: n, prev, last, live [b] as ``BatchEngine``'s, u [b,
        ``draws()``]. Returns toks [b, k+1] (the committed tokens, then padding), a [b]
        (committed - 1), and the columns [pending in, its outcome (1 kept), accepted drafts,
        pending out], each [b, 1]."""
        k, combo, alt = self.k, self.combo, self.alternate
        pend, x = self.pend[:b].clone(), self.x[:b].clone()  # both are rewritten below
        zero = torch.zeros(b, dtype=torch.long, device=n.device)
        # the proposer catches up: [prev, last] at [n-2, n-1]; a pending row [last, x] at [n-1, n]
        top = n - 1 + pend.long()
        ids = torch.stack([torch.where(pend, last, prev), torch.where(pend, x, last)], 1)
        logits, _ = self.proposer.run(ids, torch.stack([(top - 1).clamp_min(0), top], 1))
        row = logits[:, 1].clone()                                          # q after the input
        m = n + pend.long()                                                # committed after
        ok, c0 = zero.bool(), last
        if any(self.waiting[:b]):
            at_x = [logits[:, 0], *(v[:b] for v in self.rows_x)]
            r_x = combined(combo, at_x, s)[:, None]                        # [b, 1, V]
            p_x = row_probabilities(self.rows_x[-1][:b], s)[:, None]
            kept, y = verify(r_x.expand(b, 2, -1), p_x, x[:, None], u[:, :2])
            ok = pend & (kept == 1)
            c0 = torch.where(pend, torch.where(ok, x, y), last)
            turned_down = pend & ~ok
            # a turned-down row reads its recovered token at n; the others write a token at
            # their next draft slot, which the first draft overwrites before anyone reads it
            again, _ = self.proposer.run(c0[:, None], (m - turned_down.long())[:, None])
            row = torch.where(turned_down[:, None], again[:, 0], row)
        drafts, q_rows = [], []
        for i in range(k):
            q_rows.append(row)
            drafts.append(pick(row_probabilities(row, s), u[:, 2 + i]))
            if i < k - 1 or not alt:  # *-sd: the lookahead row after d_k too
                out, _ = self.proposer.run(drafts[-1][:, None], (m + i)[:, None])
                row = out[:, 0].clone()
        d = torch.stack(drafts, 1)                                         # [b, k]
        ids = torch.cat([c0[:, None], d], 1)
        pos = m[:, None] - 1 + torch.arange(k + 1, device=n.device)
        v_logits = [v.run(ids, pos)[0] for v in self.verifiers]            # [b, k+1, V] each
        q_logits = torch.stack(q_rows if alt else q_rows + [row], 1)        # [b, k (+1), V]
        r = combined(combo, [q_logits, *(v[:, :q_logits.shape[1]] for v in v_logits)], s)
        if alt:  # the row after the block: the last verifier's own p (its bonus is proposed)
            r = torch.cat([r, row_probabilities(v_logits[-1][:, k:], s)], 1)
        q = row_probabilities(torch.stack(q_rows, 1), s)
        a, nxt = verify(r, q, d, u[:, k + 2:])
        waits = (a == k) & live if alt else zero.bool()
        if alt:
            for keep, v in zip(self.rows_x, v_logits):
                keep[:b] = v[:, k]
            self.x[:b] = torch.where(waits, nxt, x)
        self.pend[:b] = waits
        block = torch.cat([d, zero[:, None]], 1).scatter(1, a[:, None], nxt[:, None])
        toks = torch.where(pend[:, None], torch.cat([c0[:, None], block[:, :k]], 1), block)
        count = pend.long() + a + 1 - waits.long()
        extra = [pend.long(), ok.long(), a, waits.long()]
        return toks, count - 1, [c[:, None] for c in extra]

    def commit(self, slot: int, cols: list[int], stats: DecodeStats) -> list[bool]:
        """Host bookkeeping of one row from its extra columns: stats (the pending proposal
        counts as one drafted token, as in ``cos.cos_generate``) and the from_draft flags of
        its committed tokens (a recovered token is no proposal's)."""
        pend, ok, a, waits = cols[:EXTRA]
        stats.record_step(self.k, a)
        stats.drafted += pend
        stats.accepted += ok
        self.waiting[slot] = bool(waits)
        tail = [] if waits else [False]
        return [bool(ok)] * pend + [True] * a + tail
