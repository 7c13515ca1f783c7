"""Sampled speculative decoding with each block on the device (``device_blocks.sampled_block``)
draws exactly the target's processed distribution.

The first three generated tokens of sampled spd (k = 2, temperature, top-k and top-p on)
through ``fast_block.stream`` are compared with the target's exact joint, enumerated from
its plain forward (``distribution.exact_joint``), and each position's marginal, over
SAMPLES generations, one seed each. k = 2 and three tokens: the first block covers drafts
that stand, the token drawn from the residual at each draft position and the bonus past
them; a second block follows where the first commits fewer than three. Drafts: a near copy
of the target (about half its tokens stand) and an independent model (nearly none do); and
spd-staged's block (``guessed_sampled_block``), whose first draft step also checks two
prompt-lookup guesses, on a prompt that repeats itself. cos-we and cos-cd
(``ruled_sampled_block``) against the joint of their combination r.

Tiny transformers on the fast path's engines (COSPEC_STATIC=1 on the CPU): about 7 ms a
generation. Power as in ``test_exactness`` (joints of at most TOP_K ** NEW = 27 cells): at
ALPHA = 1e-4 and 2,000 samples the joint test detects a chi-square distance of about 0.03.
"""

from __future__ import annotations

import pytest
import torch
from distribution import assert_follows, exact_joint
from tiny import near_copy, tiny_model

from cospec import fast, fast_block
from cospec.block_choice import arbiter_choice, combination_choice
from cospec.cos import Combination
from cospec.errors import CospecError
from cospec.sampling import GREEDY, SamplingConfig, probabilities
from cospec.stats import DecodeStats

CFG = SamplingConfig(temperature=0.9, top_k=3, top_p=0.95)
PROMPT = [5, 17, 33]
REPEATS = [5, 17, 33, 92, 89, 92, 39, 39, 39, 92, 89]  # the lookup guesses [92, 39] after it
GUESSES = 2
NEW = 3
K = 2
SAMPLES = 2000
ALPHA = 1e-4


@pytest.fixture(scope="module")
def target():
    return tiny_model(11, dtype=torch.float32)


def samples(target, draft, prompt: list[int], stats: DecodeStats, **kw) -> list[list[int]]:
    """SAMPLES generations of NEW tokens through ``fast_block.stream`` at CFG, seeds 0..;
    ``kw``: its guesses or choice."""
    return [[t.id for t in fast_block.stream(target, draft, prompt, k=K, max_new_tokens=NEW,
                                             sampling=CFG, seed=seed, stats=stats, **kw)]
            for seed in range(SAMPLES)]


def draft_of(target, name: str) -> torch.nn.Module:
    return near_copy(target, 0.05) if name == "near" else tiny_model(12, layers=1,
                                                                     dtype=torch.float32)


@pytest.mark.parametrize("name, guesses", [("near", 0), ("other", 0), ("near", GUESSES)])
def test_sampled_blocks_follow_the_targets_joint(monkeypatch, target, name, guesses):
    """N generations of three tokens against the target's exact joint (and marginals); the
    near draft's proposals stand often, the other's seldom. With guesses (spd-staged's
    ``guessed_sampled_block``, on a prompt that repeats itself so that the lookup guesses in
    the first block): some guesses stand, so blocks propose more than k."""
    monkeypatch.setenv("COSPEC_STATIC", "1")
    draft, prompt = draft_of(target, name), REPEATS if guesses else PROMPT
    probs = exact_joint(lambda ids: probabilities(target(ids).logits[0, -1], CFG), prompt, NEW)
    stats = DecodeStats()
    assert_follows(samples(target, draft, prompt, stats, guesses=guesses), probs, NEW, ALPHA)
    rate = stats.accepted / stats.drafted
    assert rate > 0.3 if name == "near" else rate < 0.3, rate
    assert (stats.drafted > 1.2 * K * stats.steps) == bool(guesses), stats.drafted / stats.steps


