"""CoS in the batched engine (``cospec.fast_batch_cos``) against ``cospec.cos``'s batch-1 loop.

At T = 0 every row must give exactly the tokens ``cos.cos_generate`` gives it alone (cos-we,
cos-cd, we-sd, cos-we with three models), with rows of different prompt lengths joining as
slots free up and leaving at EOS or at their budgets; the alternate proposal must have been
both kept and turned down. At T > 0 the first four tokens of a prompt, sampled N times
through the batch with k = 2 (a block, the pending proposal, the block after it), must
follow the exact joint of the combination r (enumerated from both models' uncached
forwards with the reference of ``test_exactness``), chi-square tested. On CPU, float32,
tiny random Qwen2 models.
"""

from __future__ import annotations

import copy

import pytest
import torch
from distribution import assert_follows
from distribution import exact_joint as joint_of
from test_exactness import CFG, LAM, MU, combined
from test_fast_batch import BUDGETS, LENGTHS, prompt
from tiny import near_copy, tiny_model

from cospec import fast_batch
from cospec.arbiter import ConfidencePolicy
from cospec.cos import Combination, cos_generate
from cospec.errors import CospecError
from cospec.fast_batch import BatchEngine, generate_batch
from cospec.sampling import SamplingConfig
from cospec.stats import DecodeStats

WE = Combination("we", (0.5, 0.5))
CD = Combination("cd", mu=0.1)
WE3 = Combination("we", (0.2, 0.3, 0.5))


@pytest.fixture(scope="module")
def models():
    """target, a random draft, a third model (fp32), and the target perturbed by 5 % (a
    draft the target often agrees with)."""
    target = tiny_model(1, dtype=torch.float32)
    return (target, tiny_model(2, layers=1, dtype=torch.float32),
            tiny_model(4, layers=1, dtype=torch.float32), near_copy(target, 0.05))


def batch1(models, combo, method, prompts, budgets, k, eos=()):
    return [[t.id for t in cos_generate(list(models), p, combo, method, gamma=k,
                                        max_new_tokens=m, eos_ids=eos)]
            for p, m in zip(prompts, budgets)]


def alternates(stats: DecodeStats, k: int) -> tuple[int, int]:
    """(alternate proposals verified, kept): each counts as one drafted token beside the
    blocks of k, and ``accepted_at`` sums the blocks' accepted drafts only."""
    proposed = stats.drafted - stats.steps * k
    return proposed, stats.accepted - sum(stats.accepted_at)


@pytest.mark.parametrize("method", ["cos-we", "cos-we-random", "cos-cd", "we-sd", "cos-we-3"])
def test_greedy_rows_equal_batch_one(models, method, monkeypatch):
    """Six prompts through three slots, k = 3: later rows join as earlier ones finish; one
    EOS id (taken from a row's own output) ends some rows before their budgets. Proposers:
    the near draft, a random one; three models: near, a random one, the target. The cache
    span attended over grows from step to step (MIN_SPAN 8)."""
    monkeypatch.setattr(fast_batch, "MIN_SPAN", 8)
    target, draft, third, near = models
    group, combo = {"cos-we": ((near, target), WE), "cos-we-random": ((draft, target), WE),
                    "cos-cd": ((near, target), CD), "we-sd": ((near, target), WE),
                    "cos-we-3": ((near, third, target), WE3)}[method]
    name = method.removesuffix("-3").removesuffix("-random")
    prompts = [prompt(30 + i, n) for i, n in enumerate(LENGTHS)]
    free = batch1(group, combo, name, prompts, BUDGETS, k=3)
    eos = [free[1][6]]
    want = batch1(group, combo, name, prompts, BUDGETS, k=3, eos=eos)
    stats = DecodeStats()
    got = generate_batch(target, group[0], prompts, max_new_tokens=BUDGETS, rows=3, k=3,
                         eos_ids=eos, stats=stats, combo=combo, middle=group[1:-1],
                         alternate=name.startswith("cos"))
    assert got == want
    assert any(len(w) < m for w, m in zip(want, BUDGETS))        # some row stopped at EOS
    assert any(len(w) == m for w, m in zip(want, BUDGETS))       # some ran to the budget
    assert stats.generated == sum(map(len, want))
    assert 0 < sum(stats.accepted_at) < 3 * stats.steps          # drafts kept and rejected
    proposed, kept = alternates(stats, 3)
    if name.startswith("cos"):
        assert 0 < kept < proposed  # the alternate proposal was kept and turned down
    else:
        assert proposed == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_same_tokens(models):
    """On a GPU (float32) every forward is a replayed CUDA graph per (rows bucket, tokens),
    the pending proposals' rows kept between them; the rows still equal the batch-1 loop's."""
    target, near = (copy.deepcopy(m).cuda() for m in (models[0], models[3]))
    prompts = [prompt(30 + i, n) for i, n in enumerate(LENGTHS)]
    want = batch1((near, target), WE, "cos-we", prompts, BUDGETS, k=3)
    stats = DecodeStats()
    got = generate_batch(target, near, prompts, max_new_tokens=BUDGETS, rows=4, k=3,
                         stats=stats, combo=WE)
    assert got == want
    proposed, kept = alternates(stats, 3)
    assert 0 < kept < proposed


