"""Batched decoding on the fast path (``cospec.fast_batch``) against the batch-1 loop.

At T = 0 every row must give exactly the tokens ``cospec.decoding.generate`` gives it alone
(target-only, spd with a weak and with a perfect draft, CoSpec with an arbiter), with rows of
different prompt lengths joining as slots free up and leaving at EOS or at their budgets. At
T > 0 the first four tokens of a prompt, sampled N times through the batch, must follow the
exact joint distribution (enumerated from the model's uncached forwards), chi-square tested.
On CPU every forward runs eagerly (float32, tiny random Qwen2 models).
"""

from __future__ import annotations

import copy

import pytest
import torch
from distribution import assert_follows
from distribution import exact_joint as joint_of
from fake_graphs import fake_compiled, fake_graphs
from tiny import near_copy, tiny_model

from cospec import batch_lm, fast_batch
from cospec.acceptance import ExactRule
from cospec.arbiter import ArbiterRule, ConfidencePolicy
from cospec.decoding import generate
from cospec.errors import CospecError
from cospec.fast_batch import (
    BatchEngine,
    RowSampling,
    generate_batch,
    row_probabilities,
    uniforms,
)
from cospec.sampling import SamplingConfig, probabilities
from cospec.stats import DecodeStats

LENGTHS = (1, 3, 7, 12, 5, 9)      # prompt lengths (1: no token before the last)
BUDGETS = (20, 33, 9, 40, 25, 14)   # max new tokens per prompt


def prompt(seed: int, n: int, vocab: int = 96) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def pair():
    return tiny_model(1, dtype=torch.float32), tiny_model(2, layers=1, dtype=torch.float32)


@pytest.fixture(scope="module")
def near(pair):
    """A draft the target agrees with about half the time (``tiny.near_copy``)."""
    return near_copy(pair[0])


def batch1(target, proposer, prompts, budgets, rule, k, eos=()):
    return [[t.id for t in generate(target, proposer, p, rule, k=k, max_new_tokens=m,
                                    eos_ids=eos)] for p, m in zip(prompts, budgets)]


@pytest.mark.parametrize("min_span", [256, 8])
@pytest.mark.parametrize("method", ["target", "spd", "spd-random", "spd-self"])
def test_greedy_rows_equal_batch_one(pair, near, method, min_span, monkeypatch):
    """Six prompts through three slots: later rows join as earlier ones finish; one EOS id
    (taken from a row's own output) ends some rows before their budgets. Drafts: one the
    target partly agrees with, a random one (nothing kept), the target itself (all kept).
    ``min_span`` 8: the cache span attended over grows from step to step (16 to 64 slots)."""
    monkeypatch.setattr(fast_batch, "MIN_SPAN", min_span)
    target, draft = pair
    proposer = {"target": None, "spd": near, "spd-random": draft, "spd-self": target}[method]
    prompts = [prompt(i, n) for i, n in enumerate(LENGTHS)]
    free = batch1(target, proposer, prompts, BUDGETS, ExactRule(), k=3)
    eos = [free[1][6]]
    want = batch1(target, proposer, prompts, BUDGETS, ExactRule(), k=3, eos=eos)
    stats = DecodeStats()
    got = generate_batch(target, proposer, prompts, max_new_tokens=BUDGETS, rows=3, k=3,
                         eos_ids=eos, stats=stats)
    assert got == want
    assert any(len(w) < m for w, m in zip(want, BUDGETS))        # some row stopped at EOS
    assert any(len(w) == m for w, m in zip(want, BUDGETS))       # some ran to the budget
    assert stats.generated == sum(map(len, want))
    if method == "spd-self":
        assert stats.accepted == stats.drafted > 0  # a perfect draft: everything kept
    elif method == "spd":
        assert 0.2 < stats.accepted / stats.drafted < 0.8


