"""Batched speculative decoding on the fast path: B sequences at once, each at its own length.

Terms as in ``cospec.acceptance``: per step each row's draft proposes d_1..d_k, the target
scores [last, d_1..d_k] in one pass, the row keeps ``accepted`` = a drafts and commits one
more token (recovered at a rejection, the bonus when all pass). A *slot* is a row of the
static caches; a *request* occupies a slot from its prefill until it finishes.

- Each model's layer l has one K/V cache [rows, kv_heads, max_len, head_dim]; slot r's token
  at position p lives at [r, :, p]. A query at position p attends to slots <= p of its own
  row only (the mask comes from per-row positions on the device), so a rollback is moving
  the row's length ``n``: stale entries beyond it are overwritten before any query sees them.
- Invariant between steps, per live row with committed sequence ``seq`` (n = len(seq)): both
  caches hold seq[:-1] in slots 0..n-2 (the draft may lack seq[-2], the last accepted draft
  token it never fed). The draft's first forward of a step reads [seq[-2], seq[-1]] at
  positions [n-2, n-1]: it catches up and re-writes an entry it may already hold (same
  values), so every row's step has the same shape whatever it accepted.
- Everything a step decides (draws, acceptance, the arbiter, lengths) is computed for all
  rows at once on the device; the host reads the committed tokens once per step.
- Random numbers come from a counter-based hash of (row seed, row step, draw index): a
  row's draws do not depend on which other rows share its batch.
- A step attends over the first ``span`` slots of each cache only: the smallest of
  MIN_SPAN·2^i (or max_len) above every position the step may touch, so attention reads
  grow with the longest live sequence, not with max_len.
- Each model's forwards are a ``batch_lm.BatchLM``: on CUDA one captured CUDA graph per
  (rows bucket b, n tokens, span), b the smallest of ``BUCKETS`` that covers the highest
  slot in use (``fast_batch_warm.warm_up`` captures them all ahead), and the fused layers
  for the forwards they take (one row; or b rows of n tokens, b * n <= fused.ROWS_TOKENS).
  On CPU it all runs eagerly.

Rows join and leave between steps: ``submit`` queues a request; ``step`` prefills queued
requests into free slots (all of them in one padded pass per model, up to
``PREFILL_TOKENS``; on CUDA that pass is padded to 2^i rows and 16·2^i tokens and replayed
from that shape's CUDA graph, unless COSPEC_PREFILL says otherwise), runs one step for every
live row and returns what each committed; a finished request frees its slot at once. When
the live requests and the queued ones would fit a smaller rows bucket than the highest slot
in use asks, the requests above that count move down into free slots first (``_compact``:
their K/V, state and draws go with them), so that a step computes no more rows than it
needs, and a request left alone decodes in slot 0 (on the fused layers, where they run). A
target-only step decodes ``ahead`` tokens a row before its one host read; with ``early`` the
rows that joined in it get their first token sooner, copied out after the first forward.

CoS (``combo``: exact sampling from a weighted ensemble or contrastive combination of the
draft, ``middle`` models and the target) runs ``fast_batch_cos.CosStep`` in place of the
spd step: same slots, positions, uniforms and host read; a row may carry a pending
alternate proposal from one step to the next (invariants in that module).
"""

from __future__ import annotations

import copy
import functools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from cospec.arbiter import MismatchPolicy
from cospec.batch_lm import BatchLM
from cospec.cos import Combination
from cospec.errors import CospecError
from cospec.fast import (
    clock,
    to_host,
)
from cospec.fast_batch_cos import EXTRA, CosStep
from cospec.lookup import NgramIndex
from cospec.row_sampling import (
    _M32,
    RowSampling,
    first_false,
    pick,
    row_probabilities,
    uniforms,
    verify,
)
from cospec.sampling import GREEDY, SamplingConfig
from cospec.settings import choice
from cospec.stats import DecodeStats

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RUN_AHEAD = 8   # target-only decoding: tokens decoded per host read
MIN_SPAN = 256  # the shortest cache span a step attends over (spans: powers of two, max_len)