@pytest.mark.parametrize("kind", ["we", "cd"])
def test_sampled_cos_blocks_follow_the_combinations_joint(monkeypatch, target, kind):
    """cos-we and cos-cd at T > 0 (``ruled_sampled_block``, the pending token's alternate
    proposal): N generations of three tokens against the exact joint of r, the combination
    of both models' processed rows, and its marginals; the drafts stand often, and tokens
    are left pending (every draft of a block stood) and taken up by the next block."""
    monkeypatch.setenv("COSPEC_STATIC", "1")
    draft = draft_of(target, "near")
    combo = Combination("we", (0.5, 0.5)) if kind == "we" else Combination("cd", mu=0.5)
    probs = exact_joint(lambda ids: combo.probs([draft(ids).logits[0, -1],
                                                 target(ids).logits[0, -1]], CFG), PROMPT, NEW)
    choice = combination_choice(combo, torch.device("cpu"))
    stats = DecodeStats()
    assert_follows(samples(target, draft, PROMPT, stats, choice=choice), probs, NEW, ALPHA)
    assert stats.accepted / stats.drafted > 0.2  # cd's strong contrast keeps r far from q
    assert stats.drafted > K * stats.steps  # some blocks opened with a pending token


def test_sampled_methods_take_the_block_where_they_can(monkeypatch, target):
    """``Method.device_block`` at T > 0 (fast path's engines, COSPEC_STATIC=1 on the CPU):
    spd, spd-staged, cos-we and cos-cd yes; ``we`` (nothing drafted), target-only and
    cos-we of three models (the block combines two) no; ``Method.stream`` of cos-we streams
    from the block."""
    from cospec.methods import MethodOptions, build_method
    from cospec.models import Pair

    monkeypatch.setenv("COSPEC_STATIC", "1")
    draft = draft_of(target, "near")
    two = Pair(target, draft, None, "tiny-target", "tiny-draft")
    three = Pair(target, draft, None, "tiny-target", "tiny-draft",
                 extra=(draft_of(target, "other"),))
    takes = {name: build_method(name, two, sampling=CFG).device_block(PROMPT, CFG)
             for name in ("spd", "spd-staged", "cos-we", "cos-cd", "we", "target")}
    assert takes == {"spd": True, "spd-staged": True, "cos-we": True, "cos-cd": True,
                     "we": False, "target": False}
    assert not build_method("cos-we", three, MethodOptions(weights=(0.3, 0.3, 0.4)),
                            CFG).device_block(PROMPT, CFG)
    calls = []
    block_stream = fast_block.stream
    monkeypatch.setattr(fast_block, "stream", lambda *a, **kw: calls.append(kw) or
                        block_stream(*a, **kw))
    got = build_method("cos-we", two, sampling=CFG).run(PROMPT, k=K, max_new_tokens=6,
                                                       sampling=CFG, eos_ids=(), seed=0)[0]
    assert len(got) == 6 and len(calls) == 1 and calls[0]["choice"] is not None

def test_a_seed_repeats_its_tokens_and_another_seed_need_not(monkeypatch, target):
    monkeypatch.setenv("COSPEC_STATIC", "1")
    draft = draft_of(target, "near")

    def run(seed):
        return [t.id for t in fast_block.stream(target, draft, PROMPT, k=K, max_new_tokens=12,
                                                sampling=CFG, seed=seed)]

    assert run(3) == run(3)
    assert len({tuple(run(s)) for s in range(8)}) > 1


def test_a_sampled_block_takes_no_arbiter():
    """An arbiter's choice (CoSpec is greedy) with T > 0 is refused before anything runs."""
    from cospec.arbiter import ArbiterRule, ConfidencePolicy

    target = tiny_model(11, dtype=torch.float32)
    choice = arbiter_choice(ArbiterRule(ConfidencePolicy(0.3)), torch.device("cpu"))
    with pytest.raises(CospecError, match="sampled block"):
        list(fast_block.stream(target, target, PROMPT, k=K, sampling=CFG, choice=choice))