@pytest.mark.parametrize("k", [1, 3])
def test_lookup_rows_equal_target_greedy(pair, k):
    """Prompt lookup in the batch engine (no draft): six prompts that repeat themselves
    through three slots, rows joining and ending at EOS or their budgets, give exactly the
    target's own greedy tokens, and the lookup proposed and kept some."""
    target, _ = pair
    prompts = [(prompt(i, n) * 3)[:3 * n] for i, n in enumerate(LENGTHS)]
    free = batch1(target, None, prompts, BUDGETS, ExactRule(), k=1)
    eos = [free[1][6]]
    want = batch1(target, None, prompts, BUDGETS, ExactRule(), k=1, eos=eos)
    stats = DecodeStats()
    got = generate_batch(target, None, prompts, max_new_tokens=BUDGETS, rows=3, k=k,
                         eos_ids=eos, stats=stats, lookup=True)
    assert got == want
    assert any(len(w) < m for w, m in zip(want, BUDGETS))        # some row stopped at EOS
    assert stats.generated == sum(map(len, want))
    assert 0 < stats.accepted <= stats.drafted
    assert stats.steps < stats.generated  # fewer steps than tokens: lookups paid


def test_lookup_step_without_proposals_is_one_token(pair, monkeypatch):
    """A lookup step in which no row proposes anything runs the target over one token, not
    k + 1: a lone row whose prompt repeats nothing starts that way, then proposes once its
    output repeats; its tokens stay the target's greedy ones."""
    target, _ = pair
    widths, real_run = [], batch_lm.BatchLM.run

    def run(self, ids, pos, first=0):
        widths.append(ids.shape[1])
        return real_run(self, ids, pos, first)

    monkeypatch.setattr(batch_lm.BatchLM, "run", run)
    p = list(range(10, 22))  # twelve distinct tokens: no n-gram seen before
    want = batch1(target, None, [p], [40], ExactRule(), k=1)
    stats = DecodeStats()
    assert generate_batch(target, None, [p], max_new_tokens=40, k=3, lookup=True,
                          stats=stats) == want
    assert widths[0] == 1 and 4 in widths  # none to propose first; proposals later
    assert stats.drafted > 0 and stats.steps == len(widths)


def test_lookup_needs_no_draft(pair):
    target, draft = pair
    with pytest.raises(CospecError, match="no draft"):
        BatchEngine(target, draft, lookup=True)
    with pytest.raises(CospecError, match="k .draft length"):
        BatchEngine(target, None, k=0, lookup=True)


def test_cpu_forwards_take_the_chosen_linear_order():
    """On a CPU the batch engine's forwards run in the linear order ``cospec.cpu`` chose for
    the model and the forward's rows (rows x tokens), as the library's batch-1 loop does
    (there MKL can be slow for a handful of rows): with auto, both orders are timed on the
    engine's own two-row verifies (2 x k + 1 = 8 rows: no batch-1 forward has as many), and
    the tokens still equal batch-1 greedy decoding."""
    from cospec import cpu

    target = tiny_model(1, width=256, dtype=torch.float32)  # wide enough for the rewrite
    draft = near_copy(target)
    prompts = [prompt(i, n) for i, n in enumerate((3, 7))]
    want = batch1(target, draft, prompts, (16, 16), ExactRule(), k=3)
    assert 8 not in cpu._choices[target].seconds
    got = generate_batch(target, draft, prompts, max_new_tokens=(16, 16), rows=2, k=3)
    assert got == want
    assert sum(map(len, cpu._choices[target].seconds[8].values())) > 0


