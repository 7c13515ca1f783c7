"""Prompt lookup (``cospec.lookup``): the n-gram index, and greedy outputs equal to the
target's own (sampling's exactness: tests/test_exactness.py, over whole blocks)."""

import random

import pytest
import torch
from tiny import near_copy, tiny_model

from cospec import lookup
from cospec.acceptance import ExactRule
from cospec.batch_methods import engine_options
from cospec.decoding import generate
from cospec.errors import CospecError
from cospec.lookup import NgramIndex, lookup_generate
from cospec.methods import build_method
from cospec.models import Pair
from cospec.sampling import GREEDY
from cospec.stats import DecodeStats


def brute_force(seq: list[int], k: int, ngram: int) -> list[int]:
    """The proposal by scanning: the longest suffix (<= ngram) seen before, the k tokens
    after its latest earlier occurrence."""
    for n in range(min(ngram, len(seq) - 1), 0, -1):
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start:start + n] == seq[-n:]:
                return seq[start + n:start + n + k]
    return []


@pytest.mark.parametrize("ngram,vocab", [(1, 3), (3, 4), (3, 12), (5, 6)])
def test_index_proposes_as_a_scan_does(ngram, vocab):
    """After every token of random sequences (grown in chunks, as a decode commits them)
    the index proposes what a scan of the whole sequence finds, for k of 1 to 6."""
    rng = random.Random(ngram * 100 + vocab)
    for _ in range(20):
        seq, index = [], NgramIndex(ngram)
        while len(seq) < 60:
            seq += [rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
            index.sync(seq)
            for k in range(1, 7):
                assert index.propose(k) == brute_force(seq, k, ngram)


@pytest.mark.parametrize("ngram,vocab", [(1, 3), (3, 4), (3, 12)])
def test_index_proposes_past_unindexed_tokens_as_a_scan_does(ngram, vocab):
    """With a few tokens past the indexed ones (a block's drafted tokens, ``extra``) the
    index proposes what a scan of the whole sequence finds, and stays as it was."""
    rng = random.Random(ngram * 7 + vocab)
    for _ in range(20):
        seq = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        index = NgramIndex(ngram)
        index.sync(seq)
        for _ in range(10):
            extra = [rng.randrange(vocab) for _ in range(rng.randint(0, 5))]
            for k in range(1, 6):
                assert index.propose(k, extra) == brute_force(seq + extra, k, ngram)
        assert index.seq == seq and index.propose(3) == brute_force(seq, 3, ngram)


def test_device_guesses_are_the_index_proposal():
    """``lookup.device_guesses`` (static shapes, for the device-side block) proposes what
    the index does for seq[:length], padded with -1, whatever lies past length in the
    buffer; for buffers shorter than the n-gram and proposals longer than the buffer too."""
    rng = random.Random(5)
    for _ in range(1500):
        vocab, length = rng.choice([2, 3, 5, 12]), rng.randint(2, 40)
        buf = [rng.randrange(vocab) for _ in range(length + rng.randint(0, 20))]
        m = rng.randint(1, 6)
        index = NgramIndex()
        index.sync(buf[:length])
        want = index.propose(m)
        got = lookup.device_guesses(torch.tensor(buf), torch.tensor([length]), m).tolist()
        assert got == want + [-1] * (m - len(want)), (buf, length, m)


def test_index_examples():
    index = NgramIndex(3)
    index.sync([1, 2, 3, 4, 1, 2])
    assert index.propose(3) == [3, 4, 1]      # (1, 2) ended at 2; (4, 1, 2) never before
    index.sync([1, 2, 3, 4, 1, 2, 3])
    assert index.propose(5) == [4, 1, 2, 3]   # (1, 2, 3) ended at 3: up to the end
    assert NgramIndex(2).propose(4) == [] and index.propose(0) == []
    fresh = NgramIndex(2)
    fresh.sync([7])
    assert fresh.propose(3) == []             # one token: nothing before it
    with pytest.raises(CospecError):
        NgramIndex(0)


@pytest.fixture(scope="module")
def models():
    target = tiny_model(21, dtype=torch.float32)
    return target, near_copy(target, 0.05)


PROMPTS = [[5, 9, 12, 5, 9, 12, 5, 9], [3, 3, 3, 3], [40, 41, 42, 43, 44, 45, 40, 41],
           [7, 70, 17, 71, 27, 72]]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_lookup_is_the_targets_greedy(models, monkeypatch, k):
    """``lookup`` (no draft) and ``spd-lookup`` (the draft where the lookup offers fewer
    than a whole block) give the target's greedy tokens exactly, EOS included; the
    lookup's proposals are accepted on some steps and, in spd-lookup, the draft proposes
    on others (so neither path is idle)."""
    target, draft = models
    events = []  # ("draft",) a draft proposal; ("lookup", asked, got) a lookup
    real_propose, real_lookup = lookup.propose, NgramIndex.propose
    monkeypatch.setattr(lookup, "propose",
                        lambda *a, **kw: events.append(("draft",)) or real_propose(*a, **kw))

    def recorded(index, n):
        got = real_lookup(index, n)
        events.append(("lookup", n, len(got)))
        return got

    monkeypatch.setattr(NgramIndex, "propose", recorded)
    accepted = whole = drafted = 0  # lookup: tokens kept; spd-lookup: blocks of each kind
    for ids in PROMPTS:
        want = [t.id for t in generate(target, None, ids, ExactRule(), max_new_tokens=40,
                                       eos_ids=[1])]
        for proposer in (None, draft):
            stats, events[:] = DecodeStats(), []
            got = [t.id for t in lookup_generate(target, proposer, ids, ExactRule(), k=k,
                                                 max_new_tokens=40, eos_ids=[1], stats=stats)]
            assert got == want
            assert stats.generated == len(want)
            if proposer is None:
                accepted += stats.accepted
            else:  # a whole-block lookup not followed by a draft proposal: verified as is
                drafted += events.count(("draft",))
                whole += sum(1 for e, after in zip(events, events[1:] + [None])
                             if e[0] == "lookup" and 0 < e[1] == e[2] and after != ("draft",))
    assert accepted > 0 and drafted > 0 and whole > 0


@pytest.mark.parametrize("k", [2, 5])
def test_greedy_staged_is_spd_in_fewer_draft_steps(models, monkeypatch, k):
    """``spd-staged`` proposes the draft's own greedy tokens: output, verify passes,
    proposals and acceptances all equal spd's, EOS included; the lookup's guesses stand
    often enough that the draft runs fewer forward passes than spd's."""
    from cospec import decoding

    target, draft = models
    passes = {"forward": 0}
    real_forward = decoding.CachedLM.forward

    def counted(lm, ids, keep, prefill=False):
        passes["forward"] += lm.model is draft and not prefill
        return real_forward(lm, ids, keep, prefill)

    monkeypatch.setattr(decoding.CachedLM, "forward", counted)
    stood = {"n": 0}
    real_stand = lookup._stand_or_draw

    def stand(logits, guess, *args):
        got = real_stand(logits, guess, *args)  # the guesses that stood, then the draft's own
        stood["n"] += len(got) - 1
        return got

    monkeypatch.setattr(lookup, "_stand_or_draw", stand)
    spd_passes = staged_passes = 0
    for ids in PROMPTS:
        spd_stats, staged_stats = DecodeStats(), DecodeStats()
        passes["forward"] = 0
        want = [t.id for t in generate(target, draft, ids, ExactRule(), k=k, max_new_tokens=40,
                                       eos_ids=[1], stats=spd_stats)]
        spd_passes += passes["forward"]
        passes["forward"] = 0
        got = [t.id for t in lookup_generate(target, draft, ids, ExactRule(), k=k,
                                             max_new_tokens=40, eos_ids=[1],
                                             stats=staged_stats, staged=True)]
        staged_passes += passes["forward"]
        assert got == want
        assert ((staged_stats.steps, staged_stats.drafted, staged_stats.accepted)
                == (spd_stats.steps, spd_stats.drafted, spd_stats.accepted))
    assert stood["n"] > 0 and staged_passes < spd_passes


def test_lookup_methods_are_built_and_batched_without_a_draft(models):
    """``lookup`` needs no draft, ``spd-lookup`` and ``spd-staged`` do; ``lookup`` alone goes
    to a batch engine (each row's proposals from its own index; the others' draft checks
    the guesses at batch 1), and all stream the target's greedy tokens."""
    target, draft = models
    alone = Pair(target, None, None, "t", None)
    method = build_method("lookup", alone)
    assert method.proposer is None and engine_options(method) == {"lookup": True}
    for name in ("spd-lookup", "spd-staged"):
        with pytest.raises(CospecError, match="needs a draft"):
            build_method(name, alone)
    both, staged = (build_method(name, Pair(target, draft, None, "t", "d"))
                    for name in ("spd-lookup", "spd-staged"))
    assert engine_options(both) is None and engine_options(staged) is None
    want = [t.id for t in generate(target, None, PROMPTS[0], ExactRule(), max_new_tokens=20)]
    for m in (method, both, staged):
        assert m.run(PROMPTS[0], k=4, max_new_tokens=20, sampling=GREEDY, eos_ids=[])[0] == want


def test_lookup_refuses_rules_it_cannot_verify(models):
    from cospec.arbiter import ArbiterRule, ConstantPolicy

    target, draft = models
    with pytest.raises(CospecError, match="exact rule"):
        list(lookup_generate(target, draft, [5, 6], ArbiterRule(ConstantPolicy(0.0)), k=2))
    with pytest.raises(CospecError, match="k"):
        list(lookup_generate(target, None, [5, 6], ExactRule(), k=0))
    with pytest.raises(CospecError, match="draft"):
        list(lookup_generate(target, None, [5, 6], ExactRule(), k=2, staged=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_greedy_lookup_on_the_gpus_fast_path(monkeypatch):
    """On a GPU the loop's caches are the fast path's static engines (CUDA graphs a verify
    shape, fused layers at head_dim 32): float32 lookup, spd-lookup and spd-staged still
    give the target's greedy tokens."""
    monkeypatch.setenv("COSPEC_FUSED", "1")
    target = tiny_model(21, width=128, dtype=torch.float32)
    draft = near_copy(target, 0.05).cuda()
    target = target.cuda()
    for ids in PROMPTS:
        want = [t.id for t in generate(target, None, ids, ExactRule(), max_new_tokens=40)]
        for proposer, staged in ((None, False), (draft, False), (draft, True)):
            stats = DecodeStats()
            got = [t.id for t in lookup_generate(target, proposer, ids, ExactRule(), k=4,
                                                 max_new_tokens=40, stats=stats,
                                                 staged=staged)]
            assert got == want


def test_a_verify_past_the_fast_paths_graphs_is_warned_of(models, monkeypatch):
    """--k of MAX_GRAPH or more on the fast path: its verifies run eagerly, and the user is
    told once the pair is loaded; k = MAX_GRAPH - 1, or no fast path, passes silently."""
    import warnings

    from cospec import fast
    from cospec.args import warn_eager_verify

    target, _ = models
    monkeypatch.setenv("COSPEC_STATIC", "1")  # the fast path on the CPU, as on a GPU
    with pytest.warns(UserWarning, match=f"--k {fast.MAX_GRAPH}: a verify of"):
        warn_eager_verify(target, fast.MAX_GRAPH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_eager_verify(target, fast.MAX_GRAPH - 1)
        monkeypatch.delenv("COSPEC_STATIC")
        warn_eager_verify(target, fast.MAX_GRAPH + 4)