def run_ahead_setting() -> int:
    """COSPEC_RUN_AHEAD: the tokens a target-only step decodes per host read, 1..RUN_AHEAD
    (unset: RUN_AHEAD). Fewer make steps shorter, so that a request's first token and a new
    request's admission come sooner, at the cost of more host reads per token."""
    return int(choice("COSPEC_RUN_AHEAD", tuple(str(i) for i in range(1, RUN_AHEAD + 1)),
                      str(RUN_AHEAD)))


@dataclass
class Request:
    rid: int
    prompt: list[int]
    max_new: int
    sampling: SamplingConfig
    seed: int
    tokens: list[int] = field(default_factory=list)
    from_draft: list[bool] = field(default_factory=list)
    index: NgramIndex | None = None  # prompt lookup's n-grams of prompt + tokens (``lookup``)


@dataclass(frozen=True)
class Commit:
    """What one request committed in one step; ``done``: it has finished (EOS or budget)."""

    rid: int
    tokens: list[int]
    done: bool


class BatchEngine:
    """Batched target-only (``draft=None``), speculative (exact: greedy match at T = 0,
    rejection sampling at T > 0), prompt lookup (``lookup``, no draft: each row's k
    proposals copied from its own sequence, ``cospec.lookup``; exact as spd), CoSpec
    (``policy``: greedy, an arbiter at every mismatch, as ``acceptance.ArbiterRule``) or CoS
    (``combo``: exact sampling from the combination of draft, ``middle`` and target,
    ``cospec.fast_batch_cos``; ``alternate`` True is ``cos-*``, False ``*-sd``) decoding of
    up to ``rows`` requests at once.

    ``submit`` queues a request and returns its id; ``step`` runs one step and returns the
    ``Commit`` of every request that took part. ``stats`` sums all requests' counters.
    """

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module | None = None, *,
                 k: int = 4, rows: int = 64, max_len: int = 2048, eos_ids: Iterable[int] = (),
                 policy: MismatchPolicy | None = None, threshold: float = 0.5,
                 max_overrides: int | None = None, every_mismatch: bool = True,
                 run_ahead: int | None = None, graphs: bool | None = None,
                 combo: Combination | None = None, middle: Sequence[torch.nn.Module] = (),
                 alternate: bool = True, lookup: bool = False):
        if lookup and draft is not None:
            raise CospecError("prompt lookup proposes from the sequence itself: no draft")
        if draft is None and (policy is not None or combo is not None):
            raise CospecError("an arbiter policy or a combination needs a draft model")
        if combo is not None and policy is not None:
            raise CospecError("an arbiter policy decides spd's mismatches, not a combination's")
        if middle and combo is None:
            raise CospecError("more than two models are for a combination (combo)")
        if (draft is not None or lookup) and not 1 <= k <= 2 * RUN_AHEAD - 1:
            raise CospecError(f"k (draft length) must be in 1..{2 * RUN_AHEAD - 1}, got {k}")
        run_ahead = run_ahead_setting() if run_ahead is None else run_ahead
        if not 1 <= run_ahead <= RUN_AHEAD:
            raise CospecError(f"run_ahead must be in 1..{RUN_AHEAD}, got {run_ahead}")
        self.lookup = lookup
        self.k = k if draft is not None or lookup else 0
        self.ahead = 0 if self.k else run_ahead
        self.width = self.k + 1 if self.k else run_ahead  # candidates per step
        self.rows, self.max_len = rows, max_len
        lm = functools.partial(BatchLM, rows=rows, max_len=max_len, graphs=graphs,
                               tokens=2 * RUN_AHEAD)  # a step's longest forward
        self.target = lm(target)
        self.draft = lm(draft) if draft is not None else None
        self.middle = [lm(m) for m in middle]
        self.models = [lm for lm in (self.target, self.draft, *self.middle) if lm is not None]
        self.cos = (CosStep(combo, self.draft, [*self.middle, self.target], k, alternate)
                    if combo is not None else None)
        self.eos = set(eos_ids)
        self.threshold, self.max_overrides = threshold, max_overrides
        self.every_mismatch = every_mismatch
        self.policy = policy
        dev = self.target.device
        if isinstance(policy, torch.nn.Module) and not policy.needs_hidden:
            with torch.inference_mode(False), torch.no_grad():
                self.policy = copy.deepcopy(policy).to(dev)  # features stay on the device
        self.device = dev
        with torch.inference_mode(False):
            self._state(rows, dev)
        self.slots: list[Request | None] = [None] * rows
        self.queue: deque[Request] = deque()
        self.next_rid = 0
        self.stats = DecodeStats()

    def _state(self, rows: int, dev: torch.device) -> None:
        """Per-slot device state (normal tensors, so that the host may write them between
        steps whatever mode the engine was built in); free slots hold n = 1 and token 0."""
        z = torch.zeros(rows, dtype=torch.long, device=dev)
        self.n, self.last, self.prev = z + 1, z.clone(), z.clone()
        self.plen, self.seed, self.counter, self.overrides = (z.clone(), z.clone(), z.clone(),
                                                              z.clone())
        self.temp = torch.ones(rows, device=dev)
        self.top_p = torch.ones(rows, device=dev)
        self.top_k = z + 1
        self.greedy = torch.ones(rows, dtype=torch.bool, device=dev)
        self.live = torch.zeros(rows, dtype=torch.bool, device=dev)

    # ------------------------------------------------------------------ requests

    def submit(self, prompt_ids: Sequence[int], max_new_tokens: int = 128,
               sampling: SamplingConfig = GREEDY, seed: int = 0) -> int:
        """Queue a request; returns its id. It joins at the next ``step`` with a free slot."""
        prompt = list(prompt_ids)
        if not prompt:
            raise CospecError("empty prompt: give at least one token")
        if max_new_tokens < 1:
            raise CospecError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self._reach(len(prompt) + max_new_tokens) > self.max_len:
            raise CospecError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) "
                              f"do not fit the cache of {self.max_len} tokens")
        if self.policy is not None and not sampling.greedy:
            raise CospecError("CoSpec's arbiter decides greedy mismatches: use temperature 0")
        rid = self.next_rid
        self.next_rid += 1
        self.queue.append(Request(rid, prompt, max_new_tokens, sampling, seed))
        return rid

    @property
    def busy(self) -> bool:
        """Requests queued or decoding."""
        return bool(self.queue) or any(r is not None for r in self.slots)

    def _admit(self) -> list[int]:
        """Prefill queued requests into free slots (every model, prompt[:-1]; all the
        requests admitted in a step in one pass per model); returns their slots."""
        vocab = self.target.head_w.shape[0]
        free = [slot for slot in range(self.rows) if self.slots[slot] is None]
        admitted = [(slot, self.queue.popleft()) for slot in free[:len(self.queue)]]
        if not admitted:
            return []
        for lm in self.models:
            lm.prefill([r.prompt[:-1] for _, r in admitted], [slot for slot, _ in admitted])
        for slot, req in admitted:
            if self.cos is not None:
                self.cos.free(slot)
            s = req.sampling
            self.n[slot], self.plen[slot] = len(req.prompt), len(req.prompt)
            self.last[slot] = req.prompt[-1]
            self.prev[slot] = req.prompt[-2] if len(req.prompt) > 1 else req.prompt[-1]
            self.seed[slot], self.counter[slot], self.overrides[slot] = req.seed & _M32, 0, 0
            self.temp[slot] = 1.0 if s.greedy else s.temperature
            self.top_k[slot] = s.top_k if 0 < s.top_k < vocab else vocab
            self.top_p[slot] = s.top_p
            self.greedy[slot] = s.greedy
            self.live[slot] = True
            self.slots[slot] = req
            if self.lookup:
                req.index = NgramIndex()
                req.index.extend(req.prompt)
        return [slot for slot, _ in admitted]

    def _compact(self) -> None:
        """Where the live requests and those about to join would fit a smaller rows bucket
        than the highest slot in use asks, move the live requests above that count into
        the free slots below it (``_move``): a step computes rows 0..b-1, holes included,
        and a lone request in slot 0 takes the fused one-row forwards (``BatchLM``).
        Requests keep their ids, draws (seeded by row, not slot) and tokens."""
        used = [i for i, r in enumerate(self.slots) if r is not None]
        if not used:
            return
        wanted = min(len(used) + len(self.queue), self.rows)
        if self._bucket(wanted - 1) >= self._bucket(used[-1]):
            return
        holes = (i for i in range(wanted) if self.slots[i] is None)
        for src in [i for i in used if i >= wanted]:
            self._move(src, next(holes))

    def _move(self, src: int, dst: int) -> None:
        """Request of slot ``src`` into the free slot ``dst``: its K/V (the positions a
        step may have written) in every model, its per-slot state, CoS's pending token."""
        req = self.slots[src]
        need = min(self._reach(len(req.prompt) + len(req.tokens)), self.max_len)
        for lm in self.models:
            for cache in (*lm.kc, *lm.vc):
                cache[dst, :, :need] = cache[src, :, :need]
        for t in (self.n, self.last, self.prev, self.plen, self.seed, self.counter,
                  self.overrides, self.temp, self.top_p, self.top_k, self.greedy, self.live):
            t[dst] = t[src]
        if self.cos is not None:
            self.cos.move(src, dst)
        self.slots[dst] = req
        self._free(src)

    def _free(self, slot: int) -> None:
        self.slots[slot] = None
        self.live[slot] = False
        self.n[slot], self.last[slot], self.prev[slot] = 1, 0, 0
        if self.cos is not None:
            self.cos.free(slot)

    def _sampling(self, b: int) -> RowSampling:
        reqs = [r for r in self.slots[:b] if r is not None]
        vocab = self.target.head_w.shape[0]
        return RowSampling(
            self.temp[:b], self.top_k[:b], self.top_p[:b], self.greedy[:b],
            all_greedy=all(r.sampling.greedy for r in reqs),
            any_greedy=any(r.sampling.greedy for r in reqs),
            any_top_k=any(0 < r.sampling.top_k < vocab for r in reqs),
            any_top_p=any(r.sampling.top_p < 1 for r in reqs))

    # ------------------------------------------------------------------ the step

    def step(self, early: Callable[[list[Commit]], None] | None = None) -> list[Commit]:
        """Admit queued requests, run one step for every live row, commit, free finished
        slots. Returns one ``Commit`` per request that decoded in this step.

        ``early``: target-only decoding of more than one token a step hands each request
        admitted in this step its first token, ``early([Commit, ...])``, as soon as the
        device has it, while it still decodes the step's other tokens; the returned commits
        then hold the rest (a request that ended at its first token has none). Otherwise a
        request's first token waits for its whole first step."""
        with torch.inference_mode():
            t0 = clock(self.device)
            self._compact()
            admitted = self._admit()
            t1 = clock(self.device)
            self.stats.prefill_s += t1 - t0
            used = [i for i, r in enumerate(self.slots) if r is not None]
            if not used:
                return []
            b = self._bucket(used[-1])
            self._set_span(used)
            s = self._sampling(b)
            first = bool(early and admitted and self.ahead > 1)  # ahead: 0 with a draft
            if self.cos is not None:
                u = uniforms(self.seed[:b], self.counter[:b], self.cos.draws())
                toks, a, extra = self.cos(b, s, self.n[:b], self.prev[:b], self.last[:b],
                                          self.live[:b], u)
            elif self.lookup:
                toks, a, extra = self._lookup(b, s)
            elif self.draft is None:
                toks, a, extra = self._target_only(b, s, first)
            else:
                toks, a, extra = self._speculate(b, s)
            live = self.live[:b]
            nxt = toks.gather(1, a[:, None])[:, 0]
            before = toks.gather(1, (a - 1).clamp_min(0)[:, None])[:, 0]
            self.prev[:b] = torch.where(live, torch.where(a > 0, before, self.last[:b]),
                                        self.prev[:b])
            self.last[:b] = torch.where(live, nxt, self.last[:b])
            self.n[:b] += (a + 1) * live
            self.counter[:b] += live.long()
            if first:
                early(self._first_commits(admitted))  # the device is still decoding
            read = torch.cat([toks, a[:, None], *extra], dim=1).tolist()  # the one host read
        commits = [self._commit(slot, self._rest(read[slot]) if first and slot in admitted
                                else read[slot])
                   for slot in used if self.slots[slot] is not None]  # None: ended early
        self.stats.decode_s += clock(self.device) - t1
        return commits

    def _bucket(self, top: int) -> int:
        """The rows a step computes when ``top`` is the highest slot in use: the smallest of
        ``BUCKETS`` above it, or ``rows``."""
        return min(next(size for size in (*BUCKETS, self.rows) if size > top), self.rows)

    def _span(self, need: int) -> int:
        """The shortest span bucket (MIN_SPAN * 2^i, or max_len) that holds ``need`` slots."""
        span = MIN_SPAN
        while span < need:
            span *= 2
        return min(span, self.max_len)

    def _set_span(self, used: list[int]) -> None:
        """Every model attends over the span bucket that holds every position this step may
        touch."""
        need = self._reach(max(len(self.slots[i].prompt) + len(self.slots[i].tokens)
                               for i in used))
        for lm in self.models:
            lm.span = self._span(need)

    def buckets(self) -> list[int]:
        """Every rows bucket a step may compute, ascending."""
        return sorted({self._bucket(top) for top in range(self.rows)})

    def spans(self) -> list[int]:
        """Every cache span a step may attend over, ascending: a live row holds 1 to
        max_len - 1 tokens (``submit`` keeps ``_reach`` of prompt + budget within max_len)."""
        out, need = [], self._reach(1)
        while need < self.max_len:
            out.append(self._span(need))
            need = out[-1] + 1
        return out

    def forwards(self) -> list[tuple[BatchLM, int]]:
        """The (model, tokens) forwards a step runs, at its rows bucket and span:
        target-only the target over 1 token (``_target_only``); prompt lookup over k + 1
        and over 1 (``_lookup``, a step with no proposals); spd and CoSpec
        (``_speculate``) the draft over 2 (its catch-up), over 1 (the next drafts, when
        there are any) and the target over k + 1; CoS (``fast_batch_cos``'s invariants) the
        proposer over 2 and 1 (the drafts after the first, the lookahead, a turned-down
        pending token's recovery) and every verifier over k + 1."""
        if self.cos is not None:
            return [(self.draft, 2), (self.draft, 1),
                    *((v, self.k + 1) for v in self.cos.verifiers)]
        if self.lookup:
            return [(self.target, self.k + 1), (self.target, 1)]
        if self.draft is None:
            return [(self.target, 1)]
        more = self.k + (self.policy is not None) > 1
        return [(self.draft, 2), *([(self.draft, 1)] if more else []), (self.target, self.k + 1)]

    def _reach(self, n: int) -> int:
        """A bound on the positions (+ 1) a step may write from a row of n tokens."""
        return n + max(self.k, self.ahead) + 2

    def _first_commits(self, slots: list[int]) -> list[Commit]:
        """The first token of the rows ``slots`` (admitted in this step, target-only), one
        commit each, once the device has decoded it (the later tokens may still be decoding).
        A commit's row: the token, padding, accepted 0."""
        host, ready = self.first
        if ready is not None:
            ready.synchronize()
        toks = host.tolist()
        return [self._commit(slot, [toks[slot], *[0] * (self.width - 1), 0]) for slot in slots]

    def _rest(self, row: list[int]) -> list[int]:
        """A target-only row (``width`` tokens, then accepted = width - 1) without its first
        token, which ``_first_commits`` handed over: the others, padding, accepted - 1."""
        return [*row[1:self.width], 0, row[self.width] - 1]

    def _commit(self, slot: int, row: list[int]) -> Commit:
        """Host bookkeeping of one row: cut at EOS or the budget, stats, free when done."""
        req, width = self.slots[slot], self.width
        a = row[width]
        new = row[:a + 1]
        left = req.max_new - len(req.tokens)
        cut = next((j + 1 for j, t in enumerate(new) if t in self.eos), len(new))
        cut = min(cut, left)
        done = cut < len(new) or cut == left or new[cut - 1] in self.eos
        if self.cos is not None:
            req.from_draft += self.cos.commit(slot, row[width + 1:width + 1 + EXTRA],
                                              self.stats)[:cut]
        elif self.lookup:
            self.stats.record_step(row[width + 1], a)  # a <= the row's proposals
            req.from_draft += [j < a for j in range(cut)]
            req.index.extend(new[:cut])
        elif self.draft is not None:
            calls, overrides, next_from_draft = row[width + 1:width + 4]
            self.stats.record_step(self.k, a)
            self.stats.arbiter_calls += calls
            self.stats.overrides += overrides
            req.from_draft += [j < a or bool(next_from_draft) for j in range(cut)]
        else:
            for _ in range(cut):
                self.stats.record_step(0, 0)
            req.from_draft += [False] * cut
        req.tokens += new[:cut]
        self.stats.generated += cut
        if done:
            self._free(slot)
        return Commit(req.rid, new[:cut], done)

    def _target_only(self, b: int, s: RowSampling, first: bool = False):
        """``ahead`` tokens per row, each fed straight back: toks [b, ahead], a = ahead - 1.
        ``first``: the first token's copy to the host starts as soon as it is decoded
        (``self.first``, read by ``_first_commits``)."""
        n, x = self.n[:b], self.last[:b, None]
        u = None if s.all_greedy else uniforms(self.seed[:b], self.counter[:b], self.ahead)
        toks = []
        for j in range(self.ahead):
            logits, _ = self.target.run(x, (n - 1 + j)[:, None])
            row = logits[:, -1]
            tok = row.argmax(-1) if s.all_greedy else pick(row_probabilities(row, s), u[:, j])
            toks.append(tok)
            if first and j == 0:
                self.first = to_host(tok)
            x = tok[:, None]
        a = torch.full((b,), self.ahead - 1, dtype=torch.long, device=self.device)
        return torch.stack(toks, 1), a, []

    def _speculate(self, b: int, s: RowSampling):
        """Draft k (k + 1 with a policy: the lookahead at the bonus position), verify, accept.
        Returns toks [b, k+1] (the row's candidates: d_1..d_a then the next token at a),
        accepted a [b], and [calls, overrides, next_from_draft] columns [b, 1]."""
        k, n, dev = self.k, self.n[:b], self.device
        look = self.policy is not None
        u = None if s.all_greedy else uniforms(self.seed[:b], self.counter[:b], 2 * k + 1)
        # draft: catch up on seq[-2] and read seq[-1], then one token at a time
        x = torch.stack([self.prev[:b], self.last[:b]], 1)
        pos = torch.stack([(n - 2).clamp_min(0), n - 1], 1)
        d_rows, d_hid, drafts = [], [], []
        for i in range(k + look):
            logits, h = self.draft.run(x, pos)
            d_rows.append(logits[:, -1].clone())
            d_hid.append(h[:, -1].clone())
            tok = (d_rows[-1].argmax(-1) if s.all_greedy
                   else pick(row_probabilities(d_rows[-1], s), u[:, i]))
            drafts.append(tok)
            x, pos = tok[:, None], (n + i)[:, None]
        d = torch.stack(drafts, 1)                                         # [b, k (+1)]
        ids = torch.cat([self.last[:b, None], d[:, :k]], 1)
        t_logits, t_hid = self.target.run(ids, n[:, None] - 1 + torch.arange(k + 1, device=dev))
        if look:
            return self._arbitrate(d, torch.stack(d_rows, 1), torch.stack(d_hid, 1),
                                   t_logits, t_hid)
        toks, a = accept(d, t_logits, s, None if s.all_greedy else u[:, k:],
                         None if s.all_greedy else torch.stack(d_rows, 1))
        zero = torch.zeros(b, 1, dtype=torch.long, device=dev)
        return toks, a, [zero, zero, zero]

    def _lookup(self, b: int, s: RowSampling):
        """Prompt lookup for every row at once: each live row proposes up to k tokens that
        followed the latest earlier occurrence of its last n-gram (``NgramIndex.propose`` on
        the host, over its prompt and tokens), g of them (0..k), padded to k; the target
        verifies [last, d_1..d_k] in one forward, and each row tests its g proposals as spd
        tests drafts (against one-hot proposals), its next token drawn from p_a at a
        rejection's residual or, all g passed, from p_g itself. The proposals depend on the
        row's committed tokens only, so greedy rows give the target's tokens and sampled
        rows its distribution, their draws their own (``uniforms``). A step in which no row
        proposes anything is a one-token forward instead (``_unguessed``), with the same
        tokens. Returns toks [b, k+1], accepted a [b] and the proposals g [b, 1]."""
        k, n, dev = self.k, self.n[:b], self.device
        rows = []
        for req in self.slots[:b]:
            guess = req.index.propose(k) if req is not None else []
            rows.append([*guess, *[0] * (k - len(guess)), len(guess)])
        u = None if s.all_greedy else uniforms(self.seed[:b], self.counter[:b], k + 1)
        if not any(row[k] for row in rows):
            return self._unguessed(b, s, u)
        proposed = torch.tensor(rows, device=dev)
        d, g = proposed[:, :k], proposed[:, k]
        ids = torch.cat([self.last[:b, None], d], 1)
        t_logits, _ = self.target.run(ids, n[:, None] - 1 + torch.arange(k + 1, device=dev))
        toks, a = accept(d, t_logits, s, u, proposed=g)
        return toks, a, [g[:, None]]

    def _unguessed(self, b: int, s: RowSampling, u: torch.Tensor | None):
        """A lookup step with no proposals in any row: one token a row, drawn as a verify of
        none would draw it (p_0; sampled with the last uniform, u[:, k]). ``_lookup``'s
        returns, toks padded to k + 1."""
        n, k = self.n[:b], self.k
        logits, _ = self.target.run(self.last[:b, None], (n - 1)[:, None])
        row = logits[:, -1]
        tok = row.argmax(-1) if s.all_greedy else pick(row_probabilities(row, s), u[:, k])
        toks = torch.zeros(b, k + 1, dtype=torch.long, device=self.device)
        toks[:, 0] = tok
        zero = torch.zeros(b, dtype=torch.long, device=self.device)
        return toks, zero, [zero[:, None]]

    def _arbitrate(self, dd: torch.Tensor, d_logits: torch.Tensor, d_hid: torch.Tensor,
                   t_logits: torch.Tensor, t_hid: torch.Tensor):
        """CoSpec at every position of every row at once: dd [b, k+1] the draft's greedy
        tokens (the last one its lookahead at the bonus position), d_logits [b, k+1, V],
        t_logits [b, k+1, V]. A position passes when the tokens agree or the policy keeps
        the draft's (within the row's override budget; with ``every_mismatch`` off only the
        block's first mismatch is asked); the row keeps dd up to its first failing position
        and commits the target's token there (all pass: the lookahead, kept)."""
        from cospec.arbiter import device_features

        b, m = dd.shape
        k, vocab = m - 1, t_logits.shape[-1]
        best = t_logits.argmax(-1)                                         # [b, k+1]
        miss = dd != best
        at = (self.n[:b] - self.plen[:b])[:, None] + torch.arange(m, device=self.device)
        feats = device_features(t_logits.reshape(-1, vocab), d_logits.reshape(-1, vocab),
                                best.reshape(-1), dd.reshape(-1), at.reshape(-1))
        if self.policy.needs_hidden:  # hidden-state policies run on the host
            prob = self.policy.draft_prob(feats.cpu(), t_hid.reshape(b * m, -1).float().cpu(),
                                          d_hid.reshape(b * m, -1).float().cpu())
        else:
            prob = self.policy.draft_prob(feats)
        keep = (prob.to(self.device) >= self.threshold).view(b, m)
        earlier = miss.long().cumsum(1) - miss.long()                      # mismatches before
        asked = miss.clone()
        if not self.every_mismatch:
            asked &= earlier == 0
        if self.max_overrides is not None:
            asked &= self.overrides[:b, None] + earlier < self.max_overrides
        stop = first_false(~miss | (asked & keep))                         # [b] in 0..k+1
        a = stop.clamp_max(k)
        nxt = torch.where(stop > k, dd[:, k], best.gather(1, a[:, None])[:, 0])
        toks = dd.scatter(1, a[:, None], nxt[:, None])
        upto = torch.arange(m, device=self.device) <= stop[:, None]
        kept = (miss & upto & (torch.arange(m, device=self.device) < stop[:, None])).sum(1)
        calls = (asked & upto).sum(1)
        self.overrides[:b] += kept * self.live[:b]
        from_draft = (stop > k) & miss[:, k]
        return toks, a, [calls[:, None], kept[:, None], from_draft.long()[:, None]]