@pytest.mark.parametrize("max_overrides", [None, 2])
def test_cospec_rows_equal_batch_one(pair, max_overrides):
    """CoSpec with an arbiter at every mismatch (and an override budget): the arbiter reads
    the draft's logits, so this also checks the draft's cache (greedy spd's tokens do not
    depend on the draft)."""
    target, draft = pair
    policy = ConfidencePolicy(0.2)
    prompts = [prompt(10 + i, n) for i, n in enumerate(LENGTHS)]
    rule = ArbiterRule(policy, max_overrides=max_overrides)
    want = batch1(target, draft, prompts, BUDGETS, rule, k=3)
    stats = DecodeStats()
    got = generate_batch(target, draft, prompts, max_new_tokens=BUDGETS, rows=4, k=3,
                         policy=policy, max_overrides=max_overrides, stats=stats)
    assert got == want
    assert stats.overrides > 0 and stats.arbiter_calls > stats.overrides
    plain = batch1(target, draft, prompts, BUDGETS, ExactRule(), k=3)
    assert got != plain  # the arbiter kept draft tokens the target disagreed with


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_same_tokens(pair, near):
    """On a GPU (float32) every step is replayed CUDA graphs per (rows bucket, tokens); the
    rows still equal the batch-1 loop's, and graphs were captured for several buckets."""
    target, draft = (copy.deepcopy(m).cuda() for m in (pair[0], near))
    prompts = [prompt(i, n) for i, n in enumerate(LENGTHS)]
    want = batch1(target, draft, prompts, BUDGETS, ExactRule(), k=3)
    eng = BatchEngine(target, draft, k=3, rows=4, max_len=96)
    rid = [eng.submit(prompts[0], BUDGETS[0])]  # alone in slot 0 first: bucket 1
    out: dict[int, list[int]] = {rid[0]: []}
    for c in eng.step():
        out[c.rid] += c.tokens
    rid += [eng.submit(p, m) for p, m in zip(prompts[1:], BUDGETS[1:])]  # then bucket 4
    out.update({r: [] for r in rid[1:]})
    while eng.busy:
        for c in eng.step():
            out[c.rid] += c.tokens
    assert [out[r] for r in rid] == want
    assert {1, 4} <= {b for b, *_ in eng.target.graphs}


@pytest.mark.parametrize("flag", ["compiled", None, "eager", "graphs"])
def test_prefill_is_compiled_when_asked(pair, near, flag, monkeypatch):
    """Where the layers are compiled, COSPEC_PREFILL=compiled sends every prefill pass (and
    only those, on CPU) through the engine's compiled layer halves, stood in for here by
    recording wrappers of the reference ones; the tokens stay batch-1 greedy's. Unset, eager
    or graphs (no graphs here): prefill stays eager."""
    seen = fake_compiled(monkeypatch, batch_lm)
    if flag is None:
        monkeypatch.delenv("COSPEC_PREFILL", raising=False)
    else:
        monkeypatch.setenv("COSPEC_PREFILL", flag)
    target, draft = pair[0], near
    prompts = [prompt(40 + i, n) for i, n in enumerate(LENGTHS)]
    want = [[t.id for t in generate(target, draft, p, ExactRule(), k=3, max_new_tokens=m)]
            for p, m in zip(prompts, BUDGETS)]
    assert generate_batch(target, draft, prompts, max_new_tokens=BUDGETS, rows=4, k=3) == want
    layers = len(target.model.layers) + len(draft.model.layers)
    if flag == "compiled":  # prefill passes of both models: 2 halves a layer, a pass at least once
        assert len(seen) >= 2 * layers and all(s[1] > 1 for s in seen)
    else:
        assert seen == []


GRAPH_LENGTHS = (17, 1, 16, 40, 3, 33)  # across the padded lengths 16 / 32 / 64
GRAPH_BUDGETS = (12, 20, 7, 15, 25, 9)


def padded_passes(monkeypatch) -> list[tuple[tuple[int, int], list[int], list[int]]]:
    """((rows, length) padded, the prompts' lengths, the slots its graph wrote) of every
    ``BatchLM.prefill_graph`` pass, recorded as they run."""
    seen: list[tuple[tuple[int, int], list[int], list[int]]] = []
    real = batch_lm.BatchLM.prefill_graph

    def record(self, part):
        shape = self.prefill_shape(len(part), max(len(p) for p, _ in part))
        real(self, part)
        seen.append((shape, [len(p) for p, _ in part], self.prefill_rows[:shape[0]].tolist()))

    monkeypatch.setattr(batch_lm.BatchLM, "prefill_graph", record)
    return seen