def test_block_graphs_are_kept_for_the_first_sampling_configs(monkeypatch, target):
    """A pair keeps a block graph for its first SAMPLED_GRAPHS sampling configs (each
    greedy config the one greedy graph); past them a config gets none (its blocks run in
    the step graphs)."""
    monkeypatch.setenv("COSPEC_STATIC", "1")
    fast_block._GRAPHS.clear()
    tgt, drf = (fast.StaticLM(m, max_len=64).engine for m in (target, draft_of(target, "near")))
    configs = [SamplingConfig(temperature=0.5 + i / 10) for i in range(fast_block.SAMPLED_GRAPHS)]
    graphs = [fast_block.block_graph(tgt, drf, K, sampling=c) for c in configs]
    assert all(g is not None for g in graphs)
    assert fast_block.block_graph(tgt, drf, K, sampling=configs[0]) is graphs[0]
    assert fast_block.block_graph(tgt, drf, K, sampling=SamplingConfig(temperature=2.0)) is None
    assert fast_block.block_graph(tgt, drf, K, sampling=GREEDY) is not None
    fast_block._GRAPHS.clear()


def test_a_seeded_replay_draws_from_its_generator_and_leaves_the_default_one(monkeypatch):
    """``BlockGraph.run(rng)``: a replay draws from the default CUDA generator's state as it
    is at launch (torch's graph-safe RNG), so for the launch the default one holds ``rng``'s
    state, which the replay advances; the default one's is put back. A stand-in on the CPU:
    a "graph" whose replay draws from the stand-in default generator."""
    default = torch.Generator().manual_seed(123)
    monkeypatch.setattr(torch.cuda, "default_generators", (default,), raising=False)

    class Replay:  # draws as a captured graph's kernels would: from the default generator
        def replay(self):
            bg.verdict.copy_(torch.rand(4, generator=default))

    bg = fast_block.BlockGraph.__new__(fast_block.BlockGraph)
    bg.device, bg.graph, bg.verdict = torch.device("cuda", 0), Replay(), torch.zeros(4)
    before = default.get_state()

    def draws(seed: int) -> list[torch.Tensor]:
        rng = torch.Generator().manual_seed(seed)
        return [bg.run(rng).clone() for _ in range(3)]

    first, again, other = draws(7), draws(7), draws(8)
    assert torch.equal(default.get_state(), before)          # the default one untouched
    want = torch.Generator().manual_seed(7)                  # rng's own stream, advanced
    assert all(torch.equal(a, torch.rand(4, generator=want)) for a in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    unseeded = bg.run().clone()                              # no rng: the default one's draws
    assert torch.equal(unseeded, torch.rand(4, generator=torch.Generator().set_state(before)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["spd", "spd-staged", "cos-we"])
def test_sampled_blocks_follow_the_joint_through_a_block_graph(monkeypatch, case):
    """On a GPU, each block one CUDA graph, its draws from the default generator replayed
    afresh, still the exact joint (float32): spd's, spd-staged's (guesses) and cos-we's (r);
    seeded, the same graph draws from each generation's generator: the joint again over
    seeds, a seed repeats its tokens, the default generator is left as it was."""
    monkeypatch.setenv("COSPEC_SPD_BLOCK", "1")
    fast_block._GRAPHS.clear()
    target = tiny_model(11, dtype=torch.float32).cuda()
    draft = near_copy(target, 0.05)
    guesses, prompt = (GUESSES, REPEATS) if case == "spd-staged" else (0, PROMPT)
    combo = Combination("we", (0.5, 0.5)) if case == "cos-we" else None
    choice = combination_choice(combo, torch.device("cuda")) if combo else None

    def wanted(ids):
        ids = ids.cuda()
        if combo is None:
            return probabilities(target(ids).logits[0, -1], CFG).cpu()
        return combo.probs([draft(ids).logits[0, -1], target(ids).logits[0, -1]], CFG).cpu()

    probs = exact_joint(wanted, prompt, NEW)
    kw = dict(k=K, max_new_tokens=NEW, sampling=CFG, guesses=guesses, choice=choice)
    torch.manual_seed(0)
    samples = [[t.id for t in fast_block.stream(target, draft, prompt, **kw)]
               for _ in range(SAMPLES)]
    assert_follows(samples, probs, NEW, ALPHA)
    state = torch.cuda.get_rng_state()
    seeded = [[t.id for t in fast_block.stream(target, draft, prompt, seed=seed, **kw)]
              for seed in range(SAMPLES)]
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert_follows(seeded, probs, NEW, ALPHA)
    assert [t.id for t in fast_block.stream(target, draft, prompt, seed=3, **kw)] == seeded[3]
    assert sum(len(ks) for by_draft in fast_block._GRAPHS.values()
               for ks in by_draft.values()) == 1