def accept(d: torch.Tensor, t_logits: torch.Tensor, s: RowSampling, u: torch.Tensor | None,
           d_logits: torch.Tensor | None = None, proposed: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's verdict on its proposals d [b, k] from the target's rows t_logits
    [b, k+1, V]: greedy (``s.all_greedy``) the proposals up to the first that is not the
    target's argmax, then its argmax; else rejection sampling with uniforms u [b, k+1]
    against the draft's rows d_logits [b, k, V] (None: fixed proposals, one-hot).
    ``proposed`` [b]: only a row's first that many proposals count (``verify``). Returns
    toks [b, k+1] (d_1..d_a, then the next token at a) and accepted a [b]."""
    if s.all_greedy:
        best = t_logits.argmax(-1)                                         # [b, k+1]
        k = d.shape[1]
        ok = d == best[:, :k]
        if proposed is not None:
            ok &= torch.arange(k, device=d.device) < proposed[:, None]
        a = first_false(ok)
        nxt = best.gather(1, a[:, None])[:, 0]
    else:
        q = None if d_logits is None else row_probabilities(d_logits, s)
        a, nxt = verify(row_probabilities(t_logits, s), q, d, u, proposed)
    zero = torch.zeros(d.shape[0], 1, dtype=torch.long, device=d.device)
    return torch.cat([d, zero], 1).scatter(1, a[:, None], nxt[:, None]), a


def generate_batch(target: torch.nn.Module, draft: torch.nn.Module | None,
                   prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int] = 128,
                   sampling: SamplingConfig | Sequence[SamplingConfig] = GREEDY,
                   seeds: Sequence[int] | None = None, rows: int = 64,
                   stats: DecodeStats | None = None, **engine_kw) -> list[list[int]]:
    """Decode every prompt with a ``BatchEngine`` of ``rows`` slots (requests join as slots
    free up); returns each prompt's generated ids, in order. ``engine_kw``: ``k``,
    ``eos_ids``, ``policy``, ``combo`` ... as for ``BatchEngine``; ``stats`` (if given) gets
    the sums."""
    n = len(prompts)
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    configs = [sampling] * n if isinstance(sampling, SamplingConfig) else list(sampling)
    seeds = list(range(n)) if seeds is None else list(seeds)
    k = engine_kw.get("k", 4)
    room = max(len(p) + m for p, m in zip(prompts, budgets)) + max(k, RUN_AHEAD) + 2
    engine = BatchEngine(target, draft, rows=min(rows, n), max_len=room, **engine_kw)
    rid = [engine.submit(p, m, c, s) for p, m, c, s in zip(prompts, budgets, configs, seeds)]
    out: dict[int, list[int]] = {r: [] for r in rid}
    while engine.busy:
        for c in engine.step():
            out[c.rid] += c.tokens
    if stats is not None:
        for name, value in vars(engine.stats).items():
            setattr(stats, name, value)
    return [out[r] for r in rid]