def test_graph_prefill_pads_rows_and_length(pair, near, monkeypatch):
    """COSPEC_PREFILL=graphs (as the default all-graphs): the prompts admitted together are
    one pass, padded to 2^i rows (capped at the engine's) and to the smallest
    PREFILL_MIN·2^i tokens that holds the longest (capped at max_len), one graph a padded
    shape (``fake_graphs``: graphs stood in on the CPU, each replay the eager pass). The
    padding rows repeat the last prompt into its own slot and the padding tokens' K/V land
    beyond the row, so every row still gives the batch-1 loop's tokens, rows joining as slots
    free up. Without graphs (plain CPU) prefill stays eager."""
    monkeypatch.setenv("COSPEC_PREFILL", "graphs")
    assert not BatchEngine(pair[0], None, rows=2, max_len=40).target.graph_prefill
    fake_graphs(monkeypatch)
    for value, graphs in (("eager", False), (None, True)):  # unset: the default, all-graphs
        if value is None:
            monkeypatch.delenv("COSPEC_PREFILL")
        else:
            monkeypatch.setenv("COSPEC_PREFILL", value)
        assert BatchEngine(pair[0], None, rows=2, max_len=40).target.graph_prefill is graphs
    seen = padded_passes(monkeypatch)
    target, draft = pair[0], near
    prompts = [prompt(60 + i, n) for i, n in enumerate(GRAPH_LENGTHS)]
    want = batch1(target, draft, prompts, GRAPH_BUDGETS, ExactRule(), k=3)
    assert generate_batch(target, draft, prompts, max_new_tokens=GRAPH_BUDGETS, rows=4,
                          k=3) == want
    lm = BatchEngine(target, None, rows=3, max_len=40).target
    assert [lm.prefill_shape(m, n) for m, n in ((1, 1), (2, 16), (2, 17), (3, 33), (5, 40))] \
        == [(1, 16), (2, 16), (2, 32), (3, 40), (3, 40)]
    assert lm.prefill_shapes() == [(3, 40), (3, 32), (2, 40), (2, 32), (3, 16), (1, 40),
                                   (1, 32), (2, 16), (1, 16)]
    monkeypatch.setattr(batch_lm, "PREFILL_TOKENS", 40)  # a pass of one prompt always fits
    assert lm.prefill_shapes() == [(1, 40), (1, 32), (2, 16), (1, 16)]
    # prompt[:-1] of each request, both models (length 1 has nothing to prefill); the
    # engine generate_batch builds has room for 64 here
    assert sorted(n for _, lengths, _ in seen for n in lengths) \
        == sorted([n - 1 for n in GRAPH_LENGTHS if n > 1] * 2)
    assert any(b > len(lengths) for (b, _), lengths, _ in seen)  # 3 admitted at once: 4 rows
    for (b, n), lengths, rows in seen:
        assert (b, n) == (min(2 ** (len(lengths) - 1).bit_length(), 4),
                          next(p for p in (16, 32, 64) if p >= max(lengths)))
        assert len(set(rows[:len(lengths)])) == len(lengths) \
            and rows[len(lengths):] == [rows[len(lengths) - 1]] * (b - len(lengths))
    assert {s for _, _, rows in seen for s in rows} <= {0, 1, 2, 3}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_prefill_same_tokens(pair, near, monkeypatch):
    """On a GPU (float32), COSPEC_PREFILL=graphs replays one graph per padded shape and
    model; every row still equals the batch-1 loop's."""
    monkeypatch.setenv("COSPEC_PREFILL", "graphs")
    target, draft = (copy.deepcopy(m).cuda() for m in (pair[0], near))
    prompts = [prompt(60 + i, n) for i, n in enumerate(GRAPH_LENGTHS)]
    want = batch1(target, draft, prompts, GRAPH_BUDGETS, ExactRule(), k=3)
    eng = BatchEngine(target, draft, k=3, rows=3, max_len=96)
    rid = [eng.submit(p, m) for p, m in zip(prompts, GRAPH_BUDGETS)]
    out: dict[int, list[int]] = {r: [] for r in rid}
    while eng.busy:
        for c in eng.step():
            out[c.rid] += c.tokens
    assert [out[r] for r in rid] == want
    assert {n for _, n in eng.target.prefill_graphs} == {16, 32, 64} \
        == {n for _, n in eng.draft.prefill_graphs}


