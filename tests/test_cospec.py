"""CoSpec: arbiter rule, lockstep equivalence, arbiter files, training."""

import copy
from dataclasses import dataclass

import pytest
import torch

from cospec import arbiter
from cospec.acceptance import ExactRule
from cospec.arbiter import (
    FEATURES,
    ArbiterRule,
    ConfidencePolicy,
    ConstantPolicy,
    EntropyPolicy,
    LearnedPolicy,
    load_arbiter,
    save_arbiter,
)
from cospec.batched import lockstep
from cospec.decoding import generate
from cospec.errors import CospecError
from cospec.stats import DecodeStats
from cospec.train import evaluate_policy, reinforce


def prompts(n=5):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, 96, (int(torch.randint(2, 12, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def loop(target, draft, ids, rule, k, n=30, stats=None):
    return [t.id for t in generate(target, draft, ids, rule, k=k, max_new_tokens=n,
                                   eos_ids=[1], stats=stats)]


@pytest.mark.parametrize("k", [1, 4])
def test_always_target_arbiter_is_spd_is_target(target, draft, k):
    for ids in prompts(3):
        want = loop(target, None, ids, ExactRule(), k)
        stats = DecodeStats()
        assert loop(target, draft, ids, ArbiterRule(ConstantPolicy(0.0)), k, stats=stats) == want
        assert loop(target, draft, ids, ExactRule(), k) == want
        assert stats.overrides == 0 and stats.arbiter_calls > 0


def noisy_copy(model, scale: float):
    """The model with Gaussian noise of std ``scale`` added to every weight (a draft that
    agrees with it often but not always)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


@pytest.mark.parametrize("noise", [None, 0.0, 0.005])
def test_lookahead_costs_no_draft_pass(target, draft, noise):
    """CoSpec's bonus-position token costs the draft nothing: with an always-TARGET arbiter
    the draft runs exactly spd's forward passes over exactly spd's tokens (the lookahead is
    the catch-up on [d_k, bonus], done one step early, and its row after the bonus starts the
    next block), but for a last block that ends full, whose catch-up spd never needs. Drafts:
    the tiny draft (blocks rarely full), a copy of the target (every block full, the reused
    row starts each one), a noisy copy (both, and mismatches at the bonus position)."""
    proposer = draft if noise is None else noisy_copy(target, noise)  # its own hook
    fed = []
    hook = proposer.register_forward_pre_hook(
        lambda mod, args, kw: fed.append(kw["input_ids"][0].tolist()), with_kwargs=True)
    try:
        for ids in prompts(4):
            fed.clear()
            want = loop(target, proposer, ids, ExactRule(), 4)
            spd = list(fed)
            fed.clear()
            stats = DecodeStats()
            got = loop(target, proposer, ids, ArbiterRule(ConstantPolicy(0.0)), 4, stats=stats)
            assert got == want and fed[:len(spd)] == spd and len(fed) - len(spd) in (0, 1)
            assert (stats.accepted == stats.drafted) == (noise == 0.0)
    finally:
        hook.remove()


def test_always_draft_is_the_draft_greedy_path(target, draft):
    """Keeping the draft token at every mismatch reproduces the draft's own greedy output."""
    for ids in prompts(3):
        want = loop(draft, None, ids, ExactRule(), 1)
        stats = DecodeStats()
        assert loop(target, draft, ids, ArbiterRule(ConstantPolicy(1.0)), 3, stats=stats) == want
        assert stats.overrides == stats.arbiter_calls > 0


def test_first_mismatch_only_by_hand(target, draft):
    """Always-DRAFT at the first mismatch of each block, by hand: walk the target's and the
    draft's greedy choices block by block."""
    ids, k, n = prompts(1)[0], 3, 20

    def best(model, seq):
        with torch.no_grad():
            return int(model(torch.tensor([seq])).logits[0, -1].argmax())

    seq, out = list(ids), []
    while len(out) < n:
        first_used = False
        for i in range(k + 1):  # k drafts, then the bonus position
            t = best(target, seq)
            d = best(draft, seq)
            if d == t or (not first_used and i <= k):
                tok = d
                if d != t:
                    first_used = True
            else:
                tok = t
            seq.append(tok)
            out.append(tok)
            if (d != t and tok == t) or i == k or len(out) == n:
                break
    rule = ArbiterRule(ConstantPolicy(1.0), every_mismatch=False)
    got = [t.id for t in generate(target, draft, ids, rule, k=k, max_new_tokens=n)]
    assert got == out[:n]


@pytest.mark.parametrize("policy", [None, ConstantPolicy(1.0), ConfidencePolicy(0.3),
                                    EntropyPolicy(2.0)])
def test_lockstep_equals_the_batch1_loop(target, draft, policy):
    ps = prompts(5)
    res = lockstep(target, draft, ps, max_new_tokens=25, eos_ids=[1], pad_id=0, batch_size=3,
                   policy=policy, record=True)
    for ids, r in zip(ps, res):
        rule = ExactRule() if policy is None else ArbiterRule(policy)
        for k in (1, 4):
            stats = DecodeStats()
            assert loop(target, draft, ids, rule, k, 25, stats) == r.tokens
        if policy is not None:
            assert r.overrides == stats.overrides
        assert len(r.divergences) == r.mismatches


def hidden_policy(target, draft_size=0, seed=0):
    """A random linear arbiter over features and the target's (and draft's) hidden state."""
    torch.manual_seed(seed)
    pol = LearnedPolicy(len(FEATURES), (target.config.hidden_size, draft_size), 0)
    pol.std.fill_(0.5)
    return pol.eval()


@pytest.mark.parametrize("budget", [None, 0, 2])
def test_hidden_state_arbiter_and_budget_lockstep_equals_the_batch1_loop(target, draft,
                                                                         budget):
    """Hidden-state features (target only, or both models) and a budget of overrides give
    the same tokens in the lockstep decoder as in the batch-1 loop."""
    ps = prompts(4)
    for pol in (hidden_policy(target), hidden_policy(target, draft.config.hidden_size, 1)):
        res = lockstep(target, draft, ps, max_new_tokens=25, eos_ids=[1], pad_id=0,
                       batch_size=2, policy=pol, max_overrides=budget)
        rule = ArbiterRule(pol, max_overrides=budget)
        kept = 0
        for ids, r in zip(ps, res):
            stats = DecodeStats()
            assert loop(target, draft, ids, rule, 3, 25, stats) == r.tokens
            assert r.overrides == stats.overrides
            assert budget is None or stats.overrides <= budget
            kept += stats.overrides
        assert kept > 0 or budget == 0


def test_prefill_token_cap_splits_batches_without_changing_tokens(target, draft):
    from cospec.batched import _chunks

    ps = prompts(6)
    order = sorted(range(6), key=lambda i: len(ps[i]))
    chunks = _chunks(order, ps, 4, 20)
    assert [i for c in chunks for i in c] == order
    assert all(len(c) <= 4 and (len(c) == 1 or len(c) * max(len(ps[i]) for i in c) <= 20)
               for c in chunks)
    want = lockstep(target, draft, ps, max_new_tokens=12, eos_ids=[1], pad_id=0,
                    batch_size=6, policy=ConstantPolicy(1.0))
    got = lockstep(target, draft, ps, max_new_tokens=12, eos_ids=[1], pad_id=0,
                   batch_size=6, policy=ConstantPolicy(1.0), max_prefill_tokens=20)
    assert [r.tokens for r in got] == [r.tokens for r in want]


def test_budget_of_one_keeps_only_the_first_draft_token(target, draft):
    """Always-DRAFT with a budget of one: the draft's token at the first mismatch, then the
    target's greedy continuation of that prefix (by hand)."""
    for ids in prompts(3):
        plain = loop(target, None, ids, ExactRule(), 1)
        drafted = loop(draft, None, ids, ExactRule(), 1)
        first = next(i for i, (a, b) in enumerate(zip(plain, drafted)) if a != b)
        prefix = plain[:first] + [drafted[first]]
        want = prefix + loop(target, None, ids + prefix, ExactRule(), 1, 30 - len(prefix))
        stats = DecodeStats()
        got = loop(target, draft, ids, ArbiterRule(ConstantPolicy(1.0), max_overrides=1), 4,
                   stats=stats)
        assert got == want[:len(got)] and stats.overrides == 1


def test_arbiter_file_roundtrip_and_errors(tmp_path):
    pol = LearnedPolicy(len(FEATURES), None, 8)
    path = tmp_path / "new" / "a.safetensors"  # a folder not made yet
    save_arbiter(pol, path, ("tgt", "drf"), {"threshold": 0.7})
    back = load_arbiter(path, ("tgt", "drf"))
    x = torch.randn(4, len(FEATURES))
    torch.testing.assert_close(back.draft_prob(x), pol.draft_prob(x))
    assert back.threshold == 0.7
    with pytest.raises(CospecError, match="trained for"):
        load_arbiter(path, ("other", "drf"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CospecError):
        load_arbiter(bad)
    with pytest.raises(CospecError, match="not found"):
        load_arbiter(tmp_path / "missing.safetensors")


def test_reinforce_learns_where_the_draft_helps():
    """Synthetic bandit: the draft branch is right exactly when feature 0 > 0."""
    g = torch.Generator().manual_seed(0)
    points = []
    for i in range(600):
        f = torch.randn(len(FEATURES), generator=g).tolist()
        points.append({"id": f"p{i}", "features": f, "draft_correct": f[0] > 0,
                       "target_correct": f[0] <= 0})
    pol = reinforce(points[:400], epochs=300, hidden_units=0)
    ev = evaluate_policy(pol, points[400:], 0.5)
    assert ev["oracle_agreement"] > 0.9
    assert ev["single_flip_gain"] > 0.8 * ev["draft_better"]


def test_validation_split_is_the_requested_share_of_gsm8k_dev():
    from cospec.tasks import get_task
    from cospec.train import split_by_problem

    points = [{"id": p.id} for p in get_task("gsm8k").problems("dev")]
    train, val = split_by_problem(points, 0.2)
    assert 0.15 < len(val) / len(points) < 0.25
    assert not {p["id"] for p in train} & {p["id"] for p in val}


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a GPU"))])
def test_row_stats_match_their_definition(device):
    """The arbiter's row statistics (on CUDA: a replayed graph per row count, called again
    with other rows and another count) equal log-softmax / entropy / top-5 computed plainly."""
    from contextlib import nullcontext

    arbiter._GRAPHED.clear()  # built inside inference mode below, then used outside it
    g = torch.Generator().manual_seed(0)
    for j, n in enumerate((1, 3, 1)):
        t, d = (torch.randn(n, 1000, generator=g) * 3 for _ in range(2))
        ids = torch.randint(0, 1000, (2 * n, 2), generator=g)
        with torch.inference_mode() if j == 0 else nullcontext():
            got = arbiter.row_stats([t.to(device), d.to(device)], ids).cpu()
        logp = torch.cat([t, d]).log_softmax(-1)
        want = torch.cat([logp.gather(1, ids), -(logp.exp() * logp).sum(-1, keepdim=True),
                          logp.topk(5, dim=-1).values], dim=-1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_features_in_torch_are_the_numpy_ones():
    """The features' arithmetic run in torch (inside ``GraphedDecision``'s graph) gives what
    the numpy version gives (the host path)."""
    g = torch.Generator().manual_seed(3)
    row, pos = torch.randn(6, 8, generator=g), torch.tensor([0.0, 7.0, 300.0])
    want = arbiter._combine(row.numpy(), 3, pos.numpy())
    torch.testing.assert_close(arbiter._combine(row, 3, pos, torch), torch.from_numpy(want))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@needs_cuda
def test_graphed_decision_is_the_host_path():
    """A whole decision as one CUDA graph (rows, ids and position written in, one probability
    read back) equals features + policy on the host, for each kind of policy, call after
    call with new inputs; a policy changed in place is captured again."""
    g = torch.Generator().manual_seed(5)
    learned = LearnedPolicy(len(FEATURES), hidden_units=8).eval()
    with torch.no_grad():
        learned.mean.normal_(generator=g)
    policies = (ConstantPolicy(1.0), ConfidencePolicy(0.3), EntropyPolicy(4.0), learned)
    for policy in policies:
        rule = ArbiterRule(policy)
        for step in range(4):
            t_row, d_row = (torch.randn(1, 500, generator=g) * 3 for _ in range(2))
            t, d, pos = int(t_row.argmax()), int(d_row.argmax()), 10 * step
            feats = arbiter.mismatch_features(t_row, d_row, [t], [d], [pos])
            want = float(policy.draft_prob(feats)[0])
            if rule._graph is None or not rule._graph.fits(policy, torch.device("cuda:0"), 500):
                rule._graph = arbiter.GraphedDecision(policy, torch.device("cuda:0"), 500)
            got = rule._graph(t_row.cuda(), d_row.cuda(), t, d, pos)
            assert abs(got - want) < 1e-4, (policy, step)
            if policy is learned and step == 1:
                graph = rule._graph
                with torch.no_grad():
                    learned.net[0].bias.add_(1.0)
                assert not graph.fits(learned, torch.device("cuda:0"), 500)


@needs_cuda
@pytest.mark.parametrize("policy", [ConfidencePolicy(0.3), "learned"])
def test_graphed_decisions_give_the_host_paths_tokens(target, draft, policy):
    """CoSpec on CUDA decides through the graph; the tokens and decisions equal those of the
    host path (``graphed=False``) on the same models."""
    if policy == "learned":  # keep d when p_t(t) / p_t(d) < e^3, steeply (decisive)
        policy = LearnedPolicy(len(FEATURES), hidden_units=0).eval()
        with torch.no_grad():
            policy.net.weight.zero_()
            policy.net.weight[0, FEATURES.index("gap_t")] = -10.0
            policy.net.bias.fill_(30.0)
    t_gpu, d_gpu = copy.deepcopy(target).cuda(), copy.deepcopy(draft).cuda()
    kept = 0
    for ids in prompts(3):
        got, want = DecodeStats(), DecodeStats()
        rule = ArbiterRule(policy)
        a = loop(t_gpu, d_gpu, ids, rule, 4, 30, got)
        assert rule._graph is not None  # the graph decided
        b = loop(t_gpu, d_gpu, ids, ArbiterRule(policy, graphed=False), 4, 30, want)
        assert a == b and (got.arbiter_calls, got.overrides) == (want.arbiter_calls,
                                                               want.overrides)
        kept += got.overrides
    assert kept


@dataclass
class HostOnlyPolicy:
    """A user's policy that reads its features on the host (cannot be graph-captured)."""

    needs_hidden: bool = False

    def draft_prob(self, features, target_hidden=None, draft_hidden=None):
        margin = features[:, FEATURES.index("margin_t")].cpu().numpy()
        return torch.from_numpy((margin < 0.5).astype("float32"))


@needs_cuda
def test_a_policy_that_cannot_be_captured_decides_on_the_host(target, draft):
    """A policy that cannot run inside a CUDA graph gets a warning and the host path: the
    tokens of ``graphed=False``, not a crash."""
    t_gpu, d_gpu = copy.deepcopy(target).cuda(), copy.deepcopy(draft).cuda()
    ids = prompts(1)[0]
    rule = ArbiterRule(HostOnlyPolicy())
    with pytest.warns(UserWarning, match="cannot run inside a CUDA graph"):
        got = loop(t_gpu, d_gpu, ids, rule, 4, 30)
    assert not rule.graphed
    assert got == loop(t_gpu, d_gpu, ids, ArbiterRule(HostOnlyPolicy(), graphed=False), 4, 30)


@pytest.mark.parametrize("hidden_units", [0, 8])
def test_one_row_policy_path_is_the_batched_one(hidden_units):
    """A learned policy asked for one row (the decoding loop; computed in numpy) gives what
    it gives for that row within a batch (torch)."""
    torch.manual_seed(0)
    pol = LearnedPolicy(len(FEATURES), hidden_units=hidden_units)
    pol.mean.normal_()
    pol.std.uniform_(0.5, 2.0)
    x = torch.randn(6, len(FEATURES)) * 2
    batch = pol.draft_prob(x)
    rows = torch.cat([pol.draft_prob(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(rows, batch, atol=1e-6, rtol=1e-5)


def test_refine_step_follows_the_advantage():
    """One on-policy step raises pi(DRAFT) where keeping the draft token came with a positive
    advantage and lowers it where it came with a negative one; group advantages are centred."""
    from cospec.refine import advantages, policy_step

    assert advantages([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 3) == pytest.approx(
        [2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0])
    torch.manual_seed(0)
    pol = LearnedPolicy(len(FEATURES), hidden_units=8)
    good, bad = torch.randn(len(FEATURES)), torch.randn(len(FEATURES))
    x = torch.stack([good, bad])
    before = pol.draft_prob(x)
    opt = torch.optim.SGD(pol.parameters(), lr=0.5)
    for _ in range(5):
        loss = policy_step(pol, opt, [(good.tolist(), True, 1.0), (bad.tolist(), True, -1.0)])
    after = pol.draft_prob(x)
    assert loss != 0.0 and after[0] > before[0] and after[1] < before[1]
    assert policy_step(pol, opt, [(good.tolist(), True, 0.0)]) == 0.0  # no signal, no step


def test_refine_recentres_the_start_policy_at_its_threshold():
    from cospec.refine import recentre

    torch.manual_seed(1)
    pol = LearnedPolicy(len(FEATURES), hidden_units=8)
    x = torch.randn(200, len(FEATURES)) * 3
    before = pol.draft_prob(x)
    vals = before.sort().values
    th = float(vals[159] + vals[160]) / 2  # between two policy values: no tie to round
    recentre(pol, th)
    assert torch.equal(pol.draft_prob(x) >= 0.5, before >= th)