def test_bad_engines(models):
    target, draft, third, _ = models
    with pytest.raises(CospecError, match="exactly two"):
        BatchEngine(target, draft, rows=2, max_len=32, combo=CD, middle=[third])
    with pytest.raises(CospecError, match="weights"):
        BatchEngine(target, draft, rows=2, max_len=32, combo=WE, middle=[third])
    with pytest.raises(CospecError, match="draft"):
        BatchEngine(target, None, rows=2, max_len=32, combo=WE)
    with pytest.raises(CospecError, match="policy"):
        BatchEngine(target, draft, rows=2, max_len=32, combo=WE, policy=ConfidencePolicy(0.2))
    with pytest.raises(CospecError, match="combination"):
        BatchEngine(target, draft, rows=2, max_len=32, middle=[third])


# ---------------------------------------------------------------- exactness at T > 0

VOCAB = 8
NEW = 4       # tokens per generation
K = 2         # a block of two, the alternate proposal, a block after it
PROMPT = [2, 5, 3]
SAMPLES = 4000
ALPHA = 1e-4
SAMPLED = {"cos-we": Combination("we", (LAM, 1 - LAM)), "cos-cd": Combination("cd", mu=MU),
           "we-sd": Combination("we", (LAM, 1 - LAM))}


@pytest.fixture(scope="module")
def toy():
    """target, and per method a draft whose blocks all pass often enough that hundreds of
    alternate proposals are turned down in SAMPLES generations: a random one for the
    ensemble, the target perturbed by 10 % of its weights' spread for contrastive decoding
    (a random draft's tokens rarely pass r = softmax(l_p - mu l_q))."""
    target = tiny_model(3, vocab=VOCAB, dtype=torch.float32)
    rand = tiny_model(4, layers=1, vocab=VOCAB, dtype=torch.float32)
    return target, {"cos-we": rand, "we-sd": rand, "cos-cd": near_copy(target, 0.1)}


def exact_joint(method: str, draft, target) -> dict[tuple[int, ...], float]:
    """P(first NEW tokens) of the method's combination r (uncached forwards, float64)."""
    return joint_of(lambda x: combined(method, draft(x).logits[0, -1].double(),
                                       target(x).logits[0, -1].double()), PROMPT, NEW)


def test_toy_combinations_have_power(toy):
    """The joints of r (we, cd) are far from each other and from the target's own, so an
    output drawn from the wrong one (e.g. a wrong residual) fails."""
    target, drafts = toy
    joints = [exact_joint(m, drafts[m], target) for m in ("cos-we", "cos-cd")]
    joints.append(exact_joint("spd", drafts["cos-we"], target))  # the target's own
    for i, a in enumerate(joints):
        for b in joints[i + 1:]:
            assert 0.5 * sum(abs(a.get(c, 0) - b.get(c, 0)) for c in a.keys() | b.keys()) > 0.1


@pytest.mark.parametrize("method", list(SAMPLED))
def test_sampled_blocks_follow_the_exact_joint(toy, method):
    target, drafts = toy
    probs = exact_joint(method, drafts[method], target)
    stats = DecodeStats()
    out = generate_batch(target, drafts[method], [PROMPT] * SAMPLES, max_new_tokens=NEW,
                         sampling=CFG, seeds=range(SAMPLES), rows=64, k=K, stats=stats,
                         combo=SAMPLED[method], alternate=method.startswith("cos"))
    assert_follows(out, probs, NEW, ALPHA)
    proposed, kept = alternates(stats, K)
    assert (100 < kept < proposed - 400) if method.startswith("cos") else proposed == 0


def test_draws_depend_on_the_row_only(models):
    """A sampled row (pending proposals included) is a function of its seed: the same alone
    as beside others, in any slot."""
    target, draft, _, _ = models
    prompts = [prompt(40 + i, n) for i, n in enumerate(LENGTHS)]
    kw = dict(max_new_tokens=12, sampling=SamplingConfig(temperature=1.0), k=3, combo=WE)
    together = generate_batch(target, draft, prompts, seeds=range(6), rows=6, **kw)
    alone = generate_batch(target, draft, prompts[3:4], seeds=[3], **kw)
    assert alone[0] == together[3]