def test_bad_prefill_mode(pair, monkeypatch):
    """A value of COSPEC_PREFILL other than eager, compiled or graphs is named, not taken as
    any of them; the earlier COSPEC_COMPILE_PREFILL is named too, not ignored."""
    monkeypatch.setenv("COSPEC_PREFILL", "yes")
    with pytest.raises(CospecError, match="COSPEC_PREFILL='yes'"):
        BatchEngine(pair[0], None, rows=2, max_len=64)
    monkeypatch.setenv("COSPEC_PREFILL", "graphs")  # a good value, beside the old setting
    monkeypatch.setenv("COSPEC_COMPILE_PREFILL", "1")
    with pytest.raises(CospecError, match="replaced by COSPEC_PREFILL"):
        BatchEngine(pair[0], None, rows=2, max_len=64)


def test_run_ahead_setting(pair, monkeypatch):
    """COSPEC_RUN_AHEAD=a: a target-only step decodes at most a tokens a row (unset: 8),
    and the rows still give plain greedy decoding's tokens; a value outside 1..8 is named."""
    target = pair[0]
    prompts, budgets = [prompt(70, 5), prompt(71, 9), prompt(72, 3)], (11, 7, 13)
    want = batch1(target, None, prompts, budgets, ExactRule(), k=3)
    for value, ahead in (("3", 3), (None, 8)):
        if value is None:
            monkeypatch.delenv("COSPEC_RUN_AHEAD", raising=False)
        else:
            monkeypatch.setenv("COSPEC_RUN_AHEAD", value)
        eng = BatchEngine(target, None, rows=2, max_len=64)
        assert eng.ahead == ahead
        rid = [eng.submit(p, m) for p, m in zip(prompts, budgets)]
        out: dict[int, list[int]] = {r: [] for r in rid}
        longest = 0
        while eng.busy:
            for c in eng.step():
                out[c.rid] += c.tokens
                longest = max(longest, len(c.tokens))
        assert [out[r] for r in rid] == want and longest == ahead
    monkeypatch.setenv("COSPEC_RUN_AHEAD", "0")
    with pytest.raises(CospecError, match="COSPEC_RUN_AHEAD='0'"):
        BatchEngine(target, None, rows=2, max_len=64)
    with pytest.raises(CospecError, match="run_ahead must be in 1..8"):
        BatchEngine(target, None, rows=2, max_len=64, run_ahead=9)


def decode_with_early(eng: BatchEngine, prompts, budgets, sampling=None):
    """Every prompt through ``eng`` with ``step(early=...)``: (tokens per request, the
    events in order: ("early" | "step", request id, tokens, done, step number))."""
    rid = [eng.submit(p, m, *([sampling, 7 + i] if sampling else []))
           for i, (p, m) in enumerate(zip(prompts, budgets))]
    out: dict[int, list[int]] = {r: [] for r in rid}
    events, n = [], 0
    while eng.busy:
        n += 1
        commits = eng.step(lambda cs, n=n: events.extend(("early", c.rid, c.tokens, c.done, n)
                                                          for c in cs))
        events.extend(("step", c.rid, c.tokens, c.done, n) for c in commits)
    for _, r, toks, _, _ in events:
        out[r] += toks
    return [out[r] for r in rid], events


