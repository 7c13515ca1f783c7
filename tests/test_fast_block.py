"""Greedy speculative decoding with each block on the device (``cospec.fast_block``) gives the
target's plain greedy tokens: with a draft that always agrees (every block fully accepted,
the draft two tokens behind), one that partly agrees and one that never does; for k = 1, 2,
5; up to an EOS and up to max_new_tokens; from a two-token prompt; on the CPU and, where one
is present, through CUDA graphs on a GPU: the steps' graphs, or each block one graph."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_model

from cospec import fast, fast_block, fused
from cospec.acceptance import ExactRule
from cospec.decoding import generate
from cospec.errors import CospecError
from cospec.stats import DecodeStats

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def drafts(device: str) -> dict[str, torch.nn.Module]:
    same = tiny_model(11, dtype=torch.float32)
    near = tiny_model(11, dtype=torch.float32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in near.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    other = tiny_model(12, layers=1, dtype=torch.float32)
    return {name: m.to(device) for name, m in
            (("same", same), ("near", near), ("other", other))}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("graph", [False, True])
def test_tokens_are_the_targets_greedy(monkeypatch, device, graph):
    """(graph: each block one CUDA graph on a GPU; on the CPU it falls back to the steps.)"""
    monkeypatch.setenv("COSPEC_STATIC", "1")
    fast_block._GRAPHS.clear()
    target = tiny_model(11, dtype=torch.float32).to(device)
    accepted, models = {}, drafts(device)  # kept: a draft's graphs go with its engine
    for name, draft in models.items():
        for prompt in ([5, 17, 33, 2, 60, 41], [3, 9]):
            plain = [t.id for t in generate(target, None, prompt, ExactRule(),
                                            max_new_tokens=30)]
            for k in (1, 2, 5):
                for eos in ((), (plain[7],)):
                    want = [t.id for t in generate(target, None, prompt, ExactRule(),
                                                   max_new_tokens=30, eos_ids=eos)]
                    stats = DecodeStats()
                    got = fast_block.spd_greedy(target, draft, prompt, k=k, max_new_tokens=30,
                                                eos_ids=eos, stats=stats, graph=graph)
                    assert got == want, (name, prompt, k, eos)
                    if name == "same":  # the target as its own draft: every block accepted
                        assert stats.accepted == k * stats.steps
                    accepted[name] = accepted.get(name, 0) + stats.accepted
                    assert stats.steps >= 1 and stats.generated == len(want)
                    assert stats.prefill_s > 0 and stats.decode_s > 0  # both timed
    assert accepted["same"] > accepted["near"] > accepted["other"] == 0
    made = sum(len(ks) for by_draft in fast_block._GRAPHS.values() for ks in by_draft.values())
    assert made == (3 * 3 if graph and device == "cuda" else 0)  # a graph a draft and k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("graph", [False, True])
def test_guessed_blocks_give_the_targets_greedy(monkeypatch, device, graph):
    """Blocks whose first draft step also checks prompt-lookup guesses (``guessed_block``,
    ``spd-staged`` on the device): the target's plain greedy tokens for k = 1, 2, 5 and 1 or
    4 guesses, up to an EOS and max_new_tokens; with the target as its own draft every
    proposal is accepted; guesses stand (k + c proposals, c > 0) in some blocks."""
    monkeypatch.setenv("COSPEC_STATIC", "1")
    fast_block._GRAPHS.clear()
    target = tiny_model(11, dtype=torch.float32).to(device)
    models = drafts(device)
    stood = 0
    for name, draft in models.items():
        for prompt in ([5, 17, 33, 2, 60, 41, 5, 17, 33], [3, 9]):
            plain = [t.id for t in generate(target, None, prompt, ExactRule(),
                                            max_new_tokens=40)]
            for k in (1, 2, 5):
                for guesses in (1, 4, 6):
                    for eos in ((), (plain[9],)):
                        want = [t.id for t in generate(target, None, prompt, ExactRule(),
                                                       max_new_tokens=40, eos_ids=eos)]
                        stats = DecodeStats()
                        got = fast_block.spd_greedy(target, draft, prompt, k=k,
                                                    max_new_tokens=40, eos_ids=eos,
                                                    stats=stats, graph=graph, guesses=guesses)
                        assert got == want, (name, prompt, k, guesses, eos)
                        assert stats.drafted >= k * stats.steps
                        stood += stats.drafted - k * stats.steps
                        if name == "same":
                            assert stats.accepted == stats.drafted
    assert stood > 0
    made = sum(len(ks) for by_draft in fast_block._GRAPHS.values() for ks in by_draft.values())
    assert made == (3 * 3 * 3 if graph and device == "cuda" else 0)  # a draft, k and guesses


def test_bad_input_is_refused_and_no_budget_gives_nothing():
    model = tiny_model(11, dtype=torch.float32)
    assert fast_block.spd_greedy(model, model, [5, 6], k=2, max_new_tokens=0) == []
    with pytest.raises(CospecError, match="two or more tokens"):
        fast_block.spd_greedy(model, model, [5], k=2)
    with pytest.raises(CospecError, match="k"):
        fast_block.spd_greedy(model, model, [5, 6], k=0)
    for guesses in (-1, fast.MAX_GRAPH - 2):  # a verify of k + guesses + 1 > MAX_GRAPH rows
        with pytest.raises(CospecError, match="guesses"):
            fast_block.spd_greedy(model, model, [5, 6], k=2, guesses=guesses)


def test_block_graph_setting_is_checked(monkeypatch):
    """COSPEC_BLOCK_GRAPH takes 0 or 1; anything else is refused by name, not ignored."""
    model = tiny_model(11, dtype=torch.float32)
    monkeypatch.setenv("COSPEC_BLOCK_GRAPH", "yes")
    with pytest.raises(CospecError, match="COSPEC_BLOCK_GRAPH='yes'"):
        fast_block.spd_greedy(model, model, [5, 6], k=2, max_new_tokens=4)
    monkeypatch.setenv("COSPEC_BLOCK_GRAPH", "1")  # on the CPU: the steps, the same tokens
    assert len(fast_block.spd_greedy(model, model, [5, 6], k=2, max_new_tokens=4)) == 4


@pytest.mark.parametrize("ahead", ["1", "2", "4"])
def test_blocks_queued_ahead_are_the_setting(monkeypatch, ahead):
    """COSPEC_BLOCK_AHEAD blocks are queued past the last verdict read: at an EOS the blocks
    run are those read plus that many (decoded and dropped); at the budget only those that
    could be needed (none dropped). The tokens are the same; a value outside 1-4 is refused
    by name."""
    monkeypatch.setenv("COSPEC_STATIC", "1")
    monkeypatch.setenv("COSPEC_BLOCK_AHEAD", ahead)
    target, models, prompt = tiny_model(11, dtype=torch.float32), drafts("cpu"), [5, 17, 33]
    ran = []
    run_block = fast_block.run_block
    monkeypatch.setattr(fast_block, "run_block", lambda *a, **kw: ran.append(1) or
                        run_block(*a, **kw))
    plain = [t.id for t in generate(target, None, prompt, ExactRule(), max_new_tokens=60)]
    eos = (max(set(plain), key=plain.index),)  # the token met last (the 12th here)
    for name in ("near", "same"):
        for budget, stop in ((200, eos), (20, ())):
            ran.clear()
            stats = DecodeStats()
            got = fast_block.spd_greedy(target, models[name], prompt, k=2,
                                        max_new_tokens=budget, eos_ids=stop, stats=stats)
            assert got == [t.id for t in generate(target, None, prompt, ExactRule(),
                                                  max_new_tokens=budget, eos_ids=stop)]
            assert len(ran) == stats.steps + (int(ahead) if stop else 0), (name, budget)
    monkeypatch.setenv("COSPEC_BLOCK_AHEAD", "0")
    with pytest.raises(CospecError, match="COSPEC_BLOCK_AHEAD='0'"):
        fast_block.spd_greedy(target, models["near"], prompt, k=2, max_new_tokens=4)


def test_stream_yields_as_blocks_return_with_their_draft_flags(monkeypatch):
    """``stream`` gives spd_greedy's tokens; a token is from_draft where it is an accepted
    draft (a draft that always agrees: k of every k + 1; one that never does: none); a caller
    that stops early leaves the tokens it took counted."""
    monkeypatch.setenv("COSPEC_STATIC", "1")
    target, models, prompt, k = tiny_model(11, dtype=torch.float32), drafts("cpu"), [5, 17, 33], 2
    for name, want in (("same", [j % (k + 1) < k for j in range(13)]), ("other", [False] * 13)):
        toks = list(fast_block.stream(target, models[name], prompt, k=k, max_new_tokens=13))
        assert [t.from_draft for t in toks] == want
        assert [t.id for t in toks] == fast_block.spd_greedy(target, models[name], prompt, k=k,
                                                             max_new_tokens=13)
    stats = DecodeStats()
    run = fast_block.stream(target, models["near"], prompt, k=k, max_new_tokens=30, stats=stats)
    assert len([next(run) for _ in range(5)]) == 5
    run.close()
    assert stats.generated == 5 and stats.decode_s > 0


def test_greedy_spd_streams_from_the_block_only_where_asked_and_able(monkeypatch):
    """``Method.stream`` of spd (and spd-staged, with guesses) takes
    ``fast_block.stream`` unless COSPEC_SPD_BLOCK=0, where both models are on the fast
    path's engines (COSPEC_STATIC=1 on the CPU) and the prompt has two or more tokens, greedy
    or sampled; otherwise ``cospec.decoding``'s loop. Greedy, either way the target's
    tokens."""
    from cospec.methods import Method
    from cospec.sampling import SamplingConfig

    target, draft = tiny_model(11, dtype=torch.float32), drafts("cpu")["near"]
    spd = Method("spd", target, draft, ExactRule())
    calls = []
    block_stream = fast_block.stream
    monkeypatch.setattr(fast_block, "stream", lambda *a, **kw: calls.append(a[2]) or
                        block_stream(*a, **kw))
    monkeypatch.setenv("COSPEC_STATIC", "1")  # spd-staged: the guessed block where spd's goes
    staged = Method("spd-staged", target, draft, ExactRule())
    ids = [t.id for t in staged.stream([5, 17, 33], k=3, max_new_tokens=20,
                                       sampling=SamplingConfig(), eos_ids=())]
    assert calls == [[5, 17, 33]] and ids == [t.id for t in generate(
        target, None, [5, 17, 33], ExactRule(), max_new_tokens=20)]
    calls.clear()
    greedy, hot = SamplingConfig(), SamplingConfig(temperature=0.8)
    assert len(list(staged.stream([5, 17, 33], k=3, max_new_tokens=20, sampling=hot,
                                  eos_ids=(), seed=0))) == 20 and calls == [[5, 17, 33]]
    calls.clear()
    cases = [(None, [5, 17, 33], greedy, True), ("1", [5, 17, 33], greedy, True),
             ("0", [5, 17, 33], greedy, False), ("1", [5], greedy, False),
             ("1", [5, 17, 33], hot, True), ("0", [5, 17, 33], hot, False),
             ("1", [5], hot, False)]
    for setting, prompt, sampling, block in cases:
        if setting is None:  # unset: the default
            monkeypatch.delenv("COSPEC_SPD_BLOCK", raising=False)
        else:
            monkeypatch.setenv("COSPEC_SPD_BLOCK", setting)
        calls.clear()
        ids = [t.id for t in spd.stream(prompt, k=3, max_new_tokens=20, sampling=sampling,
                                        eos_ids=(), seed=0)]
        assert calls == ([prompt] if block else [])
        if sampling.greedy:
            assert ids == [t.id for t in generate(target, None, prompt, ExactRule(),
                                                  max_new_tokens=20)]
    monkeypatch.delenv("COSPEC_STATIC")  # the CPU without it: no engines, the loop
    monkeypatch.setenv("COSPEC_SPD_BLOCK", "1")
    assert not fast_block.serves(target, draft, [5, 17, 33])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_greedy_spd_streams_from_the_block_graph_on_the_gpu(monkeypatch):
    """On a GPU (COSPEC_SPD_BLOCK=1, the default) ``Method.stream`` of greedy spd runs each
    block as one CUDA graph and gives the target's plain greedy tokens (float32)."""
    from cospec.methods import Method
    from cospec.sampling import SamplingConfig

    monkeypatch.setenv("COSPEC_SPD_BLOCK", "1")
    fast_block._GRAPHS.clear()
    target, draft = tiny_model(11, dtype=torch.float32).cuda(), drafts("cuda")["near"]
    prompt = [5, 17, 33, 2, 60, 41]
    want = [t.id for t in generate(target, None, prompt, ExactRule(), max_new_tokens=30)]
    got = Method("spd", target, draft, ExactRule()).stream(
        prompt, k=3, max_new_tokens=30, sampling=SamplingConfig(), eos_ids=())
    assert [t.id for t in got] == want
    assert sum(len(ks) for by_draft in fast_block._GRAPHS.values() for ks in by_draft.values()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int8_draft_after_the_targets_graphs(monkeypatch):
    """On a GPU, as ``scripts/gpu_speed.py`` runs the real pair: the target's graphs captured
    with a bf16 draft, then an int8 copy of that draft (``fast.int8_weights``) after the
    split-K counters were outgrown (the real pair's int8 lm_head does it; forced here), then
    the bf16 draft again: each block graph gives the target's plain greedy tokens (float32),
    from a prompt long enough for the prefill graphs. Width 128: head_dim 32, which the
    fused layers (and so the int8 copies) take on CUDA."""
    monkeypatch.setenv("COSPEC_FUSED", "1")
    fast_block._GRAPHS.clear()
    target = tiny_model(11, width=128, dtype=torch.float32).cuda()
    draft = copy.deepcopy(target)
    with torch.no_grad():
        g = torch.Generator(device="cuda").manual_seed(0)
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g, device="cuda") * 0.02)
    prompt = [3 + i % 80 for i in range(40)]
    want = [t.id for t in generate(target, None, prompt, ExactRule(), max_new_tokens=30)]

    def spd(proposer):
        return fast_block.spd_greedy(target, proposer, prompt, k=5, max_new_tokens=30,
                                     graph=True)

    assert spd(draft) == want
    draft8 = copy.deepcopy(draft)
    fast.int8_weights(draft8)
    fused.counters(torch.device("cuda", 0), 10 ** 5)
    assert spd(draft8) == want and spd(draft) == want
    assert all(e.layers8 is not None for e in fast.engines(draft8))