@pytest.mark.parametrize("sampled", [False, True])
def test_early_first_tokens(pair, sampled):
    """``step(early=...)`` on target-only: each request's first token comes alone, in the
    step it joined and before that step's commits; the request's tokens are the same as
    without it (greedy: plain greedy decoding's; sampled: the same draws); a request ending
    at its first token (budget 1, or EOS) has no commit in the step's return."""
    target = pair[0]
    cfg = SamplingConfig(temperature=1.0) if sampled else None
    prompts = [prompt(80 + i, n) for i, n in enumerate(LENGTHS)]
    budgets = (9, 1, 14, 6, 11, 3)
    want = generate_batch(target, None, prompts, max_new_tokens=budgets,
                          sampling=cfg or SamplingConfig(), seeds=range(7, 7 + len(prompts)),
                          rows=3, run_ahead=4)
    if not sampled:
        assert want == batch1(target, None, prompts, budgets, ExactRule(), k=3)
    eos = [want[4][0]]  # request 4 ends at its first token
    if not sampled:
        want = batch1(target, None, prompts, budgets, ExactRule(), k=3, eos=eos)
    eng = BatchEngine(target, None, rows=3, max_len=64, run_ahead=4,
                      eos_ids=eos if not sampled else ())
    got, events = decode_with_early(eng, prompts, budgets, cfg)
    assert got == want
    for r in range(len(prompts)):
        mine = [e for e in events if e[1] == r]
        assert mine[0][0] == "early" and len(mine[0][2]) == 1
        assert [e[0] for e in mine[1:]] == ["step"] * (len(mine) - 1)  # one early commit
        joined = mine[0][4]
        later = [e for e in mine[1:] if e[4] == joined]  # the rest of its first step
        assert len(later) == (0 if mine[0][3] else 1)
        assert mine[-1][3] and sum(len(e[2]) for e in mine) == len(want[r])
    assert [e for e in events if e[1] == 1][0][3]  # budget 1: done at once
    if not sampled:
        assert [e for e in events if e[1] == 4][0][3]  # EOS first: done at once
    assert {e[4] for e in events if e[0] == "early"} != {1}  # requests joined later steps too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_early_first_tokens(pair):
    """On a GPU (float32, CUDA graphs) the first tokens handed over early, from the pinned
    copy taken after the first forward, are the rows' own, and the rest follows them."""
    target = copy.deepcopy(pair[0]).cuda()
    prompts = [prompt(80 + i, n) for i, n in enumerate(LENGTHS)]
    budgets = (9, 1, 14, 6, 11, 3)
    want = batch1(target, None, prompts, budgets, ExactRule(), k=3)
    eng = BatchEngine(target, None, rows=3, max_len=64, run_ahead=4)
    got, events = decode_with_early(eng, prompts, budgets)
    assert got == want
    assert [e[2] for e in events if e[0] == "early"] == [[w[0]] for w in want]


def test_early_only_where_a_step_decodes_more(pair):
    """spd (one verify a step) and a run-ahead of 1 hand nothing early."""
    target, draft = pair
    prompts, budgets = [prompt(90, 4), prompt(91, 6)], (5, 7)
    for eng in (BatchEngine(target, draft, k=2, rows=2, max_len=64),
                BatchEngine(target, None, rows=2, max_len=64, run_ahead=1)):
        got, events = decode_with_early(eng, prompts, budgets)
        assert {e[0] for e in events} == {"step"}
        proposer = draft if eng.draft is not None else None
        assert got == batch1(target, proposer, prompts, budgets, ExactRule(), k=2)


@pytest.mark.parametrize("method", ["target", "spd", "cospec", "cos-we"])
def test_rows_move_down_when_the_bucket_shrinks(pair, near, method, monkeypatch):
    """Four requests in four slots, the first three short: once they end, the long one in
    slot 3 moves to slot 0 (a bucket of 1 row, not 4), its K/V and state with it, and its
    tokens are those it gets alone in a one-slot engine, greedy and (but cospec) sampled,
    seeded. Six
    requests through three slots, ending at different steps: every move goes down, and
    every request's tokens are its own alone."""
    from cospec.cos import Combination

    target, draft = pair
    kw = {"target": {}, "spd": {"k": 3}, "cospec": {"k": 3, "policy": ConfidencePolicy(0.3)},
          "cos-we": {"k": 3, "combo": Combination("we", (0.5, 0.5))}}[method]
    proposer = None if method == "target" else near
    moves, move = [], BatchEngine._move
    monkeypatch.setattr(BatchEngine, "_move", lambda self, a, b: (moves.append((a, b)),
                                                                   move(self, a, b)))
    prompts = [prompt(20 + i, n) for i, n in enumerate((4, 6, 3, 9))]
    budgets = [3, 5, 2, 30]
    samplings = [SamplingConfig()] + ([SamplingConfig(temperature=1.0)]
                                      if method != "cospec" else [])  # its arbiter: greedy
    for sampling in samplings:
        moves.clear()
        got = generate_batch(target, proposer, prompts, max_new_tokens=budgets, rows=4,
                             sampling=sampling, seeds=[7, 8, 9, 10], **kw)
        assert moves == [(3, 0)]
        alone = generate_batch(target, proposer, prompts[3:], max_new_tokens=budgets[3:],
                               rows=1, sampling=sampling, seeds=[10], **kw)
        assert got[3] == alone[0] and len(got[3]) == 30
    more = [prompt(30 + i, 3 + i) for i in range(6)]
    budgets = [2, 11, 4, 13, 6, 9]
    moves.clear()
    got = generate_batch(target, proposer, more, max_new_tokens=budgets, rows=3, **kw)
    assert all(dst < src for src, dst in moves)
    assert got == [generate_batch(target, proposer, [p], max_new_tokens=[m], rows=1, **kw)[0]
                   for p, m in zip(more, budgets)]


def test_submit_and_step(pair):
    """The scheduler API: requests join between steps into freed slots (lowest first), each
    step returns every live request's commit, a finished request leaves at once."""
    target, draft = pair
    eng = BatchEngine(target, draft, k=2, rows=2, max_len=64)
    a = eng.submit(prompt(0, 4), max_new_tokens=3)
    b = eng.submit(prompt(1, 6), max_new_tokens=12)
    first = eng.step()
    assert [c.rid for c in first] == [a, b]
    c = eng.submit(prompt(2, 2), max_new_tokens=5)
    seen: dict[int, list[int]] = {a: [], b: [], c: []}
    for commit in first:
        seen[commit.rid] += commit.tokens
    while eng.busy:
        for commit in eng.step():
            seen[commit.rid] += commit.tokens
            assert commit.done == (len(seen[commit.rid]) == {a: 3, b: 12, c: 5}[commit.rid])
    assert eng.slots == [None, None]
    want = batch1(target, draft, [prompt(0, 4), prompt(1, 6), prompt(2, 2)], (3, 12, 5),
                  ExactRule(), k=2)
    assert [seen[a], seen[b], seen[c]] == want


def test_row_probabilities_match_sampling(pair):
    """Per-row temperature / top-k / top-p (and greedy rows) as ``sampling.probabilities``."""
    configs = [SamplingConfig(), SamplingConfig(temperature=0.7),
               SamplingConfig(temperature=1.3, top_k=5), SamplingConfig(0.9, top_p=0.8),
               SamplingConfig(1.0, top_p=0.5, top_k=10)]
    logits = torch.randn(len(configs), 3, 96, generator=torch.Generator().manual_seed(0)) * 3
    s = RowSampling(
        torch.tensor([1.0 if c.greedy else c.temperature for c in configs]),
        torch.tensor([c.top_k or 96 for c in configs]), torch.tensor([c.top_p for c in configs]),
        torch.tensor([c.greedy for c in configs]), False, True, True, True)
    got = row_probabilities(logits, s)
    for i, c in enumerate(configs):
        torch.testing.assert_close(got[i], probabilities(logits[i], c), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["spd", "lookup"])
def test_draws_depend_on_the_row_only(pair, method):
    """A row's sampled tokens are a function of its seed: the same alone as beside others,
    in any slot (lookup: whether or not the other rows propose anything)."""
    target, draft = pair
    cfg = SamplingConfig(temperature=1.0)
    prompts = [prompt(20 + i, n) * (2 if i % 2 else 1) for i, n in enumerate(LENGTHS)]
    kw = dict(lookup=True) if method == "lookup" else {}
    draft = draft if method == "spd" else None
    together = generate_batch(target, draft, prompts, max_new_tokens=12, sampling=cfg,
                              seeds=range(6), rows=6, k=3, **kw)
    for i in (2, 3):
        alone = generate_batch(target, draft, prompts[i:i + 1], max_new_tokens=12,
                               sampling=cfg, seeds=[i], k=3, **kw)
        assert alone[0] == together[i]
    u = uniforms(torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]), 4)
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])


def test_bad_requests(pair):
    target, draft = pair
    eng = BatchEngine(target, draft, k=2, rows=2, max_len=32, policy=ConfidencePolicy(0.2))
    with pytest.raises(CospecError, match="empty"):
        eng.submit([])
    with pytest.raises(CospecError, match="fit"):
        eng.submit(prompt(0, 20), max_new_tokens=12)
    with pytest.raises(CospecError, match="temperature 0"):
        eng.submit(prompt(0, 3), 8, sampling=SamplingConfig(temperature=1.0))


# ---------------------------------------------------------------- exactness at T > 0

VOCAB = 8
NEW = 4                # tokens per generation: k = 3 drafts, the bonus, a second block
CFG = SamplingConfig(temperature=0.9, top_p=0.9, top_k=5)
PROMPT = [2, 5, 3]
SAMPLES = 4000
ALPHA = 1e-4


@pytest.fixture(scope="module")
def toy():
    return (tiny_model(3, vocab=VOCAB, dtype=torch.float32),
            tiny_model(4, layers=1, vocab=VOCAB, dtype=torch.float32))


def exact_joint(model) -> dict[tuple[int, ...], float]:
    """P(first NEW tokens) for every sequence of nonzero probability (uncached forwards)."""
    return joint_of(lambda x: probabilities(model(x).logits[0, -1].double(), CFG), PROMPT, NEW)


def test_toy_pair_has_power(toy):
    """The joints of target and draft are far apart (a draft-distributed output would fail)
    and neither is near-certain."""
    p, q = exact_joint(toy[0]), exact_joint(toy[1])
    tv = 0.5 * sum(abs(p.get(c, 0) - q.get(c, 0)) for c in p.keys() | q.keys())
    assert tv > 0.2 and len(p) >= 30 and max(p.values()) < 0.3


@pytest.mark.parametrize("method", ["target", "spd", "lookup"])
def test_sampled_blocks_follow_the_exact_joint(toy, method):
    """``lookup``: the proposals come from the prompt and the tokens so far (8 tokens of
    vocabulary: most steps propose), checked against one-hot proposals."""
    target, draft = toy
    probs = exact_joint(target)
    stats = DecodeStats()
    out = generate_batch(target, draft if method == "spd" else None, [PROMPT] * SAMPLES,
                         max_new_tokens=NEW, sampling=CFG, seeds=range(SAMPLES), rows=64, k=3,
                         lookup=method == "lookup", stats=stats)
    assert_follows(out, probs, NEW, ALPHA)
    if method == "lookup":
        assert 0 < stats.accepted < stats.drafted and stats.steps < stats.generated
